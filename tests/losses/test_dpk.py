"""DPK (docs/methods.md §8): hooks, CKA-driven ratio, spatial mask, gradient flow, a tiny run."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from fastkd.losses import reference as ref
from fastkd.losses.dpk import DPKLoss, FeatureHooks, default_stages, feature_channels, mix_features


def feats(b=6, c=4, h=5, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g)


def cka_by_hand(x, y):
    """Linear CKA of flattened features in float64 numpy: ||X^T Y||^2 / (||X^T X|| ||Y^T Y||)."""
    x = x.reshape(x.shape[0], -1).double().numpy()
    y = y.reshape(y.shape[0], -1).double().numpy()
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


# ------------------------------------------------------------------------------ CKA and r
def test_cka_matches_hand_computation_and_invariances():
    fs, ft = feats(c=3, seed=1), feats(c=5, seed=2)
    c = ref.linear_cka(fs.double().flatten(1), ft.double().flatten(1)).item()
    assert c == pytest.approx(cka_by_hand(fs, ft), rel=1e-10)
    assert 0 < c < 1
    # Invariant to an orthogonal map of the student's flattened features and to isotropic scaling.
    q, _ = torch.linalg.qr(torch.randn(75, 75, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    rotated = (fs.double().flatten(1) @ q) * 7.5
    assert ref.linear_cka(rotated, ft.double().flatten(1)).item() == pytest.approx(c, rel=1e-9)
    assert ref.linear_cka(fs.flatten(1), fs.flatten(1)).item() == pytest.approx(1.0, rel=1e-6)


def test_ratio_is_a_moving_average_of_cka():
    torch.manual_seed(0)
    dpk = DPKLoss([3, 4], [5, 6], momentum=0.9, r_init=0.5, seed=0)
    assert dpk.ratios == [0.5, 0.5]
    expect = [0.5, 0.5]
    for step in range(3):
        s = [feats(c=3, seed=10 + step), feats(c=4, seed=20 + step)]
        t = [feats(c=5, seed=30 + step), feats(c=6, seed=40 + step)]
        dpk(s, t)
        expect = [0.9 * r + 0.1 * cka_by_hand(a, b) for r, a, b in zip(expect, s, t)]
        np.testing.assert_allclose(dpk.ratios, expect, rtol=1e-5)
    dpk.eval()  # evaluation leaves r alone
    dpk([feats(c=3), feats(c=4)], [feats(c=5), feats(c=6)])
    np.testing.assert_allclose(dpk.ratios, expect, rtol=1e-5)
    # r is a buffer: saved with the module
    assert "r" in dpk.state_dict()


def test_identical_features_drive_r_towards_one():
    dpk = DPKLoss([4], [4], momentum=0.9, r_init=0.5, seed=0)
    f = feats(c=4)
    for _ in range(10):
        dpk([f], [f.clone()])
    assert dpk.ratios[0] == pytest.approx(1 - 0.5 * 0.9**10, rel=1e-5)


# ------------------------------------------------------------------------------ the mask
@pytest.mark.parametrize("r", [0.1, 0.5, 0.8])
def test_mask_takes_the_teacher_with_probability_one_minus_r(r):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.zeros(64, 3, 16, 16), torch.ones(64, 3, 16, 16)
    hybrid, mask = mix_features(student, teacher, 1 - r, generator=g)
    # the mask is spatial: every channel of a position comes from the same model
    assert torch.equal(hybrid, mask.expand_as(hybrid))
    n = mask.numel()
    frac = mask.mean().item()
    assert abs(frac - (1 - r)) < 5 * math.sqrt(r * (1 - r) / n)  # 5 binomial standard errors
    # seeded: the same generator state gives the same mask
    again, _ = mix_features(student, teacher, 1 - r, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, hybrid)


def test_forward_masks_with_one_minus_r():
    # r = 1 gives the student everything (no gradient reaches the projection); r = 0 gives the
    # teacher everything (no gradient reaches the student).
    for r, student_grad, proj_grad in ((1.0, True, False), (0.0, False, True)):
        dpk = DPKLoss([4], [6], r_init=r, seed=0).eval()  # eval: r stays as set
        fs = feats(c=4).requires_grad_()
        dpk([fs], [feats(c=6, seed=1)]).backward()
        assert (fs.grad.abs().sum() > 0) == student_grad
        assert (dpk.proj[0].weight.grad.abs().sum() > 0) == proj_grad


def test_seeded_losses_are_reproducible():
    s, t = [feats(c=4)], [feats(c=6, seed=1)]
    torch.manual_seed(0)
    a = DPKLoss([4], [6], seed=3)
    torch.manual_seed(0)
    b = DPKLoss([4], [6], seed=3)
    assert torch.equal(a(s, t), b(s, t))


# ------------------------------------------------------------------------------ gradients
def test_gradients_reach_student_and_dpk_modules_not_teacher():
    dpk = DPKLoss([4, 8], [6, 12], seed=0)
    fs = [feats(c=4).requires_grad_(), feats(c=8, h=3, w=3, seed=1).requires_grad_()]
    ft = [feats(c=6, seed=2).requires_grad_(), feats(c=12, h=3, w=3, seed=3).requires_grad_()]
    loss = dpk(fs, ft)
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    for f in fs:
        assert f.grad is not None and f.grad.abs().sum() > 0
    for f in ft:
        assert f.grad is None  # teacher features are detached
    for name, p in dpk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_teacher_features_from_inference_mode_are_accepted():
    dpk = DPKLoss([4], [6], seed=0)
    with torch.inference_mode():
        ft = feats(c=6, seed=1) * 1.0
    fs = feats(c=4).requires_grad_()
    dpk([fs], [ft]).backward()
    assert fs.grad is not None and dpk.proj[0].weight.grad is not None


def test_loss_is_the_sum_of_stage_mse_to_the_teacher():
    dpk = DPKLoss([4, 4], [6, 6], seed=0).eval()
    fs, ft = [feats(c=4), feats(c=4, seed=1)], [feats(c=6, seed=2), feats(c=6, seed=3)]
    with torch.no_grad():
        total = dpk(fs, ft)
        g = torch.Generator().manual_seed(0)
        want = 0.0
        for i in range(2):
            hybrid, _ = mix_features(fs[i], dpk.proj[i](ft[i]), 1 - dpk.r[i], generator=g)
            want = want + ((dpk.gen[i](hybrid) - ft[i]) ** 2).mean()
    torch.testing.assert_close(total, want)


def test_larger_teacher_maps_are_pooled_and_bad_shapes_named():
    dpk = DPKLoss([4], [6], seed=0)
    assert dpk([feats(c=4, h=4, w=4)], [feats(c=6, h=8, w=8)]).item() > 0
    with pytest.raises(ValueError, match="integer multiple"):
        dpk([feats(c=4, h=4, w=4)], [feats(c=6, h=6, w=6)])
    with pytest.raises(ValueError, match="channels"):
        dpk([feats(c=5)], [feats(c=6)])
    with pytest.raises(ValueError, match="1 stages"):
        dpk([feats(c=4)] * 2, [feats(c=6)] * 2)
    with pytest.raises(ValueError, match="one channel count per stage"):
        DPKLoss([4, 4], [6])
    with pytest.raises(ValueError, match="momentum"):
        DPKLoss([4], [6], momentum=1.0)


# ------------------------------------------------------------------------------ hooks and stages
class TinyCNN(nn.Module):
    def __init__(self, width=4, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_feature_hooks_capture_named_stages():
    torch.manual_seed(0)
    model = TinyCNN()
    x = torch.randn(2, 1, 8, 8)
    with FeatureHooks(model, ["layer1", "layer2"]) as hooks:
        with pytest.raises(RuntimeError, match="no output"):
            hooks.features
        model(x)
        f1, f2 = hooks.features
        torch.testing.assert_close(f1, model.layer1(model.stem(x)))
        torch.testing.assert_close(f2, model.layer2(f1))
    assert not model.layer1._forward_hooks  # removed on exit
    with pytest.raises(ValueError, match="no sub-module"):
        FeatureHooks(model, ["layer9"])
    assert feature_channels(model, ["layer1", "layer2"], x) == [4, 8]
    assert model.training  # restored


def test_default_stages_of_builtin_resnets():
    models = pytest.importorskip("fastkd.models")
    for name in ("fastkd:resnet8", "fastkd:resnet8x4"):
        model = models.create_model(name, num_classes=5)
        stages = default_stages(name)
        channels = feature_channels(model, stages, torch.randn(2, 3, 32, 32))
        assert len(channels) == len(stages) == 3
    with pytest.raises(ValueError, match="no default DPK stages"):
        default_stages("timm:vit_tiny_patch16_224")
    for name in ("timm:resnet18", "torchvision:resnet18"):  # the stage names exist in those models
        modules = dict(models.create_model(name, num_classes=5).named_modules())
        assert default_stages(name) == ["layer1", "layer2", "layer3", "layer4"]
        assert all(stage in modules for stage in default_stages(name))


def test_tiny_dpk_run_lowers_the_loss():
    """A real run: a student CNN and the DPK modules trained with DPK alone halve the loss."""
    torch.manual_seed(0)
    teacher, student = TinyCNN(width=8).eval(), TinyCNN(width=4)
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.randn(16, 1, 8, 8)
    stages = ["layer1", "layer2"]
    dpk = DPKLoss(feature_channels(student, stages, x), feature_channels(teacher, stages, x), seed=0)
    opt = torch.optim.Adam(list(student.parameters()) + list(dpk.parameters()), lr=1e-2)
    with FeatureHooks(student, stages) as hs, FeatureHooks(teacher, stages) as ht:
        with torch.no_grad():
            teacher(x)
        t_feats = [f.clone() for f in ht.features]
        losses = []
        for _ in range(40):
            student(x)
            loss = dpk(hs.features, t_feats)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(0 <= r <= 1 for r in dpk.ratios)


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
def test_dpk_on_cuda_matches_cpu_ratio_and_mask_rate():
    s, t = [feats(b=32, c=8, h=8, w=8)], [feats(b=32, c=16, h=8, w=8, seed=1)]
    cpu, gpu = DPKLoss([8], [16], seed=0), DPKLoss([8], [16], seed=0).cuda()
    cpu(s, t)
    fs = s[0].cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = gpu([fs], [t[0].cuda()])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert fs.grad is not None and all(p.grad is not None for p in gpu.parameters())
    np.testing.assert_allclose(gpu.ratios, cpu.ratios, rtol=1e-4)
    g = torch.Generator(device="cuda").manual_seed(0)
    _, mask = mix_features(torch.zeros(64, 1, 32, 32, device="cuda"), torch.ones(64, 1, 32, 32, device="cuda"),
                           0.3, generator=g)
    assert abs(mask.mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / mask.numel())


def test_cka_ratio_is_computed_in_fp32_under_autocast():
    # bf16 autocast would run linear_cka's matmuls in bf16 (issue 11 item 8): r must match fp32.
    s, t = [feats(b=8, c=16, h=6, w=6, seed=50)], [feats(b=8, c=16, h=6, w=6, seed=51) + feats(b=8, c=16, h=6,
                                                                                               w=6, seed=50)]
    plain, under = DPKLoss([16], [16], seed=0), DPKLoss([16], [16], seed=0)
    plain(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under(s, t)
    expect = 0.9 * 0.5 + 0.1 * cka_by_hand(s[0], t[0])
    assert plain.ratios[0] == pytest.approx(expect, rel=1e-6)
    assert under.ratios[0] == pytest.approx(expect, rel=1e-6)
