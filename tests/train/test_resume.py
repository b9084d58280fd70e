"""Resume acceptance: SIGTERM after "step k", --resume, and the final weights equal an uninterrupted run;
plus the NaN guard (a non-finite loss is skipped and counted; repeated ones stop the run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rfdetr_train.data.synthetic import generate

STEPS = 6
# seg-tiny at a tiny size, few steps: the whole file stays within a few CPU-seconds of training.
CONFIG = """\
train:
  steps: {steps}
  batch_size: 2
  resolution: 64
  steps_per_validation: 4
  log_every: 1
  seed: 3
  warmup_steps: 2
  progress: false
data:
  workers: 0
  multi_scale: true
  multi_scale_steps: 1
eval:
  plots: false
  gallery_images: 0
  per_class: false
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), seed=5, sizes={"train": 6, "val": 2})


def _env():
    env = dict(os.environ)
    # one thread: bit-identical CPU kernels in every process, and no oversubscription on shared CI cores
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _cmd(dataset, out, *extra):
    return [sys.executable, "-m", "rfdetr_train", "--data", str(dataset), "--model", "seg-tiny", "--output", str(out), *extra]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def _sigterm_after_step_2(cmd: list[str], process_group: bool = False) -> tuple[subprocess.Popen, str]:
    """Run ``cmd``, send SIGTERM right after its "step 2/" log line (to its whole process group with
    ``process_group``), wait for it to end; returns the process and its whole log."""
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=process_group,
    )  # fmt: skip
    seen = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 2/"):
            if process_group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline
    rest, _ = proc.communicate(timeout=600)
    return proc, "".join(seen) + rest


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted_run(dataset, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.format(steps=STEPS))
    out = tmp_path / "runs"
    full = subprocess.run(
        _cmd(dataset, out, "--name", "full", "--config", str(cfg)),
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert full.returncode == 0, full.stdout + full.stderr

    proc, log = _sigterm_after_step_2(_cmd(dataset, out, "--name", "cut", "--config", str(cfg)))
    assert proc.returncode == 130, log
    assert "stopped by SIGTERM" in log
    cut = out / "cut"
    state_step = int(__import__("json").loads((cut / "checkpoints/last/state.json").read_text())["step"])
    assert 2 <= state_step < STEPS, log

    resumed = subprocess.run(
        _cmd(dataset, out, "--resume", str(cut)), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"step {STEPS}/{STEPS}" in resumed.stdout

    a, b = _weights(out / "full"), _weights(cut)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ema_a, ema_b = load_file(str(out / "full" / "last.safetensors")), load_file(str(cut / "last.safetensors"))
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key
    # the interrupted run's logs hold every step once
    rows = (cut / "train_log.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, STEPS + 1))


class _NaNAt:
    """Wraps the criterion: the weighted total of the listed calls (0-based) is NaN."""

    def __init__(self, criterion, bad_calls):
        self.inner, self.bad, self.calls = criterion, set(bad_calls), 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def to(self, device):
        self.inner.to(device)
        return self

    def train(self, mode=True):
        self.inner.train(mode)
        return self

    def __call__(self, outputs, targets):
        return self.inner(outputs, targets)

    def total_loss(self, losses):
        total = self.inner.total_loss(losses)
        call, self.calls = self.calls, self.calls + 1
        return total * float("nan") if call in self.bad else total


def _train_with_nan(monkeypatch, dataset, out, bad_calls, **options):
    import rfdetr_train
    from rfdetr_train.engine import setup

    real = setup.build_criterion_for
    monkeypatch.setattr(setup, "build_criterion_for", lambda *a, **k: _NaNAt(real(*a, **k), bad_calls))
    torch.set_num_threads(1)
    return rfdetr_train.train(
        data=str(dataset), model="seg-tiny", output=str(out), resolution=64, batch_size=2, workers=0, progress=False,
        steps_per_validation=100, plots=False, gallery_images=0, per_class=False, **options,
    )  # fmt: skip


def test_nan_loss_is_skipped_and_counted(monkeypatch, dataset, tmp_path):
    result = _train_with_nan(monkeypatch, dataset, tmp_path, bad_calls={1}, steps=3, log_every=1)
    assert result.stopped == "completed" and result.step == 3
    assert result.skipped_steps == 1
    log = (result.run_dir / "train_log.csv").read_text().splitlines()
    header = log[0].split(",")
    skipped = [int(r.split(",")[header.index("skipped_steps")]) for r in log[1:]]
    assert skipped == [0, 1, 1]
    # the optimiser stepped only twice and the weights stayed finite
    from rfdetr_train.engine.state import TrainingState

    st = TrainingState(result.run_dir / "checkpoints" / "last")
    steps_taken = {float(v["step"]) for v in st.optimizer_state()["state"].values()}
    assert steps_taken == {2.0}
    assert all(torch.isfinite(t).all() for t in st.model_state().values() if t.is_floating_point())


def test_repeated_nan_stops_with_a_clear_message(monkeypatch, dataset, tmp_path):
    from rfdetr_train.engine.guard import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match="2 optimiser steps in a row"):
        _train_with_nan(monkeypatch, dataset, tmp_path, bad_calls={0, 1, 2}, steps=5, max_nonfinite_steps=2)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_still_saves(dataset, tmp_path):
    """`timeout` and Ctrl-C signal the whole process group, loader workers included: the workers must not die
    under the main process, which finishes its step and writes the resumable checkpoint."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.format(steps=200).replace("workers: 0", "workers: 1"))
    out = tmp_path / "runs"
    proc, log = _sigterm_after_step_2(
        _cmd(dataset, out, "--name", "group", "--config", str(cfg)), process_group=True
    )
    assert proc.returncode == 130, log
    assert "stopped by SIGTERM" in log and "DataLoader worker" not in log, log
    assert (out / "group" / "checkpoints" / "last" / "state.json").is_file()
