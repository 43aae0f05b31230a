"""Compile the fused kernel's variants for a GPU architecture without a GPU.

Triton's interpreter accepts code its compiler rejects, so the CPU test suite also compiles
the main variants (one per method, both the single-block and the chunked path) with Triton's
own compiler down to a cubin (ptxas ships with Triton) and reads the registers and local
memory (spills) with cuobjdump. Run as ``python -m fastkd.kernels._compile_check [--arch 90]``;
it prints one JSON line per variant. ``TRITON_INTERPRET`` must be unset in that process (the
test runs it in a subprocess for that reason).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


class ToolchainMissing(RuntimeError):
    pass


# (description, constexpr overrides). The base is kd + CE, fp16-family input, batchmean.
VARIANTS = [
    ("kd+ce single 1024 (ImageNet)", dict()),
    ("ats+smoothing single 8192", dict(METHOD=2, SMOOTH=True, BLOCK=8192)),
    ("kd+ce chunked 4096 (32000, 128256)", dict(BLOCK=4096, SINGLE=False, COUNT_MODE=2)),
    ("kd+ce chunked 2048, register prefetch", dict(BLOCK=2048, SINGLE=False, COUNT_MODE=2, PREFETCH=True)),
    ("isats 16 candidates chunked", dict(METHOD=3, NUM_CAND=16, CAND_P2=16, BLOCK=4096, SINGLE=False)),
    ("isats 16 candidates single 4096", dict(METHOD=3, NUM_CAND=16, CAND_P2=16, BLOCK=4096)),
    ("dkd chunked", dict(METHOD=4, REUSE_CE=False, BLOCK=4096, SINGLE=False, COUNT_MODE=2)),
    ("dkd single 8192", dict(METHOD=4, REUSE_CE=False, BLOCK=8192)),
    ("ce only, reduction none", dict(METHOD=0, REUSE_CE=False, REDUCE=0, KD_GRAD=False)),
    ("kd without labels chunked", dict(HAS_TARGET=False, REUSE_CE=False, CE_GRAD=False, COUNT_MODE=0, BLOCK=4096,
                                       SINGLE=False)),
]
BASE = dict(METHOD=1, HAS_TARGET=True, SMOOTH=False, REUSE_CE=True, CE_GRAD=True, KD_GRAD=True, WRITE_GRAD=True,
            REDUCE=2, COUNT_MODE=1, NUM_CAND=1, CAND_P2=2, BLOCK=1024, SINGLE=True, PREFETCH=False, BLOCK_N=1024)

_PTRS = {"z_ptr": "*bf16", "v_ptr": "*bf16", "y_ptr": "*i64", "grad_ptr": "*bf16", "ce_ptr": "*fp32",
         "kd_ptr": "*fp32", "rows_ptr": "*fp32", "loss_ptr": "*fp32", "counter_ptr": "*i32", "count_ptr": "*i64",
         "cand_ptr": "*fp32"}
_INTS = ("stride_zn", "stride_vn", "stride_y", "N", "C", "ignore_index")


def _usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        raise ToolchainMissing("cuobjdump is not shipped with this Triton")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln for ln in out.splitlines() if "REG:" in ln), "")
    return {k: int(v) for k, v in (item.split(":") for item in line.split() if ":" in item and item.split(":")[1].isdigit())}


def compile_variants(arch: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import kd_softmax_kl as K

    if not isinstance(K._kd_fused_kernel, triton.runtime.jit.JITFunction):
        raise ToolchainMissing("TRITON_INTERPRET is set: the kernels were defined for the interpreter")
    report = []
    for name, over in VARIANTS:
        const = {**BASE, **over}
        sig = dict(_PTRS)
        sig.update({n: "i32" for n in _INTS})
        for n in K._kd_fused_kernel.arg_names:
            sig.setdefault(n, "constexpr" if n in const else "fp32")
        warps = 4 if const["BLOCK"] <= 1024 else 8 if const["BLOCK"] <= 4096 else 16
        src = ASTSource(fn=K._kd_fused_kernel, signature=sig, constexprs=const)
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        except FileNotFoundError as exc:  # ptxas missing
            raise ToolchainMissing(str(exc)) from exc
        report.append((name, _usage(kernel.asm["cubin"])))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    try:
        for name, usage in compile_variants(args.arch):
            print(json.dumps({"variant": name, **usage}), flush=True)
    except ToolchainMissing as exc:
        print(json.dumps({"skip": str(exc)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
