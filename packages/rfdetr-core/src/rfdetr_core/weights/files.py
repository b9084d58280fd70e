"""Reading any weights file, safely.

Three kinds of file are understood (:func:`read_weights_file`):

* **ours**: one safetensors file (:mod:`rfdetr_core.checkpoint`) whose metadata carries the variant, the
  resolution, the preprocessing and the class map;
* **upstream RF-DETR / RF-DETR-Seg** ``.pth`` / ``.pt``: a torch pickle dict with ``model`` (state dict in
  upstream's key layout) and ``args`` (an ``argparse.Namespace`` or a dict, ``class_names`` among them), or a
  bare state dict;
* **upstream Lightning** ``.ckpt``: ``state_dict`` with every model key prefixed ``model.``.

The reader is chosen by the file's first bytes (a zip archive or a pickle go to torch, anything else to the
safetensors reader), never by its suffix; a file that is none of these, or a truncated or damaged one, raises
a :class:`~rfdetr_core.errors.CheckpointError` saying what the file is and to download or export it again.

Pickles are never executed: ``torch.load(weights_only=True)`` with an explicit allow-list of the plain
containers upstream stores (:data:`SAFE_GLOBALS`). A file that needs any other class is refused with a
:class:`~rfdetr_core.errors.CheckpointError` naming it.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rfdetr_core.checkpoint import REDOWNLOAD, load_checkpoint
from rfdetr_core.class_map import ClassMap
from rfdetr_core.coco_classes import COCO_NAMES, coco_class_map
from rfdetr_core.errors import CheckpointError, RFDETRError
from rfdetr_core.model_card import ModelCard
from rfdetr_core.preprocess import PreprocessConfig

# Everything non-tensor that upstream checkpoints hold: the training ``args`` namespace (old engine.py
# files: argparse.Namespace; some configs: SimpleNamespace). Lightning state, dicts, lists, tuples,
# OrderedDicts and torch types are already allowed by weights_only loading. Nothing here runs code.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace, types.SimpleNamespace)

# Upstream model class names (``model_name`` in 1.x checkpoints) -> our variant names.
UPSTREAM_MODEL_NAMES = {
    "RFDETRSegNano": "seg-nano",
    "RFDETRSegSmall": "seg-small",
    "RFDETRSegMedium": "seg-medium",
    "RFDETRSegLarge": "seg-large",
    "RFDETRSegXLarge": "seg-xlarge",
    "RFDETRSeg2XLarge": "seg-2xlarge",
    "RFDETRNano": "nano",
    "RFDETRSmall": "small",
    "RFDETRMedium": "medium",
    "RFDETRLarge": "large",
    "RFDETRXLarge": "xlarge",
    "RFDETR2XLarge": "2xlarge",
    "RFDETRBase": "base",
    "RFDETRLargeDeprecated": "large-legacy",
}

FORMAT_OURS = "rfdetr"
FORMAT_UPSTREAM = "upstream"
FORMAT_LIGHTNING = "upstream-lightning"
FORMAT_STATE_DICT = "state-dict"


@dataclass
class WeightsFile:
    """The content of one weights file.

    Attributes:
        path: where it was read from.
        format: ``"rfdetr"`` (ours), ``"upstream"`` (``.pth`` with ``model``), ``"upstream-lightning"``
            (``.ckpt``) or ``"state-dict"`` (a bare state dict).
        state_dict: the model tensors (Lightning's ``model.`` prefix removed).
        upstream_layout: True when the keys are in upstream's layout and need
            :func:`rfdetr_core.weights.upstream.convert_upstream_state_dict`.
        variant: variant name when the file says (our metadata, upstream ``model_name``) or its shapes tell.
        resolution: ``(H, W)`` the model was trained at, when known.
        class_map: slot -> category id -> name, when known (ours: metadata; upstream: ``args.class_names``).
        preprocess: preprocessing recorded in the file (ours only).
        num_slots: logit slots of the classification head (``class_embed.bias`` rows), when present.
        metadata: our metadata, or upstream's ``args`` as a plain dict.
        card: the model card of our files (``None`` for upstream files and for ours without a full card).
            When given, ``variant``, ``resolution``, ``class_map``, ``preprocess`` and ``num_slots`` are read
            from it (pass only the card); the five fields exist for files without one.
    """

    path: Path
    format: str
    state_dict: dict[str, torch.Tensor]
    upstream_layout: bool
    variant: str | None = None
    resolution: tuple[int, int] | None = None
    class_map: ClassMap | None = None
    preprocess: PreprocessConfig | None = None
    num_slots: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    card: ModelCard | None = None

    def __post_init__(self) -> None:
        if self.card is None:
            return
        for name, value in _card_fields(self.card).items():
            given = getattr(self, name)
            if given is not None and given != value:
                raise ValueError(
                    f"WeightsFile {name}={given!r} contradicts its card ({value!r}); pass the card only"
                )
            setattr(self, name, value)


def _card_fields(card: ModelCard) -> dict[str, Any]:
    """The :class:`WeightsFile` fields a card determines."""
    return {
        "variant": card.variant,
        "resolution": card.resolution,
        "class_map": card.class_map,
        "preprocess": card.preprocess,
        "num_slots": card.num_slots,
    }


def load_pickle_safely(path: str | os.PathLike) -> Any:
    """``torch.load`` a pickle file without executing code (weights_only + :data:`SAFE_GLOBALS`).

    Raises :class:`CheckpointError` naming the class(es) a refused file wanted.
    """
    path = Path(path)
    try:
        # a file object, so that torch.load does not pick its reader by the suffix (".safetensors")
        with open(path, "rb") as fh, torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(fh, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"Weights file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"{path} is a folder, not a weights file.") from exc
    except pickle.UnpicklingError as exc:
        wanted = _unsafe_globals(path) or _globals_in_message(str(exc))
        if not wanted:  # nothing disallowed named: the pickle stream itself is broken
            raise CheckpointError(_unreadable_pickle(path, exc)) from exc
        raise CheckpointError(
            f"{path} was refused: loading it would need {', '.join(wanted)}, which is not on the allow-list "
            "of plain data "
            "that rfdetr reads from pickles (tensors, dicts, lists, argparse.Namespace). Loading never runs "
            "pickled code. If you trust the file, re-save only its tensors, e.g. "
            "`torch.save({'model': ckpt['model']}, 'clean.pth')`, or convert it to safetensors."
        ) from None
    except Exception as exc:
        # (RuntimeError from the zip reader, EOFError, KeyError / struct.error from the unpickler, ...)
        raise CheckpointError(_unreadable_pickle(path, exc)) from exc


def _unreadable_pickle(path: Path, exc: BaseException) -> str:
    detail = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:120]  # torch's first sentence
    return f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {detail}). {REDOWNLOAD}"


def _looks_like_pickle(path: Path) -> bool:
    """True for a torch.save zip archive or a raw pickle (protocol >= 2), by the file's first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _unsafe_globals(path: Path) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the listing is only for the message; the load itself already failed safely
        return []
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS}
    return [g for g in found if g not in allowed]


def _globals_in_message(message: str) -> list[str]:
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))


def _args_to_dict(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    if isinstance(args, (argparse.Namespace, types.SimpleNamespace)):
        return dict(vars(args))
    return {}


def _tensors_only(sd: Mapping, path: Path) -> dict[str, torch.Tensor]:
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: the state dict has non-tensor entries (e.g. {bad[:3]}).")
    return dict(sd)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _looks_upstream(sd: Mapping[str, torch.Tensor]) -> bool:
    # Upstream's backbone is a Joiner whose first child is the encoder+projector: keys start "backbone.0.".
    return any(k.startswith("backbone.0.") for k in sd)


def folder_message(path: Path) -> str:
    """What to pass instead of a folder: a run folder's best/last weights, else the weights files in it."""
    if (path / "best.safetensors").is_file() or (path / "last.safetensors").is_file():
        options = [str(path / n) for n in ("best.safetensors", "last.safetensors") if (path / n).is_file()]
        return f"{path} is a training run folder; pass its weights file: {' or '.join(options)}."
    # PyTorch weights and exported files (predict.TORCH_SUFFIXES, runner._PROVIDERS; not imported: weights
    # sits below both, and core keeps no import cycles, tests/core/test_import_structure.py)
    model_suffixes = (".safetensors", ".pth", ".pt", ".ckpt", ".onnx", ".engine")
    found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in model_suffixes)
    if found:
        return f"{path} is a folder; pass one of the weights files in it: {', '.join(found[:5])}."
    return (
        f"{path} is a folder with no weights file in it; pass the path of a .safetensors, .pth or .ckpt file "
        "(or an exported .onnx / .engine)."
    )


def read_weights_file(path: str | os.PathLike) -> WeightsFile:
    """Read any supported weights file (see the module docstring) without executing pickled code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Weights file not found: {path}")
    if path.is_dir():
        raise CheckpointError(folder_message(path))
    if (
        path.name == "model.safetensors"
        and path.parent.name == "last"
        and path.parent.parent.name == "checkpoints"
    ):
        run = path.parent.parent.parent
        raise CheckpointError(
            f"{path} is part of the resumable training state (raw weights without the model's record). "
            f"For the trained model pass {run / 'last.safetensors'} (latest EMA weights) or "
            f"{run / 'best.safetensors'}; to continue training use --resume {run}."
        )
    if not _looks_like_pickle(path):
        # ours, or no weights file at all: the safetensors reader says which (text, truncated, damaged, ...)
        return _read_ours(path)
    obj = load_pickle_safely(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict.")
    if "model" in obj and isinstance(obj["model"], Mapping):
        sd = _tensors_only(obj["model"], path)
        fmt = FORMAT_UPSTREAM
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        prefixed = obj["state_dict"]
        # A torch.compile'd model saves "model._orig_mod.<key>"; both forms map to "<key>".
        sd = {
            k.removeprefix("model.").removeprefix("_orig_mod."): v
            for k, v in prefixed.items()
            if k.startswith("model.")
        }
        if not sd:
            raise CheckpointError(
                f"{path}: a Lightning checkpoint without 'model.'-prefixed weights; is it an RF-DETR .ckpt?"
            )
        sd = _tensors_only(sd, path)
        fmt = FORMAT_LIGHTNING
    elif _is_state_dict(obj):
        sd = dict(obj)
        fmt = FORMAT_STATE_DICT
    else:
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise CheckpointError(
            f"{path}: no weights found (keys: {keys}). Expected 'model' (RF-DETR .pth), 'state_dict' "
            "(Lightning .ckpt) or a bare state dict."
        )
    args = _args_to_dict(obj.get("args") if fmt != FORMAT_STATE_DICT else None)
    if not args and fmt == FORMAT_LIGHTNING:
        args = _args_to_dict(obj.get("hyper_parameters"))
    upstream = _looks_upstream(sd)
    num_slots = _num_slots(sd)
    wf = WeightsFile(path=path, format=fmt, state_dict=sd, upstream_layout=upstream, num_slots=num_slots)
    wf.metadata = args
    if upstream:
        wf.variant = _upstream_variant(obj.get("model_name") if fmt != FORMAT_STATE_DICT else None, args, sd)
        wf.resolution = _upstream_resolution(args)
        wf.class_map = upstream_class_map(args.get("class_names"), num_slots)
        # Upstream predicts with a bilinear resize without antialias (rfdetr >= 1.9.1), as its training
        # resize (cv2 INTER_LINEAR) does; keep that for its weights.
        wf.preprocess = PreprocessConfig(antialias=False)
    return wf


def _read_ours(path: Path) -> WeightsFile:
    sd, meta = load_checkpoint(path)
    card = None
    if all(meta.get(k) is not None for k in ("variant", "num_queries", "resolution", "class_map")):
        try:
            card = ModelCard.from_metadata(meta)
        except RFDETRError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    if card is not None:
        return WeightsFile(
            path=path,
            format=FORMAT_OURS,
            state_dict=sd,
            upstream_layout=_looks_upstream(sd),
            metadata=meta,
            card=card,
        )
    # a partial record (files written by hand or by tests): take what it has
    res = meta.get("resolution")
    class_map = ClassMap.from_json(meta["class_map"]) if meta.get("class_map") else None
    return WeightsFile(
        path=path,
        format=FORMAT_OURS,
        state_dict=sd,
        upstream_layout=_looks_upstream(sd),
        variant=meta.get("variant"),
        resolution=(int(res[0]), int(res[1])) if res else None,
        class_map=class_map,
        preprocess=PreprocessConfig.from_json(meta["preprocess"]) if meta.get("preprocess") else None,
        num_slots=class_map.num_slots if class_map is not None else _num_slots(sd),
        metadata=meta,
    )


def _num_slots(sd: Mapping[str, torch.Tensor]) -> int | None:
    for key in ("class_embed.bias", "class_head.bias"):
        if key in sd and sd[key].ndim == 1:
            return int(sd[key].shape[0])
    return None


def upstream_class_map(class_names: Any, num_slots: int | None) -> ClassMap | None:
    """Class map for upstream weights.

    COCO weights (no names, or the 80 COCO names, with more slots than names): slot = COCO category id.
    Fine-tuned weights: slot ``i`` = category id ``i`` named ``class_names[i]`` (upstream reports the slot as
    the class id). ``None`` when the file has no names and no head to tell.
    """
    names = [str(n) for n in class_names] if class_names else []
    if not names or list(names) == list(COCO_NAMES):
        if num_slots is not None and num_slots > len(COCO_NAMES):
            return coco_class_map(num_slots)
        if not names:
            return None
    cm = ClassMap.from_names(names, first_category_id=0)
    if num_slots is not None and num_slots >= len(names):
        cm = ClassMap(cm.entries, num_slots)
    return cm


def _upstream_resolution(args: Mapping[str, Any]) -> tuple[int, int] | None:
    res = args.get("resolution")
    if isinstance(res, int) and res > 0:
        return res, res
    return None


def _upstream_variant(model_name: Any, args: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> str | None:
    """The variant an upstream file was trained as: its ``model_name``, else its shapes (None if unsure)."""
    if isinstance(model_name, str) and model_name.strip() in UPSTREAM_MODEL_NAMES:
        return UPSTREAM_MODEL_NAMES[model_name.strip()]
    return guess_variant_from_shapes(sd, args)


def guess_variant_from_shapes(
    sd: Mapping[str, torch.Tensor], args: Mapping[str, Any] | None = None
) -> str | None:
    """Match an upstream-layout state dict to a registered variant by its architecture.

    Compares task (segmentation head present), patch size, encoder width, decoder layers, hidden width and
    the position-table grid; ``args`` (``num_windows``) breaks ties. Returns ``None`` unless exactly one
    variant fits.
    """
    from rfdetr_core.variants import get_variant, list_variants

    prefix = "backbone.0.encoder.encoder.embeddings."
    patch_w = sd.get(prefix + "patch_embeddings.projection.weight")
    pos = sd.get(prefix + "position_embeddings")
    if patch_w is None or pos is None or patch_w.ndim != 4:
        return None
    patch, enc_dim = int(patch_w.shape[-1]), int(patch_w.shape[0])
    grid = round((pos.shape[1] - 1) ** 0.5)
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.decoder\.layers\.(\d+)\.", k))}
    task = "segment" if any(k.startswith("segmentation_head.") for k in sd) else "detect"
    hidden = int(sd["query_feat.weight"].shape[1]) if "query_feat.weight" in sd else None
    found = []
    for name in list_variants(task):
        v = get_variant(name)
        if (v.patch_size, v.encoder_dim, v.dec_layers, v.positional_encoding_size) != (
            patch,
            enc_dim,
            len(layers),
            grid,
        ):
            continue
        if hidden is not None and v.hidden_dim != hidden:
            continue
        windows = (args or {}).get("num_windows")
        if isinstance(windows, int) and windows != v.num_windows:
            continue
        found.append(name)
    return found[0] if len(found) == 1 else None
