"""Run outputs: a JSON-lines metrics file, TensorBoard when installed, a progress bar on a terminal
(plain progress lines off one).

Only the main process (rank 0) writes. ``metrics.jsonl`` has one JSON object per line with a
``"kind"``: ``"step"`` (every ``--log-interval`` steps: loss, lr, images/s) or ``"epoch"`` (the
full epoch summary: train loss, validation top-1/top-5, teacher top-1, agreement, KL,
images/s, the step-time breakdown).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

from .. import _compat

logger = logging.getLogger("fastkd")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible instead of dropping them
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsLogger:
    def __init__(self, output_dir, enabled: bool = True, tensorboard: bool = True, append: bool = False):
        """``append``: continue the file of a resumed run; otherwise start it afresh."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._fh = open(self.path, "a" if append else "w") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            if _compat.has_module("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            else:
                _compat.log_once("fastkd: TensorBoard is not installed; metrics go to metrics.jsonl only")

    def write(self, kind: str, record: dict, step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(_clean({"kind": kind, **record})) + "\n")
        self._fh.flush()
        if self._tb is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
                elif isinstance(value, dict):
                    for k2, v2 in value.items():
                        if isinstance(v2, (int, float)):
                            self._tb.add_scalar(f"{kind}/{key}/{k2}", v2, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path, kind: Optional[str] = None) -> list[dict]:
    """Records of a metrics.jsonl file (optionally only one kind)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


class Progress:
    """A tqdm bar on a terminal; off a terminal (CI, nohup, a log file) a plain log line at each
    logging boundary: the engine passes the loss and LR there (``update(0, loss=..., lr=...)``),
    and the line is written once that step is counted. Main process only; nothing otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool, initial: int = 0):
        import time

        self.bar = None
        self.plain = False
        self.total, self.desc, self.n = total, desc, initial
        self._pending: Optional[dict] = None
        self._t0, self._n0, self._clock = time.perf_counter(), initial, time.perf_counter
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False)
        elif enabled:
            self.plain = True

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.plain:
            self.n += n
            if postfix:
                self._pending = postfix
            if self._pending is not None and n > 0:
                elapsed = self._clock() - self._t0
                rate = (self.n - self._n0) / elapsed if elapsed > 0 else 0.0
                values = "  ".join(f"{k} {v}" for k, v in self._pending.items())
                logger.info("%s  step %d/%d  %s  (%.1f s, %.2f steps/s)", self.desc, self.n, self.total, values,
                            elapsed, rate)
                self._pending = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
