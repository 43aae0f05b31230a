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


class ToolchainMissing(RuntimeError):
    pass


# (description, the call): a Spec's fields (fastkd.kernels.kd_softmax_kl.Spec) over the base kd + CE,
# batchmean, T = 1, plus the problem (N, C), whether labels are given and whether the split path is
# forced. The kernel variant (its constexprs, block and warps) is derived from the call exactly as
# the launcher derives it (kd_softmax_kl._compile_time). N > 1024 rows with labels and batchmean
# read the denominator from a device reduction (the chunked / split paths at LM sizes).
_LM = dict(N=8192, C=128256)
_CHUNKED = dict(C=128256)
_T4 = dict(temperature=4.0)
_ISATS16 = dict(method="isats", candidates=tuple(1.0 + 0.5 * i for i in range(16)))
VARIANTS = [
    ("kd+ce single 1024 (ImageNet)", dict()),
    ("ats+smoothing single 8192", dict(method="ats", label_smoothing=0.1, C=8192)),
    ("kd+ce chunked (32000, 128256)", dict(**_LM)),
    ("isats 16 candidates chunked", dict(**_ISATS16, **_CHUNKED)),
    ("isats 16 candidates single 4096", dict(**_ISATS16, C=4096)),
    ("dkd chunked, T != 1", dict(method="dkd", **_LM, **_T4)),
    ("dkd single 8192, T != 1", dict(method="dkd", C=8192, **_T4)),
    ("ce only, reduction none", dict(method="ce", kd_weight=0.0, reduction="none")),
    ("kd without labels chunked, T != 1", dict(labels=False, **_CHUNKED, **_T4)),
    ("kd+ce split (128256)", dict(split=True, **_CHUNKED)),
    ("isats 16 candidates split", dict(split=True, **_ISATS16, **_CHUNKED)),
    ("dkd split, T != 1", dict(split=True, method="dkd", **_CHUNKED, **_T4)),
]
VARIANTS += [  # the language-model divergences (their row-sum sweep)
    ("jsd chunked (128256), bf16 LM head", dict(method="jsd", beta=0.5, **_LM)),
    ("jsd single 8192, T != 1", dict(method="jsd", beta=0.5, C=8192, **_T4)),
    ("rkl without labels chunked, T != 1", dict(method="rkl", labels=False, **_CHUNKED, **_T4)),
]
BASE = dict(method="kd", ce_weight=1.0, kd_weight=1.0, label_smoothing=0.0, ignore_index=-100, reduction="batchmean",
            N=256, C=1000, labels=True, split=False)

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
        call = {**BASE, **over}
        N, C, labels, split = (call.pop(k) for k in ("N", "C", "labels", "split"))
        plan, const = K._compile_time(K.Spec(**call), N, C, labels, True, L.LaunchConfig(split=split))
        assert (plan.path == "split") == split, (plan, name)
        fn = K._kd_split_kernel if plan.path == "split" else K._kd_fused_kernel
        sig = dict(_PTRS)
        sig.update({n: "i32" for n in _INTS})
        sig = {n: sig.get(n, "constexpr" if n in const else "fp32") for n in fn.arg_names}
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
