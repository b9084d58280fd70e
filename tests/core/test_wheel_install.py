"""A wheel of rfdetr-core built through its sdist installs and imports in a clean virtual environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _uv() -> str:
    uv = shutil.which("uv") or shutil.which("uv", path=os.path.dirname(sys.executable))
    if uv is None:
        pytest.skip("uv is not on PATH (the README's ./dev.sh installs it)")
    return uv


@pytest.mark.slow
def test_core_wheel_from_sdist_installs_in_clean_venv(tmp_path):
    uv = _uv()
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    env.pop("VIRTUAL_ENV", None)

    def run(*args, cwd=ROOT):
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"
        return proc

    dist = tmp_path / "dist"
    run(uv, "build", "--sdist", "--out-dir", str(dist), "packages/rfdetr-core")
    (sdist,) = dist.glob("rfdetr_core-*.tar.gz")
    run(uv, "build", "--wheel", "--out-dir", str(dist), str(sdist))  # wheel built FROM the sdist
    (wheel,) = dist.glob("rfdetr_core-*.whl")

    venv = tmp_path / "venv"
    run(uv, "venv", "--python", sys.executable, str(venv))
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    run(uv, "pip", "install", "--python", str(py), str(wheel))
    code = (
        "import rfdetr_core, torch, numpy as np;"
        "from rfdetr_core.preprocess import preprocess;"
        "x, s = preprocess(np.zeros((10, 20, 3), np.uint8), (24, 24));"
        "assert x.shape == (1, 3, 24, 24) and s == [(10, 20)];"
        "assert 'rfdetr_train' not in __import__('sys').modules;"
        "print(rfdetr_core.__version__, rfdetr_core.__file__)"
    )
    out = run(str(py), "-c", code, cwd=tmp_path).stdout
    assert str(venv) in out  # imported from the clean venv, not the workspace
