"""Our checkpoint format: ONE safetensors file, metadata as JSON in its header.

``__metadata__["rfdetr"]`` holds a JSON object: the model card (:meth:`ModelCard.to_metadata
<rfdetr_core.model_card.ModelCard.to_metadata>`) plus the writer's record (step, epoch, metrics, ...)::

    {"format_version": 1, "variant": "seg-medium", "num_queries": 200, "resolution": [432, 432],
     "preprocess": {...}, "class_map": {...}, ...other card fields, ...record keys}

:func:`save_model` writes it from a card. Training files keep every DETR group (fine-tuning needs them);
``strip=True`` keeps group 0 only (all that inference runs) and records ``"detr_groups": 1`` with
``format_version`` 2, so that rfdetr-core 0.1.0 (which could not load such a file) asks for an upgrade
instead of failing on shapes. Loading a stripped file into a model with more groups starts groups
``1..G-1`` as copies of group 0 (:func:`expand_groups`). Optimiser and resume state never go into these files
(they live in a run's ``checkpoints/last/``).

Writes are atomic (temporary file + rename). Loading never unpickles anything: a file that is not
safetensors (for instance a ``torch.save`` pickle) is refused with a message saying how to load it instead.
Upstream ``.pth``/``.ckpt`` files are read by ``rfdetr_core.weights``, never written.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rfdetr_core.atomic_io import atomic_path
from rfdetr_core.errors import CheckpointError

if TYPE_CHECKING:
    from rfdetr_core.model_card import ModelCard

FORMAT_VERSION = 1  # files with every DETR group (what save_checkpoint writes)
STRIPPED_FORMAT_VERSION = 2  # group 0 only (save_model(strip=True)); the newest format read here
METADATA_KEY = "rfdetr"
STRIPPED_KEY = "detr_groups"

# Tensors that hold one block per DETR group (the model's layout, rfdetr_core.models.detector): the query
# tables have G*Q rows, group g = rows g*Q:(g+1)*Q; the two-stage heads are module lists indexed by group.
_QUERY_TABLES = ("query_feat.weight", "refpoint_embed.weight")
_GROUP_LIST = re.compile(r"^(query_selection\.(?:proj|norm|class_embed|bbox_embed)\.)(\d+)(\..+)$")


def save_checkpoint(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> Path:
    """Write ``state_dict`` and JSON-serialisable ``metadata`` to ``path`` atomically (the low-level writer;
    model files go through :func:`save_model`).

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


def save_model(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    card: ModelCard,
    *,
    strip: bool = False,
    record: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model's weights with its card (the checkpoint writer of training, strip and export).

    Args:
        path: destination ``.safetensors`` (written atomically).
        state_dict: the model's tensors in our layout (all DETR groups, as ``RFDETRModel.state_dict()``).
        card: the model card; its :meth:`~rfdetr_core.model_card.ModelCard.to_metadata` becomes the header.
        strip: keep group 0 only (an inference-only file; see the module docstring).
        record: extra JSON-safe keys for the record (``step``, ``epoch``, ``metrics``, ...); they must not
            overwrite card fields.

    Returns:
        ``path``.
    """
    meta = card.to_metadata()
    extra = dict(record or {})
    clash = sorted(set(extra) & (set(meta) | {"format_version", STRIPPED_KEY}))
    if clash:
        raise CheckpointError(f"record keys {clash} would overwrite the model card; rename them")
    meta.update(extra)
    if strip:
        state_dict = strip_state_dict(state_dict, card.num_queries)
        meta.update({"format_version": STRIPPED_FORMAT_VERSION, STRIPPED_KEY: 1})
    return save_checkpoint(path, state_dict, meta)


def strip_state_dict(state_dict: Mapping[str, torch.Tensor], num_queries: int) -> dict[str, torch.Tensor]:
    """Only what inference runs: rows ``[:num_queries]`` of the query tables and the group-0 two-stage heads.

    ``state_dict`` is in our layout with ``G`` groups (``[G*Q, ...]`` query tables, ``query_selection.*.g.*``
    heads); an already stripped one is returned unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _GROUP_LIST.match(key)
        if m is not None:
            if m.group(2) == "0":
                out[key] = value
            continue
        if key in _QUERY_TABLES:
            if value.shape[0] % num_queries:
                raise CheckpointError(
                    f"{key} has {value.shape[0]} rows, not a multiple of num_queries={num_queries}"
                )
            value = value[:num_queries]
        out[key] = value
    return out


def expand_groups(
    state_dict: Mapping[str, torch.Tensor], num_queries: int, groups: int
) -> dict[str, torch.Tensor]:
    """The inverse shape of :func:`strip_state_dict`: group 0 copied into ``groups`` groups.

    Used when a stripped file is loaded into a model with ``groups`` DETR groups (fine-tuning from it): every
    group starts as group 0, the tables ``[Q, ...] -> [groups*Q, ...]``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _GROUP_LIST.match(key)
        if m is not None and m.group(2) == "0":
            for g in range(groups):
                out[f"{m.group(1)}{g}{m.group(3)}"] = value
            continue
        if key in _QUERY_TABLES and value.shape[0] == num_queries:
            value = value.repeat(groups, *([1] * (value.ndim - 1)))  # [Q, D] -> [G*Q, D]
        out[key] = value
    return out


def strip_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> tuple[int, int]:
    """Write an inference-only copy of our checkpoint ``src`` to ``dst``; returns both sizes in bytes.

    The card and the record (step, metrics, ...) are kept. Raises :class:`CheckpointError` for a file that is
    not ours (upstream ``.pth`` files: load them with ``RFDETR.from_checkpoint`` and save from there).
    """
    from rfdetr_core.model_card import ModelCard

    src, dst = Path(src), Path(dst)
    sd, meta = load_checkpoint(src)
    if not meta:
        raise CheckpointError(
            f"{src} has no rfdetr metadata; only checkpoints written by rfdetr can be stripped."
        )
    card = ModelCard.from_metadata(meta)
    card_keys = set(card.to_metadata()) | {"format_version", STRIPPED_KEY}
    record = {k: v for k, v in meta.items() if k not in card_keys}
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"strip would overwrite {src}; give another output path.")
    save_model(dst, sd, card, strip=True, record=record)
    return src.stat().st_size, dst.stat().st_size


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
    if version > STRIPPED_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format {version}, newer than this rfdetr-core understands "
            f"({STRIPPED_FORMAT_VERSION}). Upgrade rfdetr-core."
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
