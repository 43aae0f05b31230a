"""TolerantTeacherLoss (moved from the engine to fastkd.losses.tolerant)."""
import pytest
import torch

from fastkd.losses import reference as ref
from fastkd.losses.tolerant import TolerantTeacherLoss


def test_tolerant_loss_matches_the_reference_and_masks_rows():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(6, 8, generator=g), torch.randint(0, 8, (6,), generator=g)
    crit = TolerantTeacherLoss(0.5, eta=0.3, k=4, label_smoothing=0.1)
    out = crit(z, None, y)
    torch.testing.assert_close(out, 0.5 * ref.tolerant_teacher_loss(z, y, 0.3, 4, 0.1))
    torch.testing.assert_close(crit.last_terms["ce"] + crit.last_terms["kd"], out / 0.5)
    valid = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    torch.testing.assert_close(crit(z, None, y, valid=valid), crit(z[valid], None, y[valid]))
    zg = z.clone().requires_grad_()
    none = crit(zg, None, y, valid=torch.zeros(6, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.equal(zg.grad, torch.zeros_like(z))
    assert not crit.needs_teacher


def test_tolerant_loss_bad_input():
    with pytest.raises(ValueError, match="k must be >= 2"):
        TolerantTeacherLoss(1.0, 0.5, k=1)
    with pytest.raises(ValueError, match="k=9 needs at least 9 classes"):
        TolerantTeacherLoss(1.0, 0.5, k=9)(torch.randn(2, 8), None, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="eta must be a number"):
        TolerantTeacherLoss(1.0, "0.5")
