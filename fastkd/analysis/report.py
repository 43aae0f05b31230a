"""Dark-knowledge reports: :func:`analyze` streams a data set through teachers and returns their
metrics (per teacher, per soft label; per pair of teachers), :func:`write_outputs` writes them
(``metrics.json``, ``metrics.csv``, ``pairs.csv``, ``report.md``, PNG plots) and
:func:`format_report` renders the Markdown. ``fastkd analyze`` (:mod:`fastkd.analysis.cli`), the
capacity study and the demo call them.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from itertools import combinations
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from . import metrics as M

logger = logging.getLogger("fastkd")

__all__ = ["analyze", "pair_matrix", "format_report", "format_ats_regime", "write_outputs", "json_safe", "FLIP_MARK"]


# --------------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def analyze(models: Mapping[str, nn.Module], batches: Iterable, soft_labels: Sequence[M.SoftLabel], *,
            device: torch.device, kl_temperature: float = 1.0, ats_grid: Optional[tuple] = None) -> dict:
    """Stream ``batches`` (:class:`fastkd.data.Batch`, or ``(images, labels)`` pairs) through
    every model and return ``{"teachers": {...}, "pairs": [...]}``.

    Models are put in eval mode. Logits are measured in float64 (:mod:`fastkd.analysis.metrics`).
    Rows a sharded loader flags as padding (``Batch.valid`` False) are repeats and are left out.
    ``ats_grid=(tau_targets, tau_others)`` adds, per teacher, the ATS regime diagnostic
    (:class:`fastkd.analysis.metrics.LabelOnTopMeter`): ``ats_label_on_top`` keyed ``"t1,t2"`` and
    the quantiles of (largest wrong logit) / (target logit) of the row-centred logits.
    """
    labels = list(models)
    meters = {k: M.TeacherMeter(soft_labels) for k in labels}
    on_top = {k: M.LabelOnTopMeter(*ats_grid) for k in labels} if ats_grid is not None else {}
    pairs = {(a, b): M.PairMeter(kl_temperature) for a, b in combinations(labels, 2)}
    for m in models.values():
        m.eval()
    for batch in batches:
        if hasattr(batch, "images"):
            images, target, valid = batch.images, batch.labels, batch.valid
        else:
            (images, target), valid = batch, None
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True).long()
        if valid is not None:
            valid = valid.to(device)
            images, target = images[valid], target[valid]
        logits = {k: models[k](images).float() for k in labels}
        for k in labels:
            meters[k].update(logits[k], target)
            if on_top:
                on_top[k].update(logits[k], target)
        for (a, b), meter in pairs.items():
            meter.update(logits[a], logits[b], target)
    teachers = {k: meters[k].result() for k in labels}
    for k, meter in on_top.items():
        teachers[k].update(meter.result())
    return {
        "teachers": teachers,
        "pairs": [{"a": a, "b": b, **meter.result()} for (a, b), meter in pairs.items()],
    }


def pair_matrix(results: dict, key: str = "spearman") -> tuple[list[str], list[list[float]]]:
    """Symmetric teachers x teachers matrix of a pair statistic (1 on the diagonal)."""
    labels = list(results["teachers"])
    idx = {k: i for i, k in enumerate(labels)}
    mat = [[1.0 if i == j else math.nan for j in range(len(labels))] for i in range(len(labels))]
    for p in results["pairs"]:
        i, j = idx[p["a"]], idx[p["b"]]
        mat[i][j] = mat[j][i] = p[key]
    return labels, mat


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------
def _fmt(x) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:.4g}" if (x == 0 or 1e-3 <= abs(x) < 1e4) else f"{x:.3e}"
    return str(x)


def format_report(results: dict, title: str = "Dark-knowledge analysis") -> str:
    """Markdown: one row per (teacher, soft label), then one row per pair of teachers."""
    lines = [f"# {title}", ""]
    cfg = results.get("config", {})
    if cfg:
        lines += [", ".join(f"{k}: {v}" for k, v in cfg.items() if not isinstance(v, (list, dict))), ""]
    # Decoders differ slightly (DALI vs PIL): an accuracy names the loader that read the images.
    read_by = f" ({cfg['loader']} loader, {cfg['decoder']})" if cfg.get("loader") else ""
    head = ["teacher", "accuracy" + read_by, "soft label"] + list(M.METRICS)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, res in results["teachers"].items():
        for name, s in res["settings"].items():
            row = [label, f"{res['accuracy']:.4f}", name] + [_fmt(s[m]) for m in M.METRICS]
            lines.append("| " + " | ".join(row) + " |")
    lines += format_ats_regime(results)
    if results["pairs"]:
        kl_t = results["pairs"][0]["kl_temperature"]
        head = ["teacher A", "teacher B", "wrong-class Spearman", "rows (undefined)", "top-1 agreement",
                f"KL(A||B) T={kl_t:g}", f"KL(B||A) T={kl_t:g}"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in results["pairs"]:
            row = [p["a"], p["b"], _fmt(p["spearman"]), f"{p['spearman_rows']} ({p['spearman_undefined']})",
                   f"{p['top1_agreement']:.4f}", _fmt(p["kl_ab"]), _fmt(p["kl_ba"])]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


FLIP_MARK = 0.05  # grid points that flip more than this share of the labels are marked


def format_ats_regime(results: dict) -> list[str]:
    """Markdown lines of the ATS regime diagnostic (empty when it was not computed)."""
    teachers = {k: t for k, t in results["teachers"].items() if "ats_label_on_top" in t}
    if not teachers:
        return []
    lines = ["", "ATS regime (docs/methods.md §3): for row-centred logits, ATS(tau1, tau2) keeps the label as the "
             "arg-max of its soft label only while (largest wrong logit) / (target logit) < tau2 / tau1.", "",
             "| teacher | ratio q05 | q25 | median | q75 | q95 | rows with centred target <= 0 |",
             "|---|---|---|---|---|---|---|"]
    for k, t in teachers.items():
        r = t["wrong_target_ratio"]
        lines.append(f"| {k} | " + " | ".join(_fmt(r[q]) for q in ("q05", "q25", "q50", "q75", "q95"))
                     + f" | {r['nonpositive_target']:.4f} |")
    for k, t in teachers.items():
        grid = t["ats_label_on_top"]
        t1s = sorted({float(g.split(",")[0]) for g in grid})
        t2s = sorted({float(g.split(",")[1]) for g in grid})
        lines += ["", f"{k}: fraction of rows whose ATS soft label keeps the label on top "
                  f"(rows tau1, columns tau2; '!' flips more than {FLIP_MARK:.0%})", "",
                  "| tau1 \\ tau2 | " + " | ".join(f"{b:g}" for b in t2s) + " |", "|---" * (len(t2s) + 1) + "|"]
        for a in t1s:
            cells = []
            for b in t2s:
                f = grid[M.grid_key(a, b)]
                cells.append(f"{f:.4f}" + (" !" if 1 - f > FLIP_MARK else ""))
            lines.append(f"| {a:g} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(results: dict, out_dir, *, plots: bool = True, title: str = "Dark-knowledge analysis"
                  ) -> list[Path]:
    """Write metrics.json, metrics.csv, pairs.csv, report.md and (``plots``) the PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    path = out / "metrics.json"
    # NaN is not JSON: write null for an undefined statistic.
    path.write_text(json.dumps(json_safe(results), indent=2) + "\n")
    written.append(path)

    path = out / "metrics.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["teacher", "num_samples", "accuracy", "loader", "decoder", "soft_label", "kind", "temperature",
                    "tau_target", "tau_other", *M.METRICS])
        cfg = results.get("config", {})
        for label, res in results["teachers"].items():
            for name, s in res["settings"].items():
                w.writerow([label, res["num_samples"], res["accuracy"], cfg.get("loader", ""), cfg.get("decoder", ""),
                            name, s["kind"], s.get("temperature", ""),
                            s.get("tau_target", ""), s.get("tau_other", ""), *(s[m] for m in M.METRICS)])
    written.append(path)

    path = out / "pairs.csv"
    keys = ["a", "b", "num_samples", "spearman", "spearman_rows", "spearman_undefined", "top1_agreement",
            "kl_ab", "kl_ba", "kl_temperature"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for p in results["pairs"]:
            w.writerow([p[k] for k in keys])
    written.append(path)

    path = out / "report.md"
    path.write_text(format_report(results, title))
    written.append(path)

    if plots:
        from . import plots as P

        written += P.plot_metrics_vs_temperature(results["teachers"], out)
        if len(results["teachers"]) > 1:
            labels, mat = pair_matrix(results, "spearman")
            written.append(P.plot_matrix(mat, labels, out / "affinity.png",
                                         "class-affinity consistency\n(mean wrong-class Spearman)",
                                         colorbar_label="Spearman", vmax=1.0))
        else:
            logger.info("one teacher: no affinity heat map (it compares pairs of teachers)")
        for label, res in results["teachers"].items():
            if "ats_label_on_top" in res:
                written.append(P.plot_ats_grid(res["ats_label_on_top"], out / f"ats_label_on_top_{_safe(label)}.png",
                                               title=f"{label}: ATS label on top", flip_mark=FLIP_MARK))
    return written


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def json_safe(obj):
    """``obj`` for JSON: NaN as None, tuples as lists, paths as strings (recursively)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
