"""The original project's check command, ``python scripts/train.py --steps_per_validation 20 --test_limit 20``,
run as written from the repository root: it trains on the built-in default (seg-tiny, synthetic dataset) and
prints the per-class tables of ``python -m rfdetr_train``. It is short as written: ``--test-limit`` without a
length is a quick look (20 steps, one validation); only ``--output`` is added, to keep the run out of the tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_original_check_command_trains_and_prints_per_class_tables(tmp_path):
    cmd = [sys.executable, "scripts/train.py", "--steps_per_validation", "20", "--test_limit", "20",
           "--output", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # RFDETR_HOME: the suite's own (conftest)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=850)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "training seg-tiny (scratch recipe" in out and "quick look" in out
    assert out.count("validation at step 20") == 1
    for kind in ("bbox", "segm"):
        table = out.split(f"per class ({kind}):\n", 1)[1].splitlines()
        header = "class images inst dets AP AP50 AP75 P R F1 conf"
        assert table[0].split() == header.split()
        # one row per class of the synthetic dataset, the images counted on the first 20 validation images
        rows = {line.split()[0]: line.split() for line in table[2:5]}
        assert set(rows) == {"circle", "triangle", "star"}
        assert all(1 <= int(r[1]) <= 20 and len(r) == 11 for r in rows.values())
    assert "AP50 over time" in out
    assert (tmp_path / "train" / "per_class_segm.csv").is_file()
