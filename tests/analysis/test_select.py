"""Choosing ATS's temperatures on validation: the rule, the split, and that test labels are never read."""
import pytest
import torch

from fastkd.analysis.select import (ats_points, carve_validation, diagonal_points, mean_se, select_on_validation,
                                    select_point)
from fastkd.losses import DistillLoss


def test_grid_points_and_rule():
    pts = ats_points()
    assert len(pts) == 15 and all(a > b for a, b in pts) and (4.0, 2.0) in pts
    assert diagonal_points((1, 2)) == [(1.0, 1.0), (2.0, 2.0)]
    with pytest.raises(ValueError, match="tau1 > tau2"):
        ats_points((1.0,), (2.0,))
    # highest mean validation wins; a tie goes to the smaller point
    assert select_point({(4.0, 2.0): [0.5, 0.7], (3.0, 1.0): [0.6, 0.6], (2.0, 1.0): [0.1, 0.2]}) == (3.0, 1.0)
    assert mean_se([1.0, 3.0]) == (2.0, 1.0)


def test_carve_validation_is_stratified_and_disjoint():
    y = torch.arange(5).repeat_interleave(10)
    tr, va = carve_validation(y, 0.2, seed=0)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 50
    assert torch.bincount(y[va]).tolist() == [2] * 5
    assert torch.equal(carve_validation(y, 0.2, seed=0)[1], va)
    with pytest.raises(ValueError, match="fraction"):
        carve_validation(y, 1.5)


def _tiny_task(poison_test: bool):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g)
    x = torch.randn(240, 6, generator=g)
    y = (x @ w + 0.8 * torch.randn(240, 4, generator=g)).argmax(1)
    teacher = x @ w * 1.5 + 0.5  # a fixed "teacher": offset logits, so ATS's grid points differ
    x_test = torch.randn(100, 6, generator=g)
    y_test = (x_test @ w).argmax(1)
    if poison_test:
        y_test = (y_test + 1 + torch.randint(0, 3, (100,), generator=g)) % 4  # every test label wrong
    tr, va = carve_validation(y, 0.25, seed=0)
    seen = []

    def run(point, seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(6, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = DistillLoss("ats", tau_target=point[0], tau_other=point[1], backend="torch")
        for _ in range(8):
            opt.zero_grad()
            loss(model(x[tr]), teacher[tr], y[tr]).backward()
            opt.step()
        with torch.no_grad():
            val = (model(x[va]).argmax(1) == y[va]).double().mean().item()
            test = (model(x_test).argmax(1) == y_test).double().mean().item()
        seen.append(val)
        return {"val_top1": val, "test_top1": test}

    return run, seen


def test_poisoned_test_labels_do_not_change_the_selection():
    points = ats_points((2.0, 6.0), (1.0, 3.0))
    run, _ = _tiny_task(poison_test=False)
    clean = select_on_validation(run, points, seeds=(0, 1), split="25% of train, stratified")
    run, _ = _tiny_task(poison_test=True)
    poisoned = select_on_validation(run, points, seeds=(0, 1), split="25% of train, stratified")
    assert poisoned.point == clean.point and poisoned.table == clean.table
    assert poisoned.test_top1_mean < clean.test_top1_mean  # the poison did reach the test numbers
    d = clean.as_dict()
    assert d["split"] == "25% of train, stratified" and "validation" in d["rule"]
    assert (d["t1"], d["t2"]) == clean.point
    # the choice is the arg-max of the validation means
    best = max(v["val_top1_mean"] for v in clean.table.values())
    assert clean.table[f"{clean.point[0]:g},{clean.point[1]:g}"]["val_top1_mean"] == best
