"""The rfdetr-core sdist, and the wheel built FROM that sdist, both carry the csrc/ CUDA sources.

The sources live outside the package (top-level csrc/): a wheel-only force-include of ``../../csrc`` finds
nothing when the wheel is built from an unpacked sdist, so this goes through the sdist as pip and uv do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in {".cu", ".cpp", ".h"})


def _uv() -> str:
    uv = shutil.which("uv") or shutil.which("uv", path=os.path.dirname(sys.executable))
    if uv is None:
        pytest.skip("uv is not on PATH (the README's ./dev.sh installs it)")
    return uv


def test_sdist_and_wheel_from_sdist_carry_cuda_sources(tmp_path):
    assert any(name.endswith(".cu") for name in CSRC), "csrc/ holds no .cu file"
    uv = _uv()
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    env.pop("VIRTUAL_ENV", None)

    def run(*args):
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"

    dist = tmp_path / "dist"
    run(uv, "build", "--sdist", "--out-dir", str(dist), "packages/rfdetr-core")
    (sdist,) = dist.glob("rfdetr_core-*.tar.gz")
    with tarfile.open(sdist) as tar:
        in_sdist = {Path(n).name for n in tar.getnames() if "/src/rfdetr_core/_csrc/" in n}
    assert set(CSRC) <= in_sdist

    run(uv, "build", "--wheel", "--out-dir", str(dist), str(sdist))  # the wheel is built from the sdist
    (wheel,) = dist.glob("rfdetr_core-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = {Path(n).name for n in whl.namelist() if n.startswith("rfdetr_core/_csrc/")}
    assert set(CSRC) <= in_wheel


def test_wheel_built_from_the_checkout_carries_cuda_sources(tmp_path):
    uv = _uv()
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    env.pop("VIRTUAL_ENV", None)
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(dist), "packages/rfdetr-core"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = dist.glob("rfdetr_core-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = {Path(n).name for n in whl.namelist() if n.startswith("rfdetr_core/_csrc/")}
    assert set(CSRC) <= in_wheel
