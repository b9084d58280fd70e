"""Two-stage query selection and the deformable DETR decoder of RF-DETR.

Lineage: DETR -> Deformable DETR (two-stage proposals) -> Conditional DETR (query position from a sine embedding
of the reference) -> Group DETR (Chen et al., ICCV 2023: ``G`` independent query groups in training) -> LW-DETR.
Numbers and behaviour follow rfdetr-upstream.md sections 2.4-2.8: references are fixed for all layers
("lite refine"), boxes use the reparameterisation ``cxcy = d_xy * ref_wh + ref_xy``, ``wh = exp(d_wh) * ref_wh``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from rfdetr_core.models.deform_attn import MSDeformAttn


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int, num_layers: int) -> None:
        super().__init__()
        dims = [dim_in] + [dim_hidden] * (num_layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == last else F.relu(layer(x))
        return x


def apply_box_delta(delta: Tensor, ref: Tensor) -> Tensor:
    """Box reparameterisation: ``[..., 4]`` deltas on ``[..., 4]`` cxcywh references -> cxcywh boxes."""
    cxcy = delta[..., :2] * ref[..., 2:] + ref[..., :2]
    wh = delta[..., 2:].exp() * ref[..., 2:]
    return torch.cat([cxcy, wh], dim=-1)


def box_sine_embedding(boxes: Tensor, dim_per_coord: int) -> Tensor:
    """Sine embedding of cxcywh boxes: ``[..., 4] -> [..., 4 * dim_per_coord]`` in the order (y, x, w, h).

    Each coordinate ``v`` gives ``sin(2*pi*v / 10000^(2i/d)), cos(...)`` interleaved, ``i < d/2``
    (Conditional DETR / DAB-DETR).
    """
    idx = torch.arange(dim_per_coord, dtype=boxes.dtype, device=boxes.device)
    freq = 10000 ** (2 * (idx // 2) / dim_per_coord)
    # [..., 4] -> [..., 4, d]
    phase = (boxes * (2 * math.pi))[..., None] / freq
    emb = torch.stack([phase[..., 0::2].sin(), phase[..., 1::2].cos()], dim=-1).flatten(-2)
    x, y, w, h = emb.unbind(-2)
    return torch.cat([y, x, w, h], dim=-1)


class GroupSelfAttention(nn.Module):
    """Self-attention among the queries of each group (groups never see each other).

    Packed projection ``in_proj`` ``[3C, C]`` (q, k, v rows); query = key = content + position, value = content.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} self-attention heads")
        self.heads = heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, tgt: Tensor, pos: Tensor, groups: int) -> Tensor:
        """``tgt, pos [B, G*Q, C]`` -> ``[B, G*Q, C]``."""
        b, n, c = tgt.shape
        d = c // self.heads
        w, bias = self.in_proj.weight, self.in_proj.bias
        qk = F.linear(tgt + pos, w[: 2 * c], bias[: 2 * c])
        v = F.linear(tgt, w[2 * c :], bias[2 * c :])
        # [B, G*Q, 2C] -> [2, B, G, heads, Q, d] -> [2, B*G, heads, Q, d] (a view: B and G stay adjacent)
        qk = qk.view(b, groups, n // groups, 2, self.heads, d).permute(3, 0, 1, 4, 2, 5).flatten(1, 2)
        # [B, G*Q, C] -> [B, G, heads, Q, d] -> [B*G, heads, Q, d]
        v = v.view(b, groups, n // groups, self.heads, d).transpose(2, 3).flatten(0, 1)
        # 4-d attention: the ONNX exporter (and fused SDPA kernels) take only 4-d query/key/value
        if tgt.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # CPU training runs the reference (math) kernel: the float order of 0.1.x, whose 5-d call took
            # it, so a seeded CPU run (the demo) repeats earlier releases' numbers bit for bit. The fused
            # kernel differs from it by ~5e-7 (outputs) and ~1e-6 (gradients) relative.
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(qk[0], qk[1], v)
        else:
            out = F.scaled_dot_product_attention(qk[0], qk[1], v)
        # [B*G, heads, Q, d] -> [B*G, Q, heads, d] -> [B, G*Q, C]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: group self-attention, deformable cross-attention, ReLU FFN."""

    def __init__(
        self, dim: int, sa_heads: int, ca_heads: int, levels: int, points: int, ffn_dim: int
    ) -> None:
        super().__init__()
        self.self_attn = GroupSelfAttention(dim, sa_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, ca_heads, levels, points)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: Tensor,
        pos: Tensor,
        ref_boxes: Tensor,
        memory: Tensor,
        spatial_shapes: list[int],
        groups: int,
    ) -> Tensor:
        """``tgt, pos [B, N, C]``, ``ref_boxes [B, N, 4]``, ``memory [B, S, C]`` -> ``[B, N, C]``."""
        tgt = self.norm1(tgt + self.self_attn(tgt, pos, groups))
        tgt = self.norm2(tgt + self.cross_attn(tgt + pos, ref_boxes, memory, spatial_shapes))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Decoder(nn.Module):
    """Stack of decoder layers sharing one reference set and one final LayerNorm.

    The query position embedding is computed once from the references (they are not refined between layers).
    """

    def __init__(
        self, dim: int, num_layers: int, sa_heads: int, ca_heads: int, levels: int, points: int, ffn_dim: int
    ) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(
            DecoderLayer(dim, sa_heads, ca_heads, levels, points, ffn_dim) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)

    def forward(
        self,
        tgt: Tensor,
        ref_boxes: Tensor,
        memory: Tensor,
        spatial_shapes: list[int],
        groups: int,
        all_layers: bool,
    ) -> list[Tensor]:
        """Decode.

        Args:
            tgt: ``[B, N, C]`` content queries (``N = groups * Q``).
            ref_boxes: ``[B, N, 4]`` cxcywh references.
            memory: ``[B, S, C]``.
            all_layers: return every layer's normalised output (training) or only the last one.

        Returns:
            List of ``[B, N, C]`` (normalised), one per layer or just the last.
        """
        pos = self.ref_point_head(box_sine_embedding(ref_boxes, self.dim // 2))
        outs = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, pos, ref_boxes, memory, spatial_shapes, groups)
            if all_layers or i == last:
                outs.append(self.norm(tgt))
        return outs


def encoder_proposals(
    spatial_shapes: list[int], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """One proposal box per memory cell.

    Returns:
        ``proposals [S, 4]`` cxcywh with centres at cell centres and size ``0.05 * 2^level``, zeroed where
        invalid; ``valid [S, 1]`` bool, true where all four coordinates lie in (0.01, 0.99). On grids wider than
        50 cells the outermost rows/columns fail that test, as upstream (rfdetr-upstream.md section 2.5).
    """
    parts = []
    for lvl, (h, w) in enumerate(zip(spatial_shapes[0::2], spatial_shapes[1::2])):
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        # the divisor is filled on the device: a host tensor here would be a host-to-device copy inside every
        # forward, which a CUDA graph cannot capture (and a Python-number divisor rounds differently on CUDA)
        size = torch.stack(
            [torch.full((), w, dtype=torch.float32, device=device), torch.full_like(xs[0, 0], h)]
        )
        # [h, w, 2] -> [h*w, 2] centres (x, y) in [0, 1]
        centres = (torch.stack([xs, ys], -1) + 0.5) / size
        centres = centres.reshape(-1, 2)
        parts.append(torch.cat([centres, torch.full_like(centres, 0.05 * 2.0**lvl)], dim=-1))
    proposals = torch.cat(parts, dim=0)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    return proposals.masked_fill(~valid, 0.0).to(dtype), valid


class QuerySelection(nn.Module):
    """Two-stage selection: score every memory cell per group and keep the top-``num_queries`` as proposals.

    Per group ``g``: ``proj[g]`` (Linear) -> ``norm[g]`` (LayerNorm) -> ``class_embed[g]`` ranks cells by their best
    class logit; ``bbox_embed[g]`` refines the selected cells' proposal boxes.

    Selection rule (the same as upstream rfdetr 1.11.2): ``torch.topk`` of each cell's best class logit over all
    cells, descending, invalid cells included (their memory and proposal are zero, so they share one score and
    are interchangeable); the ``j``-th selected cell is paired with the ``j``-th learned query. Equal scores give
    the same cells in the same order as upstream, ties included (same function on the same values). The order is
    discontinuous where two scores cross: two correct float32 implementations, whose scores differ by rounding
    (about 1e-6 here, like upstream's own float32-vs-float64 difference), may order two cells differently when
    their scores are that close, which pairs them with each other's query. :meth:`fixed_selection` reuses another
    implementation's choice, so that everything after the choice can be compared exactly.
    """

    def __init__(self, dim: int, num_slots: int, groups: int, num_queries: int) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(groups))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(groups))
        self.class_embed = nn.ModuleList(nn.Linear(dim, num_slots) for _ in range(groups))
        self.bbox_embed = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(groups))
        self._fixed: Tensor | None = None

    @contextlib.contextmanager
    def fixed_selection(self, cells: Tensor) -> Iterator[None]:
        """Within the block, group 0 selects ``cells [B, k]`` (memory cell indices, in that order) instead of its
        top-k; for parity checks against another implementation's choice. Other groups are unaffected."""
        if cells.dim() != 2 or cells.dtype != torch.int64:
            raise ValueError(
                f"cells must be an int64 [B, k] index tensor, got {cells.dtype} {tuple(cells.shape)}"
            )
        self._fixed = cells
        try:
            yield
        finally:
            self._fixed = None

    def masked_memory(self, memory: Tensor, spatial_shapes: list[int]) -> tuple[Tensor, Tensor]:
        """``memory [B, S, C]`` with invalid cells zeroed, and ``proposals [S, 4]``."""
        proposals, valid = encoder_proposals(spatial_shapes, memory.device, memory.dtype)
        return memory.masked_fill(~valid, 0.0), proposals

    def scores(self, memory: Tensor, spatial_shapes: list[int], group: int = 0) -> Tensor:
        """Ranking score of every cell for one group: ``[B, S]`` (for diagnostics and tests)."""
        masked, _ = self.masked_memory(memory, spatial_shapes)
        feats = self.norm[group](self.proj[group](masked))
        return self.class_embed[group](feats).max(-1).values

    def forward(
        self, memory: Tensor, spatial_shapes: list[int], groups: int, with_logits: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Select.

        Args:
            memory: ``[B, S, C]``.
            groups: how many groups to run (1 in eval).
            with_logits: also return the selected cells' class logits (training: the encoder loss needs them).

        Returns:
            ``features [B, G*k, C]`` (normalised selected memory), ``boxes [B, G*k, 4]`` (refined proposals, with
            gradient), ``logits [B, G*k, K]`` or None; ``k = min(num_queries, S)``, group 0 first.
        """
        masked, proposals = self.masked_memory(memory, spatial_shapes)
        k = min(self.num_queries, memory.shape[1])
        feats, boxes, logits = [], [], []
        for g in range(groups):
            pre = self.proj[g](masked)
            cell_logits = self.class_embed[g](self.norm[g](pre))
            if g == 0 and self._fixed is not None:
                idx = self._fixed.to(cell_logits.device)  # [B, k]
            else:
                idx = cell_logits.max(-1).values.topk(k, dim=1).indices  # [B, k]
            # LayerNorm is per token, so normalising only the selected rows equals gathering normalised rows.
            sel = self.norm[g](pre.gather(1, idx[..., None].expand(-1, -1, pre.shape[-1])))
            boxes.append(apply_box_delta(self.bbox_embed[g](sel), proposals[idx]))
            feats.append(sel)
            if with_logits:
                logits.append(cell_logits.gather(1, idx[..., None].expand(-1, -1, cell_logits.shape[-1])))
        cat = (lambda t: t[0]) if groups == 1 else (lambda t: torch.cat(t, dim=1))
        return cat(feats), cat(boxes), (cat(logits) if with_logits else None)
