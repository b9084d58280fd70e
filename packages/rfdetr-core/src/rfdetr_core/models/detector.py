"""The RF-DETR / RF-DETR-Seg network: backbone -> projector -> two-stage selection -> decoder -> heads.

Robinson et al., "RF-DETR: Real-Time Detection Transformer", arXiv 2511.09554; layout and numbers as in
rfdetr-upstream.md section 2. Only torch is imported here: the architecture arrives as a plain
:class:`~rfdetr_core.models.spec.ModelSpec` (built from a variant by :func:`rfdetr_core.factory.build_model`),
and deformable attention goes through ``torch.ops.rfdetr.ms_deform_attn``, registered when ``rfdetr_core`` is
imported.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from rfdetr_core.models.backbone import WindowedViT
from rfdetr_core.models.mask_head import MaskHead
from rfdetr_core.models.projector import MultiScaleProjector
from rfdetr_core.models.spec import ModelSpec, valid_sizes
from rfdetr_core.models.transformer import MLP, Decoder, QuerySelection, apply_box_delta

# Focal-loss prior (Lin et al., RetinaNet): class biases start at -log((1 - 0.01) / 0.01).
PRIOR_PROB = 0.01


class RFDETRModel(nn.Module):
    """RF-DETR(-Seg) for one :class:`~rfdetr_core.models.spec.ModelSpec`.

    Attributes:
        spec: the architecture.
        num_slots: class logit slots ``K``.
        num_queries: queries per group ``Q``; group_detr: groups ``G`` used in training.
        is_segmentation: whether the mask head exists.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.num_slots = spec.num_slots
        self.num_queries = spec.num_queries
        self.group_detr = spec.group_detr
        self.is_segmentation = spec.is_segmentation
        dim = spec.hidden_dim
        self.backbone = WindowedViT(
            dim=spec.encoder_dim,
            heads=spec.encoder_heads,
            patch_size=spec.patch_size,
            num_windows=spec.num_windows,
            pos_grid=spec.positional_encoding_size,
            out_feature_indexes=spec.out_feature_indexes,
            window_block_indexes=spec.window_block_indexes,
        )
        self.projector = MultiScaleProjector(
            (spec.encoder_dim,) * len(spec.out_feature_indexes), dim, spec.projector_scale
        )
        self.query_selection = QuerySelection(dim, spec.num_slots, spec.group_detr, spec.num_queries)
        self.decoder = Decoder(
            dim,
            spec.dec_layers,
            spec.sa_nheads,
            spec.ca_nheads,
            len(spec.projector_scale),
            spec.dec_n_points,
            spec.dim_feedforward,
        )
        rows = spec.num_queries * spec.group_detr
        self.query_feat = nn.Embedding(rows, dim)
        self.refpoint_embed = nn.Embedding(rows, 4)
        self.class_embed = nn.Linear(dim, spec.num_slots)
        self.bbox_embed = MLP(dim, dim, 4, 3)
        self.mask_head = (
            MaskHead(dim, spec.dec_layers, spec.mask_downsample_ratio) if spec.is_segmentation else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Upstream's from-scratch init (rfdetr-upstream.md section 2.7).

        Xavier-uniform for every matrix of the decoder and the two-stage projections, then the deformable
        attention's own init; zero-init references and last box layers; class biases at the focal prior; the
        two-stage class/box heads start as copies of the final heads. Backbone: DINOv2 init (its own method).
        """
        for module in (self.decoder, self.query_selection.proj):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for layer in self.decoder.layers:
            layer.cross_attn.reset_parameters()
            # nn.MultiheadAttention's init: zero projection biases.
            nn.init.zeros_(layer.self_attn.in_proj.bias)
            nn.init.zeros_(layer.self_attn.out_proj.bias)
        nn.init.zeros_(self.refpoint_embed.weight)
        nn.init.normal_(self.query_feat.weight)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        with torch.no_grad():
            for cls_head, box_head in zip(
                self.query_selection.class_embed, self.query_selection.bbox_embed, strict=True
            ):
                cls_head.load_state_dict(self.class_embed.state_dict())
                box_head.load_state_dict(self.bbox_embed.state_dict())

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute backbone blocks in the backward pass (less memory, about one more backbone forward)."""
        self.backbone.grad_checkpointing = enabled

    def set_drop_path(self, rate: float) -> None:
        """Backbone stochastic depth for training: block ``i`` drops its branches with ``rate * i / (n - 1)``."""
        self.backbone.set_drop_path(rate)

    def features(
        self, images: Tensor, pos_table: Tensor | None = None, check: bool = True
    ) -> tuple[list[Tensor], Tensor, list[int]]:
        """Backbone + projector.

        Args:
            images: ``[B, 3, H, W]`` normalised, H and W multiples of ``spec.size_multiple``. Callers with
                user input check the size first (``Variant.check_resolution``: predict, training); here a
                wrong size is a ``ValueError``, and the check is left out of traced graphs.
            pos_table: the backbone's position table for this input size, precomputed (deploy models).
            check: check the input shape here (``False``: the caller did, e.g. a traced deploy model).

        Returns:
            ``levels`` (list of ``[B, C, h_l, w_l]``), ``memory [B, S, C]`` (levels flattened row-major and
            concatenated) and ``spatial_shapes`` (flat ``[h0, w0, h1, w1, ...]``).
        """
        if check:
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
            if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
                self._check_size(int(images.shape[-2]), int(images.shape[-1]))
        levels = self.projector(self.backbone(images, pos_table))
        spatial_shapes = [s for lvl in levels for s in lvl.shape[-2:]]
        # [B, C, h, w] -> [B, h*w, C]
        flat = [lvl.flatten(2).transpose(1, 2) for lvl in levels]
        memory = flat[0].contiguous() if len(flat) == 1 else torch.cat(flat, dim=1)
        return levels, memory, spatial_shapes

    def _check_size(self, height: int, width: int) -> None:
        m = self.spec.size_multiple
        for side in (height, width):
            if side <= 0 or side % m:
                near = ", ".join(str(s) for s in valid_sizes(m, max(side, 1)))
                raise ValueError(
                    f"{self.spec.name}: input {height}x{width} is not a multiple of {m} per side (patch size "
                    f"{self.spec.patch_size} x {self.spec.num_windows} window(s)); nearest valid sizes for "
                    f"{side}: {near}. Resize the images first (RFDETR.predict does)."
                )

    def _initial_queries(self, ts_boxes: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        """Content queries and reference boxes for ``groups`` groups: ``[B, G*Q, C]``, ``[B, G*Q, 4]``."""
        b = ts_boxes.shape[0]
        q = self.num_queries
        rows = groups * q
        tgt = self.query_feat.weight[:rows].unsqueeze(0).expand(b, -1, -1)
        ref = self.refpoint_embed.weight[:rows].unsqueeze(0).expand(b, -1, -1)
        k = ts_boxes.shape[1] // groups
        if k == q:
            return tgt, apply_box_delta(ref, ts_boxes)
        # Fewer memory cells than queries: the rows past the selected cells keep their raw learned boxes.
        # [B, G*Q, 4] -> [B, G, Q, 4]
        ref = ref.reshape(b, groups, q, 4)
        ts = ts_boxes.reshape(b, groups, k, 4)
        ref = torch.cat([apply_box_delta(ref[:, :, :k], ts), ref[:, :, k:]], dim=2)
        return tgt, ref.reshape(b, rows, 4)

    def forward(self, images: Tensor) -> dict[str, Any]:
        """Run the network.

        Args:
            images: ``[B, 3, H, W]`` float, normalised; H and W multiples of ``spec.size_multiple``
                (else ``ValueError``).

        Returns:
            Eval mode (group 0 only, last layer only): ``pred_logits [B, Q, K]``, ``pred_boxes [B, Q, 4]``
            (normalised cxcywh, not clamped), and for segmentation ``pred_masks [B, Q, H/4, W/4]`` logits.

            Training mode: the same keys over all ``G*Q`` queries (group ``g`` = rows ``g*Q:(g+1)*Q``), plus
            ``aux_outputs`` (list over the earlier decoder layers, same keys) and ``enc_outputs`` (two-stage
            proposals, same keys). Every ``pred_masks`` entry is then a lazy dict
            ``{"spatial_features": [B, C, H/4, W/4], "query_features": [B, G*Q, C], "bias": [B, G*Q] or [1]}``
            (:meth:`MaskHead.lazy`: logits ``query_features . spatial_features + bias``).
        """
        training = self.training
        if not training:
            logits, boxes, masks = self.forward_deploy(images, check=True)
            out: dict[str, Any] = {"pred_logits": logits, "pred_boxes": boxes}
            if masks is not None:
                out["pred_masks"] = masks
            return out
        groups = self.group_detr
        levels, memory, shapes = self.features(images)
        ts_feats, ts_boxes, ts_logits = self.query_selection(memory, shapes, groups, with_logits=training)
        tgt, ref = self._initial_queries(ts_boxes.detach(), groups)
        hs_layers = self.decoder(tgt, ref, memory, shapes, groups, all_layers=training)
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        hs_all = torch.stack(hs_layers)  # [L, B, G*Q, C]: one head call for all layers
        logits = self.class_embed(hs_all)
        boxes = apply_box_delta(self.bbox_embed(hs_all), ref)
        per_layer = [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(len(hs_layers))]
        enc: dict[str, Any] = {"pred_logits": ts_logits, "pred_boxes": ts_boxes}
        if self.mask_head is not None:
            mask_layers, mask_enc = self.mask_head.lazy(levels[0], hs_layers, ts_feats, image_size)
            for entry, masks in zip(per_layer, mask_layers, strict=True):
                entry["pred_masks"] = masks
            enc["pred_masks"] = mask_enc
        out = dict(per_layer[-1])
        out["aux_outputs"] = per_layer[:-1]
        out["enc_outputs"] = enc
        return out

    def forward_deploy(
        self, images: Tensor, pos_table: Tensor | None = None, check: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The inference forward (group 0, last decoder layer) as a tuple; what eval-mode :meth:`forward` runs.

        Args:
            images: ``[B, 3, H, W]`` normalised.
            pos_table: the backbone's position table for ``H x W``, precomputed (see
                :class:`rfdetr_core.deploy.DeployModel`); default: resized here from the learned table.
            check: check the input shape (``False`` inside traced graphs: the caller checks at its boundary).

        Returns:
            ``pred_logits [B, Q, K]``, ``pred_boxes [B, Q, 4]`` (normalised cxcywh) and ``pred_masks
            [B, Q, H/4, W/4]`` mask logits (``None`` without a mask head).
        """
        levels, memory, shapes = self.features(images, pos_table, check)
        _, ts_boxes, _ = self.query_selection(memory, shapes, 1, with_logits=False)
        tgt, ref = self._initial_queries(ts_boxes.detach(), 1)
        hs = self.decoder(tgt, ref, memory, shapes, 1, all_layers=False)[-1]
        logits = self.class_embed(hs)
        boxes = apply_box_delta(self.bbox_embed(hs), ref)
        masks = None
        if self.mask_head is not None:
            masks = self.mask_head(levels[0], hs, (int(images.shape[-2]), int(images.shape[-1])))
        return logits, boxes, masks

