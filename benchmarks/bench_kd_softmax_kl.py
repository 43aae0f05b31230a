"""pytest-benchmark suite for the fused KD loss (``kd_softmax_kl``): forward + backward of
``0.5 CE + 0.5 KD`` in bf16 at the ImageNet shape and two vocabulary-sized shapes, fastkd's
fused kernel side by side with plain fp32 PyTorch (eager and torch.compile) and (where installed)
two Liger-Kernel paths (see fastkd/bench/kernels.py for what each row is).

Needs a CUDA GPU (skipped otherwise). Run:

    python -m pytest benchmarks/bench_kd_softmax_kl.py --benchmark-columns=median,min,max \
        --benchmark-json=benchmarks/results/kernels-pytest-benchmark.json

The same comparison with a CUDA-graph column, GB/s, share of copy bandwidth, peak memory,
launch counts and the commit: ``fastkd bench kernels`` (fastkd/bench/kernels.py), which
``benchmarks/gpu_visit.sh`` runs.
"""
import pytest
import torch

SHAPES = [(256, 1000), (4096, 32000), (8192, 128256)]
IMPLS = ["fastkd", "eager", "compile", "liger-kl", "liger-jsd"]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_impls = {}


def _get_impl(name):
    from fastkd.bench import kernels as bk

    if not _impls:
        _impls.update(bk.build_impls("kd", 1.0, 0.5, 0.5, IMPLS))
    if name not in _impls:
        pytest.skip(f"{name} is not available here (liger rows: pip install liger-kernel)")
    return _impls[name][0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kd_ce_forward_backward(benchmark, shape, impl):
    from fastkd.bench import kernels as bk

    fn = _get_impl(impl)
    z, v, y = bk.make_inputs(*shape, torch.bfloat16)
    one = torch.ones((), device="cuda")

    def step():
        bk.fwd_bwd(fn, z, v, y, one)
        torch.cuda.synchronize()

    step()  # compile / warm up outside the clock
    benchmark.extra_info.update(N=shape[0], C=shape[1], dtype="bf16", impl=impl, gpu=torch.cuda.get_device_name(),
                                min_bytes=3 * z.numel() * z.element_size())
    benchmark.pedantic(step, rounds=20, iterations=5, warmup_rounds=2)
