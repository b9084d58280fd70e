"""``rfdetr-train strip IN OUT``: inference-only copy, sizes printed, errors in one line."""

from __future__ import annotations

from pathlib import Path

from rfdetr_core.checkpoint import read_metadata
from rfdetr_train.cli import main

FIXTURE = Path(__file__).parents[1] / "core" / "fixtures" / "seg-tiny-v0.1.0.safetensors"


def test_strip_command_writes_a_smaller_file(tmp_path, capsys):
    out = tmp_path / "slim.safetensors"
    assert main(["strip", str(FIXTURE), str(out)]) == 0
    text = capsys.readouterr().out
    assert "MB ->" in text and "smaller" in text
    assert out.stat().st_size < FIXTURE.stat().st_size
    meta = read_metadata(out)
    assert meta["detr_groups"] == 1 and meta["step"] == 120 and meta["variant"] == "seg-tiny"


def test_strip_command_error_is_one_line(tmp_path, capsys):
    assert main(["strip", str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err
