"""The built wheel ships fastkd/kernels/ and no top-level ``kernels`` (which would shadow the
unrelated PyPI package of that name)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("fastkd", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (whl,) = out.glob("fastkd-*.whl")
    return whl


def test_wheel_has_fastkd_kernels_and_no_top_level_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastkd/kernels/__init__.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
    assert {n.split("/")[0] for n in names if not n.startswith("fastkd-")} == {"fastkd"}
    for sub in ("losses", "engine", "data", "analysis", "models", "bench"):
        assert f"fastkd/{sub}/__init__.py" in names, sub


def test_wheel_ships_the_data_the_demo_and_presets_read(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastkd/data/assets/animal_mnist.npz" in names and "fastkd/data/assets/LICENSE-animal-mnist.txt" in names
    assert any(n.startswith("fastkd/configs/") and n.endswith(".yaml") for n in names)


def test_wheel_declares_console_script_and_extras(wheel):
    z = zipfile.ZipFile(wheel)
    (ep,) = [n for n in z.namelist() if n.endswith("entry_points.txt")]
    assert "fastkd = fastkd.cli:main" in z.read(ep).decode()
    (meta,) = [n for n in z.namelist() if n.endswith("METADATA")]
    text = z.read(meta).decode()
    for extra in ("dali", "dali-cu12", "models", "dev", "all"):
        assert f"Provides-Extra: {extra}" in text
    assert "nvidia-dali-cuda130" in text and "nvidia-dali-cuda120" in text
