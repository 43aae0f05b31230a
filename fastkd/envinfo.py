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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device=None) -> dict:
    """The machine a measurement or a run was made on, for results files: date (UTC), versions,
    CPU model and usable cores, torch threads, and the GPU's name when ``device`` is a CUDA device.

    The one place this is collected (benchmarks, the study and run records use it).
    """
    import datetime

    import torch

    from . import __version__
    from ._device import cpu_cores

    triton = dali = torchvision = None
    if _compat.has_triton():
        import triton as _triton

        triton = _triton.__version__
    if _compat.has_dali():
        dali = (_version("nvidia-dali-cuda130") or _version("nvidia-dali-cuda120") or _version("nvidia-dali-cuda110")
                or _version("nvidia-dali"))
    if _compat.has_torchvision():
        torchvision = _version("torchvision")
    dev = torch.device(device) if device is not None else None
    gpu = None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(dev if dev.index is not None else None)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton,
        "dali": dali,
        "torchvision": torchvision,
        "fastkd": __version__,
        "cpu": _cpu_model(),
        "cores": cpu_cores(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
    }


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
