"""Session-wide fixtures of the export tests: small checkpoints and their exports, each made once.

Exports are the slow part (torch.export + ONNX translation, tens of seconds on 2 cores), so every exported file
is made once per session through the CLI itself (``rfdetr_export.cli.main``, automatic check included) and
shared; its printed report is kept for the CLI tests.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# seg-nano runs at a small valid resolution (patch 12 x 1 window) to keep the tests quick.
NANO_RESOLUTION = (192, 192)


def make_checkpoint(path: Path, variant: str, resolution=None, seed: int = 0) -> Path:
    """A random-init model with spread class heads (scores far apart, so top-K ties are not a coin toss) and a
    mask bias of +4 (about 1 std of the random mask logits: ~80 % of the pixels positive instead of half), saved
    with core's writer and its card.

    The bias keeps the mask IoU a test of the graph, not of float order: random masks are noise around logit 0,
    and with half the pixels near the threshold a different float order (torch 2.11 against 2.15, or another
    CPU) flipped enough of them to bring one seg-nano mask of a batch of 8 to IoU 0.984 (2026-12-04)."""
    from rfdetr_core.checkpoint import save_model
    from rfdetr_core.factory import load_model

    torch.manual_seed(seed)
    loaded = load_model(variant)
    model = loaded.model
    with torch.no_grad():
        # the final head and the two-stage heads (whose top-Q proposal choice is as tie-prone)
        for head in [model.class_embed, *model.query_selection.class_embed]:
            head.weight.normal_(0.0, 0.5)
            head.bias.normal_(-2.0, 1.0)
        model.mask_head.bias.fill_(4.0)
    card = loaded.card if resolution is None else loaded.card.replace(resolution=tuple(resolution))
    return save_model(path, model.state_dict(), card)


@dataclass
class Exported:
    path: Path
    checkpoint: Path
    stdout: str
    stderr: str
    code: int


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "seg-tiny": make_checkpoint(root / "tiny.safetensors", "seg-tiny"),
        "seg-nano": make_checkpoint(root / "nano.safetensors", "seg-nano", NANO_RESOLUTION),
    }


@pytest.fixture(scope="session")
def export(checkpoints, tmp_path_factory):
    """``export(variant, *flags)`` -> :class:`Exported`, running the CLI once per distinct call."""
    from rfdetr_export.cli import main

    cache: dict[tuple, Exported] = {}
    root = tmp_path_factory.mktemp("exports")

    def run(variant: str, *flags: str) -> Exported:
        key = (variant, *flags)
        if key not in cache:
            name = "_".join(part.strip("-") for part in key) + ".onnx"
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(checkpoints[variant]), "--onnx", "--output", str(root / name), *flags])
            cache[key] = Exported(root / name, checkpoints[variant], out.getvalue(), err.getvalue(), code)
        return cache[key]

    return run
