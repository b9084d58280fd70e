"""Resumable training state as safetensors + JSON (never pickle), written as one atomic folder swap.

``checkpoints/last/`` holds:

* ``model.safetensors``      the raw (non-EMA) model weights,
* ``ema.safetensors``        the EMA weights (when EMA is on),
* ``optimizer.safetensors``  every optimiser state tensor, keyed ``"<param index>/<name>"``; the param groups
  (hyper-parameters and param indexes) are a JSON index in the file's metadata,
* ``rng_rank<r>.safetensors`` each process's torch CPU/CUDA generator states,
* ``state.json``             counters, schedule, EMA update count, guard and early-stopping state, sampler
  state, python/numpy RNG states of every process, and the config it was trained with.

The folder is first written as ``.last.tmp``, then swapped in with two renames; the previous copy stays as
``.last.old`` until the swap is complete, and :mod:`rfdetr_train.engine.run_dir` falls back to it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rfdetr_core.atomic_io import atomic_path, atomic_write_text
from rfdetr_core.errors import CheckpointError

STATE_VERSION = 1


# -- optimiser ----------------------------------------------------------------------------------------------
def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimiser state as flat tensors plus a JSON index (groups, and non-tensor state entries)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    index_json = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, index_json


def optimizer_from_flat(tensors: dict[str, torch.Tensor], index_json: dict) -> dict:
    """Inverse of :func:`optimizer_to_flat`: a ``state_dict`` for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(index_json.get("scalars", {}).items()):
        index, key = flat.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    # JSON turned tuples (``betas``) into lists; give optimisers back what they stored.
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
        for g in index_json["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# -- RNG ----------------------------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch generators as tensors, python and numpy as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted(
        (k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1])
    )
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


# -- files --------------------------------------------------------------------------------------------------
def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=meta)


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"Resumable checkpoint is incomplete: {path} is missing.")
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, (fh.metadata() or {})  # noqa: SIM118 (not iterable)


def unique_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied tensors cloned apart (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, value in state_dict.items():
        t = value.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        out[key] = t.clone() if ident is not None and ident in seen else t
        if ident is not None:
            seen.add(ident)
    return out


def write_state_folder(
    last_dir: Path,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    ema_state: dict[str, torch.Tensor] | None,
    rng_per_rank: list[tuple[dict[str, torch.Tensor], dict]],
    state: dict,
) -> None:
    """Write a complete ``checkpoints/last/`` folder and swap it in atomically (main process only)."""
    parent = last_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp, old = parent / ".last.tmp", parent / ".last.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(tmp / "model.safetensors", unique_state_dict(model_state))
    if ema_state is not None:
        _save_tensors(tmp / "ema.safetensors", unique_state_dict(ema_state))
    opt_tensors, opt_index = optimizer_to_flat(optimizer)
    _save_tensors(tmp / "optimizer.safetensors", opt_tensors, {"index": json.dumps(opt_index)})
    rng_meta = []
    for rank, (rng_tensors, meta) in enumerate(rng_per_rank):
        _save_tensors(tmp / f"rng_rank{rank}.safetensors", rng_tensors)
        rng_meta.append(meta)
    full = {"version": STATE_VERSION, **state, "rng": rng_meta, "has_ema": ema_state is not None}
    atomic_write_text(tmp / "state.json", json.dumps(full, indent=1, sort_keys=True))
    shutil.rmtree(old, ignore_errors=True)
    if last_dir.exists():
        last_dir.rename(old)
    tmp.rename(last_dir)
    shutil.rmtree(old, ignore_errors=True)


class TrainingState:
    """A loaded ``checkpoints/last/`` folder."""

    def __init__(self, last_dir: Path):
        self.dir = Path(last_dir)
        try:
            self.state = json.loads((self.dir / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.dir}/state.json cannot be read ({exc}).") from exc
        if self.state.get("version", 0) > STATE_VERSION:
            raise CheckpointError(f"{self.dir} was written by a newer rfdetr-train; upgrade to resume it.")

    def model_state(self) -> dict[str, torch.Tensor]:
        return _load_tensors(self.dir / "model.safetensors")[0]

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        return _load_tensors(self.dir / "ema.safetensors")[0] if self.state.get("has_ema") else None

    def optimizer_state(self) -> dict:
        tensors, meta = _load_tensors(self.dir / "optimizer.safetensors")
        return optimizer_from_flat(tensors, json.loads(meta["index"]))

    def restore_rng(self, rank: int) -> bool:
        """Restore ``rank``'s RNG states; ``False`` if this checkpoint had fewer processes."""
        metas = self.state.get("rng", [])
        if rank >= len(metas):
            return False
        tensors, _ = _load_tensors(self.dir / f"rng_rank{rank}.safetensors")
        restore_rng(tensors, metas[rank])
        return True
