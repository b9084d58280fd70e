"""Resumable state files (safetensors + JSON), the atomic folder swap, run directories and --resume paths."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from rfdetr_core.errors import RFDETRError
from rfdetr_train.engine.run_dir import ResumeError, new_run_dir, resolve_resume
from rfdetr_train.engine.state import TrainingState, capture_rng, write_state_folder


def _trained_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(
        [{"params": [model.weight], "base_lr": 0.1, "name": "w"}, {"params": [model.bias], "base_lr": 0.2}],
        lr=0.1,
    )
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
    return model, opt


def test_state_folder_roundtrip(tmp_path):
    model, opt = _trained_optimizer()
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    rng = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    last = tmp_path / "run" / "checkpoints" / "last"
    write_state_folder(
        last,
        model_state=model.state_dict(),
        optimizer=opt,
        ema_state={k: v * 2 for k, v in model.state_dict().items()},
        rng_per_rank=[rng],
        state={"step": 3, "sampler": {"epoch": 1, "position": 7}},
    )
    # a second save swaps the folder and leaves no temporary copies behind
    write_state_folder(
        last,
        model_state=model.state_dict(),
        optimizer=opt,
        ema_state=None,
        rng_per_rank=[rng],
        state={"step": 4},
    )
    assert sorted(p.name for p in last.parent.iterdir()) == ["last"]
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in last.iterdir())

    st = TrainingState(last)
    assert st.state["step"] == 4 and st.ema_state() is None
    for k, v in model.state_dict().items():
        assert torch.equal(st.model_state()[k], v)
    fresh_model = nn.Linear(3, 2)
    fresh = torch.optim.AdamW(
        [
            {"params": [fresh_model.weight], "base_lr": 0.1, "name": "w"},
            {"params": [fresh_model.bias], "base_lr": 0.2},
        ],
        lr=0.1,
    )
    fresh.load_state_dict(st.optimizer_state())
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key in a["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key])
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    assert st.restore_rng(0)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(2), expected[2])
    assert not st.restore_rng(1)


def test_run_dirs_and_resume_resolution(tmp_path):
    runs = tmp_path / "runs"
    first = new_run_dir(runs, None)
    second = new_run_dir(runs, None)
    assert (first.name, second.name) == ("train", "train2")
    named = new_run_dir(runs, "exp")
    (named / "x").write_text("1")
    with pytest.raises(RFDETRError, match="already exists"):
        new_run_dir(runs, "exp")
    with pytest.raises(ResumeError, match="no run"):
        resolve_resume("", runs)
    for i, run in enumerate((first, second)):
        last = run / "checkpoints" / "last"
        last.mkdir(parents=True)
        (last / "state.json").write_text(json.dumps({"step": i}))
    assert resolve_resume("", runs) == second / "checkpoints" / "last"
    assert resolve_resume(str(first), runs) == first / "checkpoints" / "last"
    assert resolve_resume(str(first / "checkpoints" / "last"), runs) == first / "checkpoints" / "last"
    weights = first / "best.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ResumeError, match="--weights"):
        resolve_resume(str(weights), runs)
    with pytest.raises(ResumeError, match="no resumable"):
        resolve_resume(str(named), runs)
    # a crash in the middle of a folder swap leaves only .last.old: resume uses it
    (second / "checkpoints" / "last").rename(second / "checkpoints" / ".last.old")
    assert resolve_resume(str(second), runs) == second / "checkpoints" / ".last.old"
