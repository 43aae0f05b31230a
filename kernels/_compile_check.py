"""Compile the fused kernel's variants for a GPU architecture without a GPU.

Triton's interpreter accepts code its compiler rejects, so the CPU test suite also compiles
the main variants (one per method; the single-block, chunked and split-row paths) with Triton's
own compiler (ptxas ships with Triton) and reads registers and spills from ``ptxas -v``. Run as ``python -m fastkd.kernels._compile_check [--arch 90]``;
it prints one JSON line per variant. ``TRITON_INTERPRET`` must be unset in that process (the
test runs it in a subprocess for that reason).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from ._modes import COUNT_FIXED, COUNT_FROM_BUFFER, COUNT_IN_KERNEL
from ._modes import METHOD_IDS as M
from ._modes import REDUCE_IDS as R


class ToolchainMissing(RuntimeError):
    pass


# (description, constexpr overrides). The base is kd + CE, fp16-family input, batchmean. Variants
# with SPLIT compile the split-row kernel (its BLOCK is a slice; SINGLE / PREFETCH do not apply).
_BUF = COUNT_FROM_BUFFER.value   # batchmean denominator from a device reduction (chunked / split paths)
_CHUNKED = dict(BLOCK=2048, SINGLE=False, PREFETCH=True)
_T_NOT_1 = dict(S_UNIT=False, T_UNIT=False)
_NO_LABELS = dict(HAS_TARGET=False, REUSE_CE=False, CE_GRAD=False, COUNT_MODE=COUNT_FIXED.value)
_ISATS16 = dict(METHOD=M["isats"], NUM_CAND=16, CAND_P2=16)
VARIANTS = [
    ("kd+ce single 1024 (ImageNet)", dict()),
    ("ats+smoothing single 8192", dict(METHOD=M["ats"], SMOOTH=True, BLOCK=8192, T_UNIT=False)),
    ("kd+ce chunked (32000, 128256)", dict(**_CHUNKED, COUNT_MODE=_BUF)),
    ("isats 16 candidates chunked", dict(**_ISATS16, **_CHUNKED, T_UNIT=False)),
    ("isats 16 candidates single 4096", dict(**_ISATS16, BLOCK=4096, T_UNIT=False)),
    ("dkd chunked, T != 1", dict(METHOD=M["dkd"], REUSE_CE=False, **_CHUNKED, COUNT_MODE=_BUF, **_T_NOT_1)),
    ("dkd single 8192, T != 1", dict(METHOD=M["dkd"], REUSE_CE=False, BLOCK=8192, **_T_NOT_1)),
    ("ce only, reduction none", dict(METHOD=M["ce"], REUSE_CE=False, REDUCE=R["none"], KD_GRAD=False)),
    ("kd without labels chunked, T != 1", dict(**_NO_LABELS, **_CHUNKED, **_T_NOT_1)),
    ("kd+ce split (128256)", dict(SPLIT=True, BLOCK=4096, S_P2=32, COUNT_MODE=_BUF)),
    ("isats 16 candidates split", dict(SPLIT=True, **_ISATS16, BLOCK=2048, S_P2=64, COUNT_MODE=_BUF, T_UNIT=False)),
    ("dkd split, T != 1", dict(SPLIT=True, METHOD=M["dkd"], REUSE_CE=False, BLOCK=4096, S_P2=32, COUNT_MODE=_BUF,
                               **_T_NOT_1)),
]
VARIANTS += [  # the language-model divergences (their row-sum sweep)
    ("jsd chunked (128256), bf16 LM head", dict(METHOD=M["jsd"], **_CHUNKED, COUNT_MODE=_BUF)),
    ("jsd single 8192, T != 1", dict(METHOD=M["jsd"], REUSE_CE=False, BLOCK=8192, **_T_NOT_1)),
    ("rkl without labels chunked, T != 1", dict(METHOD=M["rkl"], **_NO_LABELS, **_CHUNKED, **_T_NOT_1)),
]
BASE = dict(METHOD=M["kd"], HAS_TARGET=True, SMOOTH=False, REUSE_CE=True, CE_GRAD=True, KD_GRAD=True, WRITE_GRAD=True,
            REDUCE=R["batchmean"], COUNT_MODE=COUNT_IN_KERNEL.value, NUM_CAND=1, CAND_P2=2, BLOCK=1024, SINGLE=True,
            PREFETCH=False, BLOCK_N=1024, S_UNIT=True, T_UNIT=True)

_PTRS = {"z_ptr": "*bf16", "v_ptr": "*bf16", "y_ptr": "*i64", "grad_ptr": "*bf16", "ce_ptr": "*fp32",
         "kd_ptr": "*fp32", "rows_ptr": "*fp32", "loss_ptr": "*fp32", "counter_ptr": "*i32", "count_ptr": "*i64",
         "cand_ptr": "*fp32"}
_PTRS.update(sync_ptr="*i32", stats_ptr="*fp32", klp_ptr="*fp32")
_INTS = ("stride_zn", "stride_vn", "stride_y", "N", "C", "ignore_index", "S", "LAG")


def _usage(ptx: str, arch: int, warps: int) -> dict:
    """Registers and spills as ptxas reports them (``ptxas -v``) for this PTX."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # Triton ships one or two ptxas builds (their names vary across releases): use the first
    # that accepts this PTX version.
    tools = sorted((os.path.join(bin_dir, n) for n in os.listdir(bin_dir) if n.startswith("ptxas")), reverse=True) \
        if os.path.isdir(bin_dir) else []
    if not tools:
        raise ToolchainMissing("ptxas is not shipped with this Triton")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for tool in tools:
            proc = subprocess.run([tool, f"-arch=sm_{arch}{suffix}", "-v",
                                   f"--maxrregcount={min(255, 65536 // (32 * warps))}",
                                   "-o", os.path.join(tmp, "k.cubin"), src], capture_output=True, text=True)
            text = proc.stdout + proc.stderr
            if proc.returncode == 0:
                break
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    out = {}
    for key, pattern in (("REG", r"Used (\d+) registers"), ("SPILL_STORES", r"(\d+) bytes spill stores"),
                         ("SPILL_LOADS", r"(\d+) bytes spill loads"), ("STACK", r"(\d+) bytes stack frame")):
        m = re.search(pattern, text)
        out[key] = int(m.group(1)) if m else 0
    return out


def compile_variants(arch: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _launch as L
    from . import kd_softmax_kl as K

    if not isinstance(K._kd_fused_kernel, triton.runtime.jit.JITFunction):
        raise ToolchainMissing("TRITON_INTERPRET is set: the kernels were defined for the interpreter")
    report = []
    for name, over in VARIANTS:
        const = {**BASE, **over}
        split = const.pop("SPLIT", False)
        fn = K._kd_split_kernel if split else K._kd_fused_kernel
        if split:
            del const["SINGLE"], const["PREFETCH"]
        sig = dict(_PTRS)
        sig.update({n: "i32" for n in _INTS})
        sig = {n: sig.get(n, "constexpr" if n in const else "fp32") for n in fn.arg_names}
        method = "isats" if const["METHOD"] == 3 else "kd"
        C = const["BLOCK"] if const.get("SINGLE") else 128256
        plan = L.plan(C, method, L.LaunchConfig(split=split))
        if plan.path != "single":  # the chunked / split variants are compiled at the shipped width
            assert plan.path == ("split" if split else "chunked") and plan.block == const["BLOCK"], (plan, name)
        warps = plan.warps
        src = ASTSource(fn=fn, signature=sig, constexprs=const)
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": warps, "enable_fp_fusion": False})
        except FileNotFoundError as exc:  # ptxas missing
            raise ToolchainMissing(str(exc)) from exc
        report.append((name, {"warps": warps, **_usage(kernel.asm["ptx"], arch, warps)}))
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
