"""The short table that ``benchmarks/gpu_visit.sh`` prints last, from what its steps left behind.

``python -m fastkd.bench.visit WORKDIR`` reads ``WORKDIR/steps.tsv`` (one line per step: name,
status, exit code, seconds, budget), the test logs (``*.log``: pytest's last summary line), the
kernel rows (``kernels*.json``, written by ``fastkd bench kernels --json``) and the engine rows
(``engine*.jsonl``, written by ``benchmarks/bench_engine.py --results``) and the cached-teacher
table (``cache.md``, from ``benchmarks/bench_cache.py --markdown``), and prints a Markdown
summary: what ran and how it ended, then the headline numbers. It never fails on a missing or
broken file (a step that died leaves one behind): it says what is missing instead.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_PYTEST_TAIL = re.compile(r"^=*\s*(\d+(/\d+)? (passed|failed|errors?|skipped|deselected|tests? collected).*?)\s*=*$")


def pytest_outcome(log: Path) -> str:
    """pytest's final counts line of ``log`` ('110 passed, 1 skipped in 80.1s'), or a note."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines):
        m = _PYTEST_TAIL.match(line.strip())
        if m:
            return m.group(1)
    return "no pytest summary line (killed?)"


def _steps(work: Path) -> list[list[str]]:
    path = work / "steps.tsv"
    if not path.is_file():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def _kernel_rows(work: Path) -> list[dict]:
    rows = []
    for path in sorted(work.glob("kernels*.json")):
        try:
            rows += json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError):
            continue
    return rows


def _engine_runs(work: Path) -> list[dict]:
    """Every engine record; a ``.partial`` file is what a stopped bench_engine.py had measured."""
    runs = []
    for path in sorted(work.glob("engine*.jsonl")) + sorted(work.glob("engine*.jsonl.partial")):
        for line in path.read_text().splitlines():
            try:
                runs.append(json.loads(line))
            except ValueError:
                continue
    return runs


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def summary(work) -> str:
    work = Path(work)
    out = []
    steps = _steps(work)
    env = {}
    env_file = work / "env.json"
    if env_file.is_file():
        try:
            env = json.loads(env_file.read_text())
        except ValueError:
            env = {}
    out.append(f"## GPU visit summary: {env.get('gpu', '?')}, commit {env.get('commit', '?')}, {env.get('date', '?')}"
               + (" (DRY RUN on the CPU: numbers mean nothing)" if env.get("dry_run") else ""))
    out += ["", "| step | status | seconds (budget) | result |", "|---|---|---:|---|"]
    for fields in steps:
        name, status, rc, secs, budget = (fields + ["?"] * 5)[:5]
        log = work / f"{name}.log"
        result = pytest_outcome(log) if name.endswith("tests") and status != "skipped" else ""
        out.append(f"| {name} | {status}{'' if rc in ('0', '-') else f' (rc {rc})'} | {secs} ({budget}) | {result} |")
    if not steps:
        out.append("| (no steps.tsv) | | | |")

    rows = _kernel_rows(work)
    if rows:
        out += ["", "Kernel table (fwd+bwd ms; graph = CUDA-graph replay; speed-up of fastkd vs torch.compile "
                    "of the plain fp32 loss):", "",
                "| method | N x C | fastkd ms | fastkd graph ms | compile ms | compile graph ms | eager ms | "
                "fastkd vs compile | fastkd % copy |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        by_key = {}
        for r in rows:
            by_key.setdefault((r.get("method"), r["N"], r["C"]), {})[r["impl"]] = r
        for (method, n, c), impls in by_key.items():
            f, cmp_, e = impls.get("fastkd", {}), impls.get("compile", {}), impls.get("eager", {})
            speed = f.get("vs_compile")
            pct = f.get("pct_copy")
            out.append(f"| {method} | {n} x {c} | {_ms(f.get('ms'))} | {_ms(f.get('graph_ms'))} | "
                       f"{_ms(cmp_.get('ms'))} | {_ms(cmp_.get('graph_ms'))} | {_ms(e.get('ms'))} | "
                       f"{'-' if speed is None else f'{speed:.2f}x'} | {'-' if pct is None else f'{pct:.0f} %'} |")
        liger = [r for r in rows if r["impl"].startswith("liger")]
        for r in liger:
            out.append(f"| {r.get('method')} | {r['N']} x {r['C']} | {r['impl']}: {_ms(r.get('ms'))} ms, graph "
                       f"{_ms(r.get('graph_ms'))} | | | | | | |")

    runs = _engine_runs(work)
    for run in runs:
        stopped = " (PARTIAL: the step was stopped before its last mode)" if run.get("partial") else ""
        out += ["", f"Engine ({run.get('setting', '?')}), images/s{stopped}:", "",
                "| mode | images/s | vs fair naive |", "|---|---:|---:|"]
        rows_ = run.get("rows", {})
        fair = rows_.get("naive-fair", {}).get("images_per_s")
        for mode, r in rows_.items():
            ips = r.get("images_per_s")
            if ips is None:
                out.append(f"| {mode} | {r.get('skipped') or 'failed: ' + str(r.get('error', '?'))[:80]} | |")
            else:
                out.append(f"| {mode} | {ips:.0f} | {f'{ips / fair:.2f}x' if fair else '-'} |")
        if run.get("sum_of_parts_bound"):
            out.append(f"| sum-of-parts bound | {run['sum_of_parts_bound']:.0f} | |")
        if run.get("stream_gain"):
            out.append(f"\nteacher stream's own gain (concurrent / sequential): {run['stream_gain']:.3f}x")
    cache_md = work / "cache.md"
    if cache_md.is_file():
        out += ["", "Cached teacher (benchmarks/bench_cache.py):", "", cache_md.read_text(errors="replace").strip()]
    linear_md = work / "linear.md"
    if linear_md.is_file():
        out += ["", "Fused linear distillation on an LM head (fastkd bench linear):", "",
                linear_md.read_text(errors="replace").strip()]
    if (work / "study" / "README.md").is_file():
        out += ["", "Capacity study: study/README.md in the tarball."]
    if not rows and not runs:
        out += ["", "(no kernel or engine results were written)"]
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fastkd.bench.visit WORKDIR")
        return 2
    print(summary(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
