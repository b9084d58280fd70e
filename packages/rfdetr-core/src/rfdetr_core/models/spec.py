"""``ModelSpec``: the plain numbers that fix an :class:`~rfdetr_core.models.RFDETRModel`'s layers and shapes.

The network reads nothing else: no registry entry, no weights catalogue, no default resolution. The one place
that turns a registered :class:`~rfdetr_core.variants.Variant` into a spec is
:func:`rfdetr_core.factory.model_spec`; weight converters take the spec of the model they fill.
Field names follow :class:`~rfdetr_core.variants.Variant` where the two hold the same number.
"""

from __future__ import annotations

from dataclasses import dataclass


def valid_sizes(multiple: int, around: int, count: int = 2) -> list[int]:
    """The ``count`` input sizes (multiples of ``multiple``) just below and the ``count`` just above ``around``
    (positive only), e.g. ``valid_sizes(32, 100) == [64, 96, 128, 160]``."""
    below = [(around // multiple - i) * multiple for i in range(count)]
    above = [(around // multiple + 1 + i) * multiple for i in range(count)]
    return sorted(s for s in set(below + above) if s > 0)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one RF-DETR(-Seg) network.

    Attributes:
        name: what messages call the architecture (the variant's name).
        num_slots: class logit slots ``K`` (``pred_logits [B, Q, K]``).
        num_queries: queries per group ``Q``.
        group_detr: query groups ``G`` run in training (eval runs group 0 only).
        is_segmentation: whether the mask head exists.
        patch_size, num_windows: patch side in pixels and windows per side; every input side must be a
            multiple of ``patch_size * num_windows``.
        positional_encoding_size: side ``P`` of the learned ``P x P`` position table.
        encoder_dim, encoder_heads: width and heads of the ViT encoder.
        out_feature_indexes: 1-based encoder stages fed to the projector (blocks up to the last are built).
        window_block_indexes: 0-based encoder blocks that attend inside their window only.
        hidden_dim: decoder width; projector_scale: projector levels (``"P3"``, ``"P4"``, ``"P5"``).
        dec_layers, sa_nheads, ca_nheads, dec_n_points, dim_feedforward: the deformable decoder.
        mask_downsample_ratio: mask logits are at ``1 / ratio`` of the input size.
    """

    name: str
    num_slots: int
    num_queries: int
    group_detr: int
    is_segmentation: bool
    patch_size: int
    num_windows: int
    positional_encoding_size: int
    encoder_dim: int
    encoder_heads: int
    out_feature_indexes: tuple[int, ...]
    window_block_indexes: tuple[int, ...]
    hidden_dim: int
    projector_scale: tuple[str, ...]
    dec_layers: int
    sa_nheads: int
    ca_nheads: int
    dec_n_points: int
    dim_feedforward: int
    mask_downsample_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("num_slots", "num_queries", "group_detr"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{self.name}: {name} must be a positive integer, got {value!r}")

    @property
    def size_multiple(self) -> int:
        """Every input side must be a multiple of this (patch size x windows per side)."""
        return self.patch_size * self.num_windows

    @property
    def encoder_blocks(self) -> int:
        """Encoder blocks that are built and run: up to the last stage the projector reads."""
        return max(self.out_feature_indexes)
