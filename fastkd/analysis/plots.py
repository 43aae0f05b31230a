"""PNG plots of the dark-knowledge metrics (matplotlib, imported inside the functions).

Figures are drawn with matplotlib's object API on an Agg canvas (``matplotlib.figure.Figure``),
never through ``pyplot``: no global backend is switched and no window can open, so this works on
headless machines and inside a user's notebook alike.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .. import _compat

__all__ = ["require_matplotlib", "plot_metrics_vs_temperature", "plot_matrix", "plot_lines", "METRIC_LABELS"]

METRIC_LABELS = {
    "wrong_mean": "wrong-class mean probability",
    "wrong_std": "wrong-class standard deviation",
    "wrong_var": "wrong-class variance",
    "wrong_entropy": "entropy of renormalised wrong classes (nats)",
    "target_prob": "target probability q_y",
}


def require_matplotlib() -> None:
    """Raise a clear ImportError when matplotlib is missing (call before long computations)."""
    if not _compat.has_module("matplotlib"):
        raise ImportError("plots need matplotlib, a dependency of fastkd: pip install matplotlib (or reinstall fastkd)")


def _figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_metrics_vs_temperature(teachers: Mapping[str, dict], out_dir, metrics: Sequence[str] = tuple(METRIC_LABELS),
                                prefix: str = "temperature_") -> list[Path]:
    """One PNG per metric: the metric against temperature, one line per teacher.

    ``teachers`` maps a label to a :meth:`TeacherMeter.result` dict. ATS settings (not a single
    temperature) are drawn as dashed horizontal lines in the teacher's colour. The variance and
    mean span decades, so those use a log y-axis. Returns the written paths.
    """
    paths = []
    for metric in metrics:
        fig = _figure(6.0, 4.0)
        ax = fig.add_subplot()
        log_y = metric in ("wrong_var", "wrong_mean", "wrong_std")
        for i, (label, res) in enumerate(teachers.items()):
            color = f"C{i % 10}"
            points = sorted((s["temperature"], s[metric]) for s in res["settings"].values() if s["kind"] == "temperature")
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", color=color, label=label)
            for name, s in res["settings"].items():
                if s["kind"] == "ats":
                    ax.axhline(s[metric], color=color, linestyle="--", linewidth=1, label=f"{label} {name}")
        ax.set_xscale("log", base=2)
        if log_y and all(s[metric] > 0 for r in teachers.values() for s in r["settings"].values()):
            ax.set_yscale("log")
        ax.set_xlabel("temperature T")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(f"{METRIC_LABELS.get(metric, metric)} vs temperature")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        paths.append(_save(fig, Path(out_dir) / f"{prefix}{metric}.png"))
    return paths


def plot_matrix(matrix: Sequence[Sequence[float]], labels: Sequence[str], path, title: str,
                colorbar_label: str = "", vmin: Optional[float] = None, vmax: Optional[float] = None) -> Path:
    """A square heat map with each cell's value written in it (NaN cells stay blank)."""
    n = len(labels)
    fig = _figure(1.6 + 0.9 * n, 1.2 + 0.8 * n)
    ax = fig.add_subplot()
    im = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    lo, hi = im.get_clim()
    for i in range(n):
        for j in range(n):
            value = matrix[i][j]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            dark = (value - lo) / ((hi - lo) or 1.0) < 0.6
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize="small",
                    color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label=colorbar_label)
    ax.set_title(title)
    return _save(fig, path)


def plot_lines(x: Sequence[float], series: Mapping[str, Sequence[float]], path, *, xlabel: str, ylabel: str,
               title: str, log_x: bool = False, log_y: bool = False, baseline: Optional[tuple[str, float]] = None
               ) -> Path:
    """Several named series against one x axis; ``baseline=(label, y)`` adds a dotted reference line."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for i, (label, ys) in enumerate(series.items()):
        ax.plot(x, ys, marker="o", color=f"C{i % 10}", label=label)
    if baseline is not None:
        ax.axhline(baseline[1], color="grey", linestyle=":", label=baseline[0])
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(x), [f"{v:g}" for v in x])
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_ats_grid(on_top: Mapping[str, float], path, *, title: str, flip_mark: float = 0.05) -> Path:
    """Heat map of the fraction of rows whose ATS soft label keeps the label on top, over the
    ``"t1,t2"`` grid (tau_target rows, tau_other columns); points that flip more than
    ``flip_mark`` of the labels are outlined in red and marked with '!'."""
    t1s = sorted({float(k.split(",")[0]) for k in on_top})
    t2s = sorted({float(k.split(",")[1]) for k in on_top})
    grid = [[on_top.get(f"{a:g},{b:g}", math.nan) for b in t2s] for a in t1s]
    fig = _figure(1.8 + 0.75 * len(t2s), 1.4 + 0.6 * len(t1s))
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, origin="lower")
    ax.set_xticks(range(len(t2s)), [f"{b:g}" for b in t2s])
    ax.set_yticks(range(len(t1s)), [f"{a:g}" for a in t1s])
    ax.set_xlabel("tau2 (other classes)")
    ax.set_ylabel("tau1 (label)")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if isinstance(value, float) and math.isnan(value):
                continue
            flips = 1.0 - value > flip_mark
            ax.text(j, i, f"{value:.3f}" + ("!" if flips else ""), ha="center", va="center", fontsize="small",
                    color="white" if value < 0.6 else "black")
            if flips:
                ax.add_patch(_rect(j, i))
    fig.colorbar(im, ax=ax, label="label on top (fraction of rows)")
    ax.set_title(title + f"\n(red: > {flip_mark:.0%} of labels flipped)", fontsize="medium")
    return _save(fig, path)


def _rect(j: int, i: int):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
