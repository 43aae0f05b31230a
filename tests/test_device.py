"""Device resolution and machine information, each written once (fastkd._device, fastkd.envinfo)."""
import pytest
import torch

from fastkd._device import DeviceError, cpu_cores, resolve_device
from fastkd.envinfo import machine


def test_names_resolve_and_bad_ones_are_refused_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "mps", "cuda:x"):
        with pytest.raises(DeviceError, match="--device must be auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    with pytest.raises(ValueError, match="data device must be"):  # a usage error, named by its option
        resolve_device("tpu", flag="data device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="asked for CUDA, but CUDA is not available"):
        resolve_device("cuda:0")


def test_machine_names_versions_cores_and_threads():
    info = machine("cpu")
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()
    assert info["cores"] == cpu_cores() >= 1 and info["gpu"] is None and info["date"].endswith("UTC")
