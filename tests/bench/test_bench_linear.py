"""``fastkd bench linear`` without a GPU: argument checks, and a dry run whose variants each run
in their own process and report numbers (or why not)."""
import json

import pytest

from fastkd.bench import linear as BL


def test_shapes_and_variants_parse_with_clear_errors():
    assert BL.parse_shapes("8192x4096x128256, 64x16X500") == [(8192, 4096, 128256), (64, 16, 500)]
    with pytest.raises(ValueError, match="is not NxHxV"):
        BL.parse_shapes("8192x4096")
    with pytest.raises(ValueError, match="V >= 2"):
        BL.parse_shapes("8x4x1")
    assert BL.parse_variants("fastkd,liger") == ["fastkd", "liger"]
    with pytest.raises(ValueError, match="unknown variant"):
        BL.parse_variants("fastkd,apex")


def test_bad_flag_is_one_line(run_fastkd):
    proc = run_fastkd(["bench", "linear", "--shapes", "12x3", "--dry-run"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("fastkd bench linear: error: shape '12x3' is not NxHxV "
                                   "(three integers joined by 'x')")


@pytest.mark.slow
def test_dry_run_measures_each_variant_in_its_own_process(run_fastkd, tmp_path):
    res, md = tmp_path / "linear.jsonl", tmp_path / "linear.md"
    proc = run_fastkd(["bench", "linear", "--dry-run", "--repeats", "1", "--shapes", "40x8x300",
                       "--variants", "torch-full,fastkd,liger", "--results", str(res), "--markdown", str(md)])
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["torch-full", "fastkd", "liger"]
    full, fused = rows[0], rows[1]
    assert full["ms"] > 0 and fused["ms"] > 0 and fused["chunk"] == 40
    assert abs(full["loss"] - fused["loss"]) <= 1e-5 * abs(full["loss"])  # the same loss on the same inputs
    assert rows[2]["skipped"] in ("Liger-Kernel's Triton kernels need CUDA", "Liger-Kernel is not installed")
    text = md.read_text()
    assert text.startswith("Measured: ") and "| 40 x 8 x 300 | fastkd |" in text
