"""``fastkd check-env``: what this machine can use. Always exits 0."""
from __future__ import annotations

import os
import platform

from . import _compat


def _version(mod_name: str):
    try:
        from importlib.metadata import version

        return version(mod_name)
    except Exception:
        return None


def collect() -> dict:
    """Everything ``check-env`` reports, as a dict (also written into run directories)."""
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count})
    if _compat.has_triton():
        import triton

        info["triton"] = triton.__version__
        info["triton_mode"] = ("interpreter (TRITON_INTERPRET=1)" if _compat.triton_interpret() else
                               "compiled (CUDA)" if info["cuda_available"] else "unusable without CUDA; tests use TRITON_INTERPRET=1")
    else:
        info["triton"] = None
        info["triton_mode"] = "not installed"
    if _compat.has_dali():
        try:
            import nvidia.dali as dali

            info["dali"] = dali.__version__
        except Exception as exc:  # installed but broken: say so
            info["dali"] = f"installed but failed to import: {exc}"
        info["dali_gpu_decode"] = bool(info["cuda_available"])
    else:
        info["dali"] = None
        info["dali_gpu_decode"] = False
    info["apex"] = _version("apex") if _compat.has_apex() else None
    info["timm"] = _version("timm") if _compat.has_timm() else None
    info["torchvision"] = _version("torchvision") if _compat.has_torchvision() else None
    info["cpu_count"] = os.cpu_count()
    return info


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args) -> int:
    info = collect()
    if getattr(args, "json", False):
        import json

        print(json.dumps(info, indent=2))
        return 0
    ok, no = "yes", "no"
    print(f"fastkd environment")
    print(f"  python        {info['python']}  ({info['platform']})")
    print(f"  torch         {info['torch']}  (built for CUDA {info['torch_cuda']})")
    if info["gpus"]:
        for g in info["gpus"]:
            print(f"  GPU {g['index']}         {g['name']}, {g['memory_gib']} GiB, sm_{g['capability'].replace('.', '')}, {g['sms']} SMs")
    else:
        print(f"  GPU           none usable (CUDA available: {no}); losses use the PyTorch reference, loaders run on CPU")
    print(f"  triton        {info['triton'] or 'not installed'}  [{info['triton_mode']}]")
    if info["dali"]:
        print(f"  DALI          {info['dali']}  (GPU decoding: {ok if info['dali_gpu_decode'] else no + ', CPU pipelines only'})")
    else:
        print("  DALI          not installed (pip install 'fastkd[dali]'); the torch loader is used")
    print(f"  apex          {info['apex'] or 'not installed (torch fused SGD/AdamW are used; --opt lamb needs apex)'}")
    print(f"  timm          {info['timm'] or 'not installed (pip install fastkd[models])'}")
    print(f"  torchvision   {info['torchvision'] or 'not installed (pip install fastkd[models])'}")
    print(f"  CPU cores     {info['cpu_count']}")
    return 0
