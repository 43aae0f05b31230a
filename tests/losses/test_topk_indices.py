"""Out-of-range class indices in a TopKTeacher (the API, or a damaged cache) are refused with a
one-line ValueError naming the row and the index, not PyTorch's raw scatter_ error (a device
assert on CUDA); check_labels=False skips the check with the label check (no host sync)."""
import pytest
import torch

import fastkd
from fastkd.losses.compressed import TopKTeacher, check_topk_indices, compress_topk, densify


def _bad_topk(value, row=2, n=4, c=6, k=2):
    torch.manual_seed(0)
    v, y = torch.randn(n, c), torch.arange(n) % c
    t = compress_topk(v, y, k)
    idx = t.indices.clone()
    idx[row, 1] = value
    return t._replace(indices=idx), v, y


@pytest.mark.parametrize("value", [6, 1000, -1])
@pytest.mark.parametrize("call", ["kd", "dkd", "dist", "module", "densify"])
def test_out_of_range_topk_indices_are_refused_in_one_line(value, call):
    t, v, y = _bad_topk(value)
    z = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(ValueError) as info:
        if call == "kd":
            fastkd.kd_loss(z, t, temperature=1.0, target=y)
        elif call == "dkd":
            fastkd.dkd_loss(z, t, y)
        elif call == "dist":
            fastkd.dist_loss(z, t, target=y)
        elif call == "module":
            fastkd.DistillLoss("kd")(z, t, y)
        else:
            densify(t, y)
    msg = str(info.value)
    assert "\n" not in msg and f"row 2 holds class index {value}, outside [0, 6)" in msg, msg


def test_valid_topk_teachers_pass_and_the_check_names_the_first_bad_row():
    t, v, y = _bad_topk(3)  # in range
    check_topk_indices(t)
    z = torch.randn(4, 6)
    assert torch.isfinite(fastkd.kd_loss(z, t, temperature=1.0, target=y))
    empty = TopKTeacher(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), torch.zeros(0), 6)
    check_topk_indices(empty)
    t, _, _ = _bad_topk(9, row=0)
    with pytest.raises(ValueError, match="row 0 holds class index 9"):
        check_topk_indices(t)
