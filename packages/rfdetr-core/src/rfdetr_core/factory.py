"""``create_model``: a variant, a class count and optional weights -> a ready model in eval mode.

This is the one place that maps a registered :class:`~rfdetr_core.variants.Variant` to the network's
constructor (:func:`model_spec`, :func:`build_model`); ``models/`` itself never sees a variant.

Weights may be a file of any kind :func:`rfdetr_core.weights.files.read_weights_file` reads, or an official
name (``seg-medium``, ``rf-detr-seg-medium.pt``) downloaded by :mod:`rfdetr_core.weights.download`.
Class count: ``num_classes`` when given (heads resized, with a warning, when the file has another count),
else the file's, else the variant default (``Variant.default_slots``, upstream's COCO layout).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rfdetr_core.class_map import ClassMap
from rfdetr_core.coco_classes import coco_class_map
from rfdetr_core.errors import CheckpointError
from rfdetr_core.model_card import ModelCard
from rfdetr_core.models import ModelSpec, RFDETRModel
from rfdetr_core.preprocess import PreprocessConfig
from rfdetr_core.variants import Variant, get_variant

if TYPE_CHECKING:
    from rfdetr_core.weights.files import WeightsFile


@dataclass
class LoadedModel:
    """A model and its card: what is needed to run it the way it was trained.

    ``card`` (:class:`~rfdetr_core.model_card.ModelCard`) holds the variant, queries, slots, default input
    resolution, preprocessing and class map; ``source`` is the weights file (``None`` for a random init);
    ``warnings`` what loading adjusted (class count, queries, ...). ``variant``, ``class_map``,
    ``resolution`` and ``preprocess`` read the card.
    """

    model: nn.Module
    card: ModelCard
    source: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def variant(self) -> Variant:
        """The registry entry of ``card.variant`` (its default query count; the model's is ``card.num_queries``)."""
        return get_variant(self.card.variant)

    @property
    def class_map(self) -> ClassMap:
        return self.card.class_map

    @property
    def resolution(self) -> tuple[int, int]:
        return self.card.resolution

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.card.preprocess


def card_for(
    model: nn.Module,
    variant: Variant,
    class_map: ClassMap,
    resolution: tuple[int, int],
    preprocess: PreprocessConfig,
    num_select: int | None = None,
) -> ModelCard:
    """The card of a built model (the one place a card is made from a model and its variant)."""
    return ModelCard(
        variant=variant.name,
        num_queries=int(model.num_queries),
        num_slots=int(model.num_slots),
        resolution=resolution,
        preprocess=preprocess,
        class_map=class_map,
        is_segmentation=bool(model.is_segmentation),
        mask_downsample=int(variant.mask_downsample_ratio),
        num_select=num_select,
    )


def model_spec(
    variant: str | Variant, num_slots: int | None = None, num_queries: int | None = None
) -> ModelSpec:
    """The network architecture of ``variant``.

    Args:
        variant: a :class:`Variant` or registered name.
        num_slots: logit slots ``K`` (default :attr:`Variant.default_slots`, upstream's 91-slot COCO layout).
        num_queries: queries per group (default ``variant.num_queries``).
    """
    v = get_variant(variant)
    for name, value in (("num_classes (logit slots)", num_slots), ("num_queries", num_queries)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    return ModelSpec(
        name=v.name,
        num_slots=v.default_slots if num_slots is None else num_slots,
        num_queries=v.num_queries if num_queries is None else num_queries,
        group_detr=v.group_detr,
        is_segmentation=v.is_segmentation,
        patch_size=v.patch_size,
        num_windows=v.num_windows,
        positional_encoding_size=v.positional_encoding_size,
        encoder_dim=v.encoder_dim,
        encoder_heads=v.encoder_heads,
        out_feature_indexes=v.out_feature_indexes,
        window_block_indexes=v.window_block_indexes,
        hidden_dim=v.hidden_dim,
        projector_scale=v.projector_scale,
        dec_layers=v.dec_layers,
        sa_nheads=v.sa_nheads,
        ca_nheads=v.ca_nheads,
        dec_n_points=v.dec_n_points,
        dim_feedforward=v.dim_feedforward,
        mask_downsample_ratio=v.mask_downsample_ratio,
    )


def build_model(
    variant: str | Variant, num_classes: int | None = None, num_queries: int | None = None
) -> RFDETRModel:
    """A randomly initialised model of ``variant`` (training mode, as any new ``nn.Module``).

    Args:
        variant: a :class:`Variant` or registered name.
        num_classes: logit slots ``K`` (default :attr:`Variant.default_slots`, upstream's 91-slot COCO layout).
        num_queries: queries per group (default ``variant.num_queries``).
    """
    return RFDETRModel(model_spec(variant, num_classes, num_queries))


def default_class_map(num_slots: int, variant: Variant) -> ClassMap:
    """Class map of a model without one of its own: COCO ids for the 91-slot COCO layout, else
    ``class_<i>`` names with category id = slot."""
    if num_slots == variant.default_slots == 91:
        return coco_class_map(num_slots)
    return ClassMap.from_names([f"class_{i}" for i in range(num_slots)])


def resolve_weights_path(weights: str | os.PathLike, accept_license: bool = False) -> Path:
    """An existing file path as is; otherwise an official name, downloaded (or found in the cache)."""
    path = Path(weights).expanduser()
    if path.exists():  # a file, or a folder that read_weights_file explains
        return path
    from rfdetr_core.weights.download import download_weights, resolve_official_name

    if resolve_official_name(str(weights)) is None:
        raise CheckpointError(
            f"Weights {str(weights)!r}: no such file, and not the name of official weights "
            "(e.g. 'seg-medium' or 'rf-detr-seg-medium.pt'). Check the path."
        )
    return download_weights(str(weights), accept_license=accept_license)


def load_model(
    variant: str | Variant | None = None,
    num_classes: int | None = None,
    weights: str | os.PathLike | WeightsFile | None = None,
    accept_license: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    class_map: ClassMap | None = None,
) -> LoadedModel:
    """Like :func:`create_model` and also return the class map, resolution and preprocessing.

    ``variant`` may be ``None`` only with ``weights`` that tell their variant (ours always do; upstream
    files through ``model_name`` or their shapes). ``class_map``: the classes the model is to predict from
    now on (e.g. a dataset's, for fine-tuning); it sets ``num_classes`` (``class_map.num_slots``) and replaces
    the file's class map, so no warning is given about the file's class names. ``weights`` may also be a
    :class:`~rfdetr_core.weights.files.WeightsFile` the caller has already read (it is not read again).
    """
    if class_map is not None:
        if num_classes is not None and num_classes != class_map.num_slots:
            raise ValueError(
                f"num_classes={num_classes} differs from the {class_map.num_slots} slots of class_map; "
                "give one of them"
            )
        num_classes = class_map.num_slots
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    wf = None
    if weights is not None:
        from rfdetr_core.weights.files import WeightsFile, read_weights_file

        if isinstance(weights, WeightsFile):
            wf = weights
        else:
            wf = read_weights_file(resolve_weights_path(weights, accept_license))
    v = _pick_variant(variant, wf)
    slots = num_classes if num_classes is not None else (wf.num_slots if wf and wf.num_slots else None)
    model = build_model(v, num_classes=slots, num_queries=_file_num_queries(wf, v))
    notes: list[str] = []
    use_file_map = class_map is None  # the caller's classes replace the file's
    if class_map is None:
        class_map = default_class_map(model.num_slots, v)
    resolution = (v.resolution, v.resolution)
    preprocess = PreprocessConfig()
    if wf is not None:
        notes = _load_state(model, wf)
        if use_file_map and wf.class_map is not None:
            if _map_fits(wf.class_map, model.num_slots, wf.num_slots):
                class_map = ClassMap(wf.class_map.entries, model.num_slots)
            else:
                notes.append(
                    f"the file's {len(wf.class_map)} classes do not fit the {model.num_slots} requested slots; "
                    "class names are now class_<slot>"
                )
        if wf.resolution is not None:
            resolution = v.check_resolution(*wf.resolution)
        if wf.preprocess is not None:
            preprocess = wf.preprocess
        for note in notes:
            warnings.warn(f"{wf.path.name}: {note}", UserWarning, stacklevel=3)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    num_select = wf.card.num_select if wf is not None and wf.card is not None else None
    card = card_for(model, v, class_map, resolution, preprocess, num_select)
    return LoadedModel(model, card, wf.path if wf else None, notes)


def create_model(
    variant: str | Variant,
    num_classes: int | None = None,
    weights: str | os.PathLike | None = None,
    accept_license: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build ``variant`` in eval mode, optionally loading ``weights``.

    Args:
        variant: a registered name (``seg-nano``, ...) or a :class:`Variant`.
        num_classes: logit slots ``K`` of the classification head. Default: the weights file's count, else
            ``variant.default_slots`` (upstream's 91-slot COCO layout). When it differs from the file's,
            the heads are resized and a warning says so.
        weights: a file (our safetensors, upstream ``.pth``/``.pt``, Lightning ``.ckpt``) or an official
            name (``seg-medium``, ``rf-detr-seg-medium.pt``), downloaded and md5-checked.
        accept_license: needed for PML-1.0 weights (``xlarge``, ``2xlarge``).
        device, dtype: where and in what precision the model lives.

    Returns:
        The model; eval ``forward(images [B, 3, H, W])`` gives ``pred_logits [B, Q, K]``, ``pred_boxes
        [B, Q, 4]`` and, for segmentation, ``pred_masks [B, Q, H/4, W/4]``.
    """
    return load_model(variant, num_classes, weights, accept_license, device, dtype).model


def _pick_variant(variant: str | Variant | None, wf) -> Variant:
    file_variant = wf.variant if wf is not None else None
    if variant is None:
        if file_variant is None:
            raise CheckpointError(
                f"{wf.path if wf else 'the weights'}: cannot tell which variant these weights are for; pass "
                "it explicitly, e.g. RFDETR.from_checkpoint(path, variant='seg-medium')."
            )
        return get_variant(file_variant)
    v = get_variant(variant)
    if file_variant is not None and get_variant(file_variant).name != v.name:
        raise CheckpointError(
            f"{wf.path} holds {file_variant} weights, not {v.name}. Use variant={file_variant!r} (or leave "
            "the variant out to take the file's)."
        )
    return v


def _file_num_queries(wf, v: Variant) -> int | None:
    """Queries per group the file was trained with when it says and it differs from the variant's."""
    if wf is None:
        return None
    n = wf.metadata.get("num_queries")
    return n if isinstance(n, int) and n > 0 and n != v.num_queries else None


def _map_fits(class_map: ClassMap, model_slots: int, file_slots: int | None) -> bool:
    if file_slots is not None and model_slots == file_slots:
        return True
    return len(class_map) == model_slots and all(e.slot < model_slots for e in class_map.entries)


def _load_state(model: nn.Module, wf) -> list[str]:
    """Load ``wf``'s tensors into ``model`` (converting upstream keys); returns notes for warnings."""
    from rfdetr_core.checkpoint import STRIPPED_KEY, expand_groups

    if wf.upstream_layout:
        from rfdetr_core.weights.upstream import convert_upstream_state_dict

        sd, notes = convert_upstream_state_dict(wf.state_dict, model.spec)
        notes = list(notes)
    else:
        sd = wf.state_dict
        if wf.metadata.get(STRIPPED_KEY) == 1 and model.group_detr > 1:
            # an inference-only file: fine-tuning starts every group from group 0
            sd = expand_groups(sd, model.num_queries, model.group_detr)
        sd, notes = _fit_heads(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{wf.path} does not fit {model.spec.name}: missing {sorted(missing)[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}. Is it a checkpoint of another variant?"
        )
    return notes


def _fit_heads(sd: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our-layout tensors resized where only the class-slot dimension differs (fine-tuning to new classes).

    Rows ``[:min(K_file, K_model)]`` are copied; extra rows keep the model's fresh initialisation. Any other
    shape difference is an error.
    """
    target = model.state_dict()
    k_model = int(model.num_slots)
    out, resized = {}, []
    for key, value in sd.items():
        want = target.get(key)
        if want is None or want.shape == value.shape:
            out[key] = value
            continue
        if value.shape[1:] == want.shape[1:] and want.shape[0] == k_model:
            fitted = want.clone()
            n = min(value.shape[0], k_model)
            fitted[:n] = value[:n].to(fitted.dtype)
            out[key] = fitted
            resized.append(key)
            continue
        raise CheckpointError(
            f"Tensor {key!r} has shape {tuple(value.shape)} in the file but {tuple(want.shape)} in "
            f"{model.spec.name}: the file is for another architecture."
        )
    notes = []
    if resized:
        notes.append(
            f"class heads resized to {k_model} slots ({len(resized)} tensors); the new slots start untrained"
        )
    return out, notes
