"""Convert upstream ``rfdetr`` state dicts (RF-DETR / RF-DETR-Seg 1.x checkpoints) to our model's layout.

Key layout of upstream files: rfdetr-upstream.md section 2.11. Adaptation rules follow upstream's loader
(section 2.12): class heads tiled or truncated to another slot count, query embeddings sliced per group (never
flat), surplus groups dropped, position table bicubically resized to the model's grid.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import Tensor

from rfdetr_core.errors import CheckpointError
from rfdetr_core.models.backbone import resize_patch_pos_embed
from rfdetr_core.models.spec import ModelSpec
from rfdetr_core.variants import Variant, get_variant, list_variants
from rfdetr_core.weights.key_mapping import rename_keys

_VIT = "backbone.0.encoder.encoder."
_PROJ = "backbone.0.projector."

# Keys that carry nothing our model uses: DINOv2's masked-image-modelling token and the empty keypoint schema.
_MEANINGLESS = re.compile(r"^(_kp_active_mask|" + re.escape(_VIT) + r"embeddings\.mask_token)$")

# (upstream pattern, our replacement). Backbone qkv and decoder in_proj are handled separately.
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(re.escape(_VIT) + r"embeddings\.cls_token$"), "backbone.cls_token"),
    (re.compile(re.escape(_VIT) + r"embeddings\.position_embeddings$"), "backbone.pos_embed"),
    (
        re.compile(re.escape(_VIT) + r"embeddings\.patch_embeddings\.projection\.(weight|bias)$"),
        r"backbone.patch_embed.\1",
    ),
    (
        re.compile(re.escape(_VIT) + r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$"),
        r"backbone.blocks.\1.norm\2.\3",
    ),
    (
        re.compile(re.escape(_VIT) + r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$"),
        r"backbone.blocks.\1.attn.proj.\2",
    ),
    (
        re.compile(re.escape(_VIT) + r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$"),
        r"backbone.blocks.\1.ls\2",
    ),
    (
        re.compile(re.escape(_VIT) + r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$"),
        r"backbone.blocks.\1.mlp.\2.\3",
    ),
    (re.compile(re.escape(_VIT) + r"layernorm\.(weight|bias)$"), r"backbone.norm.\1"),
    (
        re.compile(re.escape(_PROJ) + r"stages_sampling\.(\d+)\.(\d+)\.0\.(weight|bias)$"),
        r"projector.levels.\1.resample.\2.\3",
    ),
    (
        re.compile(re.escape(_PROJ) + r"stages_sampling\.(\d+)\.(\d+)\.0\.conv\.weight$"),
        r"projector.levels.\1.resample.\2.conv.weight",
    ),
    (
        re.compile(re.escape(_PROJ) + r"stages_sampling\.(\d+)\.(\d+)\.0\.bn\.(weight|bias)$"),
        r"projector.levels.\1.resample.\2.norm.\3",
    ),
    (
        re.compile(re.escape(_PROJ) + r"stages\.(\d+)\.0\.(cv[12])\.conv\.weight$"),
        r"projector.levels.\1.c2f.\2.conv.weight",
    ),
    (
        re.compile(re.escape(_PROJ) + r"stages\.(\d+)\.0\.(cv[12])\.bn\.(weight|bias)$"),
        r"projector.levels.\1.c2f.\2.norm.\3",
    ),
    (
        re.compile(re.escape(_PROJ) + r"stages\.(\d+)\.0\.m\.(\d+)\.(cv[12])\.conv\.weight$"),
        r"projector.levels.\1.c2f.blocks.\2.\3.conv.weight",
    ),
    (
        re.compile(re.escape(_PROJ) + r"stages\.(\d+)\.0\.m\.(\d+)\.(cv[12])\.bn\.(weight|bias)$"),
        r"projector.levels.\1.c2f.blocks.\2.\3.norm.\4",
    ),
    (re.compile(re.escape(_PROJ) + r"stages\.(\d+)\.1\.(weight|bias)$"), r"projector.levels.\1.norm.\2"),
    (
        re.compile(r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$"),
        r"decoder.layers.\1.self_attn.in_proj.\2",
    ),
    (
        re.compile(
            r"^transformer\.decoder\.layers\.(\d+)\.(self_attn\.out_proj|cross_attn\.\w+|linear[12]|norm[123])\.(weight|bias)$"
        ),
        r"decoder.layers.\1.\2.\3",
    ),
    (re.compile(r"^transformer\.decoder\.norm\.(weight|bias)$"), r"decoder.norm.\1"),
    (
        re.compile(r"^transformer\.decoder\.ref_point_head\.layers\.(\d+)\.(weight|bias)$"),
        r"decoder.ref_point_head.layers.\1.\2",
    ),
    (re.compile(r"^transformer\.enc_output\.(\d+)\.(weight|bias)$"), r"query_selection.proj.\1.\2"),
    (re.compile(r"^transformer\.enc_output_norm\.(\d+)\.(weight|bias)$"), r"query_selection.norm.\1.\2"),
    (
        re.compile(r"^transformer\.enc_out_class_embed\.(\d+)\.(weight|bias)$"),
        r"query_selection.class_embed.\1.\2",
    ),
    (
        re.compile(r"^transformer\.enc_out_bbox_embed\.(\d+)\.layers\.(\d+)\.(weight|bias)$"),
        r"query_selection.bbox_embed.\1.layers.\2.\3",
    ),
    (re.compile(r"^(class_embed)\.(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^bbox_embed\.layers\.(\d+)\.(weight|bias)$"), r"bbox_embed.layers.\1.\2"),
    (re.compile(r"^(query_feat|refpoint_embed)\.weight$"), r"\1.weight"),
    (
        re.compile(r"^segmentation_head\.blocks\.(\d+)\.(dwconv|norm)\.(weight|bias)$"),
        r"mask_head.blocks.\1.\2.\3",
    ),
    (
        re.compile(r"^segmentation_head\.blocks\.(\d+)\.pwconv1\.(weight|bias)$"),
        r"mask_head.blocks.\1.pwconv.\2",
    ),
    (re.compile(r"^segmentation_head\.spatial_features_proj\.(weight|bias)$"), r"mask_head.spatial_proj.\1"),
    (
        re.compile(r"^segmentation_head\.query_features_block\.norm_in\.(weight|bias)$"),
        r"mask_head.query_mlp.norm.\1",
    ),
    (
        re.compile(r"^segmentation_head\.query_features_block\.layers\.0\.(weight|bias)$"),
        r"mask_head.query_mlp.fc1.\1",
    ),
    (
        re.compile(r"^segmentation_head\.query_features_block\.layers\.2\.(weight|bias)$"),
        r"mask_head.query_mlp.fc2.\1",
    ),
    (re.compile(r"^segmentation_head\.query_features_proj\.(weight|bias)$"), r"mask_head.query_proj.\1"),
    (re.compile(r"^segmentation_head\.bias$"), "mask_head.bias"),
]
_QKV = re.compile(
    re.escape(_VIT) + r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$"
)
_BLOCK = re.compile(r"^backbone\.blocks\.(\d+)\.")


@dataclass(frozen=True)
class _Shape:
    """Architecture facts read off an upstream state dict."""

    segmentation: bool
    encoder_dim: int
    patch_size: int
    hidden_dim: int
    dec_layers: int
    levels: int
    groups: int
    query_rows: int
    slots: int
    pos_grid: int

    @property
    def num_queries(self) -> int:
        return self.query_rows // max(self.groups, 1)

    def describe(self) -> str:
        kind = "segmentation" if self.segmentation else "detection"
        return (
            f"{kind}, encoder width {self.encoder_dim}, patch {self.patch_size}, hidden {self.hidden_dim}, "
            f"{self.dec_layers} decoder layers, {self.levels} projector level(s), {self.num_queries} queries"
        )


def _strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in ("model.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _require(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(
            f"This does not look like an RF-DETR checkpoint: key {key!r} is missing. Pass the file's model "
            "state dict (the 'model' entry of an upstream .pth file)."
        )
    return sd[key]


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {m.group(1) for k in sd if (m := rx.match(k))}
    return len(found)


def _inspect(sd: dict[str, Tensor]) -> _Shape:
    pos = _require(sd, _VIT + "embeddings.position_embeddings")
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise CheckpointError(f"position table with {pos.shape[1] - 1} patch entries is not a square grid")
    return _Shape(
        segmentation=any(k.startswith("segmentation_head.") for k in sd),
        encoder_dim=int(_require(sd, _VIT + "embeddings.cls_token").shape[-1]),
        patch_size=int(_require(sd, _VIT + "embeddings.patch_embeddings.projection.weight").shape[-1]),
        hidden_dim=int(_require(sd, "class_embed.weight").shape[1]),
        dec_layers=_count(sd, r"^transformer\.decoder\.layers\.(\d+)\."),
        levels=_count(sd, re.escape(_PROJ) + r"stages\.(\d+)\.1\.weight$"),
        groups=_count(sd, r"^transformer\.enc_output\.(\d+)\.weight$"),
        query_rows=int(_require(sd, "query_feat.weight").shape[0]),
        slots=int(sd["class_embed.weight"].shape[0]),
        pos_grid=grid,
    )


def _fits(v: Variant | ModelSpec, s: _Shape) -> bool:
    return (
        v.is_segmentation == s.segmentation
        and v.encoder_dim == s.encoder_dim
        and v.patch_size == s.patch_size
        and v.hidden_dim == s.hidden_dim
        and v.dec_layers == s.dec_layers
        and len(v.projector_scale) == s.levels
    )


def _likely_variant(s: _Shape) -> str | None:
    candidates = [v for v in map(get_variant, list_variants()) if _fits(v, s) and not v.placeholder]
    if not candidates:
        return None
    best = min(
        candidates,
        key=lambda v: (v.positional_encoding_size != s.pos_grid, v.num_queries != s.num_queries, v.name),
    )
    return best.name


def _check_fits(v: ModelSpec, s: _Shape) -> None:
    if _fits(v, s):
        return
    guess = _likely_variant(s)
    hint = f" It looks like a {guess!r} checkpoint: build that variant instead." if guess else ""
    raise CheckpointError(
        f"These weights do not fit the {v.name!r} model. The file holds a {s.describe()} model; {v.name!r} is "
        f"{'segmentation' if v.is_segmentation else 'detection'}, encoder width {v.encoder_dim}, patch "
        f"{v.patch_size}, hidden {v.hidden_dim}, {v.dec_layers} decoder layers, {len(v.projector_scale)} "
        f"projector level(s).{hint}"
    )


def _resize_rows(t: Tensor, rows: int) -> Tensor:
    """Tile (or truncate) the first axis to ``rows`` entries, as upstream does for class heads."""
    reps = math.ceil(rows / t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:rows].clone()


def _slice_groups(t: Tensor, ckpt_q: int, keep_groups: int, keep_q: int) -> Tensor:
    """``[G_ckpt * Q_ckpt, D]`` -> ``[keep_groups * keep_q, D]``, keeping the first queries of each group."""
    if keep_q == ckpt_q:
        return t[: keep_groups * ckpt_q].clone()
    # [G*Q, D] -> [G, Q, D] -> first keep_groups groups, first keep_q queries -> [g*q, D]
    return (
        t.view(-1, ckpt_q, t.shape[-1])[:keep_groups, :keep_q]
        .reshape(keep_groups * keep_q, t.shape[-1])
        .clone()
    )


def convert_upstream_state_dict(
    upstream_sd: dict[str, Tensor], spec: ModelSpec
) -> tuple[dict[str, Tensor], list[str]]:
    """Map an upstream RF-DETR(-Seg) state dict onto the layout of an ``RFDETRModel(spec)``.

    Args:
        upstream_sd: the ``model`` state dict of an upstream checkpoint (a Lightning ``model.`` prefix is
            accepted).
        spec: the target architecture (``model.spec``, or :func:`rfdetr_core.factory.model_spec`); its
            layers, slot count, queries, groups and position grid decide the adaptation.

    Returns:
        ``(state_dict, warnings)``: a state dict that loads with ``model.load_state_dict(sd, strict=True)`` and
        human-readable notes (class-head resizing, query/group slicing, unknown keys that were ignored).

    Raises:
        CheckpointError: the file is not an RF-DETR state dict, or its architecture does not fit the model
            (the message names the variant it most likely belongs to).
    """
    sd = _strip_prefix(dict(upstream_sd))
    shape = _inspect(sd)
    _check_fits(spec, shape)
    if any(k.startswith(_VIT + "embeddings.register_tokens") for k in sd):
        raise CheckpointError(
            "This checkpoint's backbone uses register tokens, which no RF-DETR variant here has."
        )
    notes: list[str] = []
    out, unknown = rename_keys(
        sd,
        _RENAMES,
        dropped=_MEANINGLESS,
        qkv=_QKV,
        qkv_target="backbone.blocks.{block}.attn.qkv.{kind}",
        label="backbone block",
    )

    # Blocks past the last stage the model reads are unused upstream too (e.g. block 12 of legacy Base).
    built = spec.encoder_blocks
    ckpt_blocks = _count(out, r"^backbone\.blocks\.(\d+)\.")
    if ckpt_blocks < built:
        raise CheckpointError(
            f"The checkpoint has {ckpt_blocks} backbone blocks; {spec.name!r} needs {built}."
        )
    out = {k: v for k, v in out.items() if not ((m := _BLOCK.match(k)) and int(m.group(1)) >= built)}

    # Position table -> the model's grid.
    grid = spec.positional_encoding_size
    if shape.pos_grid != grid:
        out["backbone.pos_embed"] = resize_patch_pos_embed(out["backbone.pos_embed"], (grid, grid))
        notes.append(
            f"position table resized from {shape.pos_grid}x{shape.pos_grid} to {grid}x{grid} patches"
        )

    # Query groups and queries per group.
    groups, q = spec.group_detr, spec.num_queries
    if shape.groups < 1 or shape.query_rows % shape.groups:
        raise CheckpointError(
            f"query embeddings have {shape.query_rows} rows, not a multiple of the {shape.groups} two-stage groups"
        )
    if groups > shape.groups:
        raise CheckpointError(
            f"The checkpoint was trained with {shape.groups} query groups; the model needs {groups}. "
            f"Build the model with group_detr <= {shape.groups}."
        )
    if q > shape.num_queries:
        raise CheckpointError(
            f"The checkpoint has {shape.num_queries} queries per group; the model asks for {q}. "
            f"Use num_queries <= {shape.num_queries}."
        )
    if (groups, q) != (shape.groups, shape.num_queries):
        for key in ("query_feat.weight", "refpoint_embed.weight"):
            out[key] = _slice_groups(out[key], shape.num_queries, groups, q)
        group_key = re.compile(r"^query_selection\.\w+\.(\d+)\.")
        out = {k: v for k, v in out.items() if not ((m := group_key.match(k)) and int(m.group(1)) >= groups)}
        notes.append(
            f"query embeddings cut per group from {shape.groups} x {shape.num_queries} to {groups} x {q}"
        )

    # Class slots: tile or truncate every class head, as upstream does.
    slots = spec.num_slots
    if slots != shape.slots:
        for key in [k for k in out if re.match(r"^(class_embed|query_selection\.class_embed\.\d+)\.", k)]:
            out[key] = _resize_rows(out[key], slots)
        how = "tiled" if slots > shape.slots else "truncated"
        notes.append(
            f"class head {how} from {shape.slots} to {slots} slots: the extra or removed classes need fine-tuning"
        )

    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        notes.append(f"ignored {len(unknown)} checkpoint entries this model has no place for: {shown}")
    return out, notes
