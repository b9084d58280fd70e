"""Our checkpoint format: ONE safetensors file, metadata as JSON in its header.

``__metadata__["rfdetr"]`` holds a JSON object::

    {"format_version": 1, "variant": "seg-medium", "resolution": [432, 432],
     "preprocess": {...PreprocessConfig...}, "class_map": {...ClassMap...}, ...extra keys}

Writes are atomic (temporary file + rename). Loading never unpickles anything: a file that is not
safetensors (for instance a ``torch.save`` pickle) is refused with a message saying how to load it instead.
Upstream ``.pth``/``.ckpt`` files are read by ``rfdetr_core.weights``, never written.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rfdetr_core.atomic_io import atomic_path
from rfdetr_core.errors import CheckpointError

FORMAT_VERSION = 1
METADATA_KEY = "rfdetr"


def save_checkpoint(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> Path:
    """Write ``state_dict`` and JSON-serialisable ``metadata`` to ``path`` atomically.

    Tensors are saved contiguous and de-duplicated (safetensors refuses shared storage).
    """
    from safetensors.torch import save_file

    meta = {"format_version": FORMAT_VERSION, **metadata}
    try:
        header = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    except TypeError as exc:
        raise CheckpointError(f"Checkpoint metadata is not JSON-serialisable: {exc}") from exc
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"State-dict entry {key!r} is a {type(value).__name__}, not a tensor.")
        t = value.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        tensors[key] = t.clone() if ident in seen else t
        seen[ident] = key
    dest = Path(path)
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return dest


REDOWNLOAD = "It may be truncated or corrupt (an interrupted download or copy): download or export it again."


def _read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                size_text = "empty" if not head else f"only {len(head)} bytes long"
                raise CheckpointError(f"{path} is not a weights file: it is {size_text}. {REDOWNLOAD}")
            (size,) = struct.unpack("<Q", head)
            if size > 100 * 2**20:
                raise CheckpointError(_not_safetensors(path, head))
            raw = fh.read(size)
    except FileNotFoundError as exc:
        raise CheckpointError(f"Checkpoint not found: {path}") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"{path} is a folder; pass the .safetensors file inside it.") from exc
    if len(raw) < size and raw[:1] == b"{":
        raise CheckpointError(
            f"{path} is not a complete safetensors checkpoint: its header should be {size} bytes but the file "
            f"ends after {len(raw)}. {REDOWNLOAD}"
        )
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(_not_safetensors(path, head + raw[:8])) from None
    if not isinstance(header, dict):
        raise CheckpointError(_not_safetensors(path, head + raw[:8]))
    return header


def describe_start(head: bytes) -> str:
    """What a file whose first bytes are ``head`` looks like, for messages ("a zip archive (...)", ...)."""
    if head[:2] == b"PK":
        return "a zip archive (torch.save / PyTorch pickle format)"
    if head[:1] == b"\x80":
        return "a Python pickle"
    if head[8:9] == b"{":
        return "a damaged safetensors file"
    if head and all(32 <= b < 127 or b in b"\t\n\r" for b in head):
        return f"a text file (it starts with {head.decode('ascii')!r})"
    return f"a file of an unknown kind (it starts with bytes {head[:8].hex(' ')})"


def _not_safetensors(path: Path, head: bytes) -> str:
    kind = describe_start(head)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return (
            f"{path} is {kind}, not an rfdetr safetensors checkpoint. Pickled files are never unpickled here. "
            "Upstream RF-DETR .pth/.ckpt weights load through `create_model(variant, weights=PATH)` or "
            "`RFDETR.from_checkpoint(PATH)`, which read them with torch.load(weights_only=True)."
        )
    if head[8:9] == b"{":
        return f"{path} is {kind}: its header is not valid JSON. {REDOWNLOAD}"
    return (
        f"{path} is {kind}, not a weights file (rfdetr .safetensors or PyTorch .pth/.pt/.ckpt). {REDOWNLOAD}"
    )


def is_safetensors(path: str | os.PathLike) -> bool:
    """True if ``path`` has a readable safetensors header."""
    try:
        _read_header(Path(path))
    except CheckpointError:
        return False
    return True


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``rfdetr`` metadata of a checkpoint without loading its tensors (``{}`` if it has none)."""
    path = Path(path)
    raw = (_read_header(path).get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the rfdetr metadata is not valid JSON ({exc}).") from exc
    version = meta.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format {version}, newer than this rfdetr-core understands "
            f"({FORMAT_VERSION}). Upgrade rfdetr-core."
        )
    return meta


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(state_dict, metadata)`` from one of our checkpoints. Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a complete safetensors checkpoint: its header reads but its tensors do not ({exc}). "
            f"{REDOWNLOAD}"
        ) from exc
    return tensors, meta
