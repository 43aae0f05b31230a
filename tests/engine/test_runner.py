"""TeacherRunner: the frozen teacher one batch ahead (own CUDA stream) or in order (CPU, --sequential)."""
import pytest
import torch

from fastkd.engine.runner import TeacherRunner
from fastkd.engine.timing import StepTimer
from fastkd.models import create_model


def _teacher(seed=0, num_classes=10):
    torch.manual_seed(seed)
    model = create_model("fastkd:resnet8", num_classes)
    # Non-trivial batch-norm statistics, so that eval mode differs visibly from train mode.
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, 3, 12, 12) * 2 + 0.5)
    return model


def test_sequential_runner_matches_an_eval_forward():
    model = _teacher()
    expected_model = _teacher()  # same seed: same weights and statistics
    expected_model.eval()
    timer = StepTimer(torch.device("cpu"))
    runner = TeacherRunner(model, torch.device("cpu"), timer=timer, feature_layers=["layer2", "layer3"])
    x = [torch.randn(6, 3, 12, 12) for _ in range(3)]
    pendings = [runner.submit(xi) for xi in x]  # in order, computed when asked for
    for xi, p in zip(x, pendings):
        out = runner.result(p)
        with torch.no_grad():
            ref = expected_model(xi)
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
        assert [f.shape[1] for f in out.features] == [32, 64]
        assert not out.logits.is_inference() and not out.logits.requires_grad
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert timer.totals["teacher"] > 0


def test_outputs_can_enter_autograd_graphs():
    # Inference tensors cannot be saved for backward; the runner hands out ordinary tensors.
    runner = TeacherRunner(_teacher(), torch.device("cpu"), feature_layers=["layer3"])
    out = runner(torch.randn(4, 3, 12, 12))
    w = torch.randn(10, requires_grad=True)
    (out.logits * w).sum().backward()  # saves the teacher logits for the gradient of w
    proj = torch.nn.Conv2d(64, 8, 1)
    proj(out.features[0]).sum().backward()  # a conv saves its input
    assert w.grad is not None and proj.weight.grad is not None


def test_cuda_graph_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ValueError, match="CUDA-graph teacher needs a CUDA device"):
        TeacherRunner(_teacher(), torch.device("cpu"), cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_concurrent_stream_matches_sequential_on_gpu(cuda_graph):
    dev = torch.device("cuda")
    seq = TeacherRunner(_teacher(), dev, amp_dtype=torch.bfloat16, channels_last=True, concurrent=False)
    conc = TeacherRunner(_teacher(), dev, amp_dtype=torch.bfloat16, channels_last=True, concurrent=True,
                         cuda_graph=cuda_graph, feature_layers=["layer3"])
    assert conc.stream is not None
    xs = [torch.randn(32, 3, 16, 16, device=dev) for _ in range(4)] + [torch.randn(20, 3, 16, 16, device=dev)]
    pend = conc.submit(xs[0])
    for i, x in enumerate(xs):
        out = conc.result(pend)
        if i + 1 < len(xs):
            pend = conc.submit(xs[i + 1])  # queued on the teacher stream while we use `out`
        # busy the student stream meanwhile, as a training step would
        a = torch.randn(2048, 2048, device=dev)
        (a @ a).sum().item()
        ref = seq.result(seq.submit(x))
        assert out.logits.shape == (x.shape[0], 10)
        # same kernels in a graph or not: bf16 results agree to bf16 rounding
        torch.testing.assert_close(out.logits.float(), ref.logits.float(), rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()


def test_online_teacher_source_uses_the_teacher_view_and_matches_the_runner():
    from fastkd.data.loader import Batch
    from fastkd.engine.teacher import OnlineTeacher, TeacherSource

    source = OnlineTeacher.from_model(_teacher(), torch.device("cpu"), feature_layers=["layer3"])
    oracle = _teacher()
    oracle.eval()
    assert isinstance(source, TeacherSource) and source.has_model and source.provides_features
    assert not source.concurrent  # no CUDA here
    source.set_epoch(0)
    student_view, teacher_view = torch.randn(4, 3, 12, 12), torch.randn(4, 3, 16, 16)
    batches = [Batch(student_view, torch.arange(4)), Batch(student_view, torch.arange(4), teacher_images=teacher_view)]
    handles = [source.submit(b) for b in batches]
    with torch.no_grad():
        expected = [oracle(student_view), oracle(teacher_view)]
    for h, ref in zip(handles, expected):
        torch.testing.assert_close(source.result(h).logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(source(teacher_view).logits, expected[1], rtol=0, atol=0)
    source.close()


def test_a_source_without_a_model_refuses_arbitrary_images():
    from fastkd.engine.teacher import TeacherSource

    with pytest.raises(TypeError, match="holds no teacher model"):
        TeacherSource()(torch.zeros(1, 3, 4, 4))
