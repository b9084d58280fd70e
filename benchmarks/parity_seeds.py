"""Parity with upstream rfdetr 1.11.2 over random initialisations (issue 12, item 1).

For each seed and ``variant@HxW``: ``torch.manual_seed(seed)``, build upstream's model (random init, eval,
float32, CPU), draw the input ``torch.randn(1, 3, H, W)`` from the same global generator, convert the state dict
with ``create_model(variant, weights=path)`` and run both. Printed per cell (relative L2 error of pred_logits /
pred_boxes / pred_masks against upstream):

- ``sorted``: ours as is, the queries of each side in the order of their best class logit (issue 12's protocol);
- ``slots``: ours as is, query slot ``j`` against upstream's slot ``j``;
- ``pinned``: ours with upstream's two-stage choice (``QuerySelection.fixed_selection``), slot against slot;
- ``order``: ``same`` when our top-k cells and their order equal upstream's, else how many slots differ and the
  largest gap, in upstream's scores, between the two cells
  one slot holds on the two sides.

    python benchmarks/parity_seeds.py --cases large@704 medium@640 --seeds 0-9 --json out.json

``--dtype float64`` runs both sides (weights and input) in float64: there the scores of the two
implementations agree far below any gap between cells, so a difference that remains would be a rule that
differs, not rounding.

Needs upstream ``rfdetr`` (a dev dependency) and no network.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

CONFIGS = {
    "seg-nano": "RFDETRSegNanoConfig",
    "seg-small": "RFDETRSegSmallConfig",
    "seg-medium": "RFDETRSegMediumConfig",
    "seg-large": "RFDETRSegLargeConfig",
    "seg-xlarge": "RFDETRSegXLargeConfig",
    "seg-2xlarge": "RFDETRSeg2XLargeConfig",
    "nano": "RFDETRNanoConfig",
    "small": "RFDETRSmallConfig",
    "medium": "RFDETRMediumConfig",
    "large": "RFDETRLargeConfig",
    "base": "RFDETRBaseConfig",
    "large-legacy": "RFDETRLargeDeprecatedConfig",
}


def _sorted(out: dict) -> dict[str, torch.Tensor]:
    """Queries of image 0 in the order of their best class logit: each ``[Q, ...]``."""
    order = out["pred_logits"][0].max(-1).values.argsort(descending=True)
    return {k: v[0][order] for k, v in out.items() if isinstance(v, torch.Tensor)}


def _slots(out: dict) -> dict[str, torch.Tensor]:
    """Queries of image 0 in slot order: each ``[Q, ...]``."""
    return {k: v[0] for k, v in out.items() if isinstance(v, torch.Tensor)}


def _rel(a: dict, b: dict) -> dict[str, float]:
    return {k: float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b}


def measure(variant: str, size: tuple[int, int], seed: int, dtype: torch.dtype = torch.float32) -> dict:
    import rfdetr.config as upstream_config
    import rfdetr.models as upstream_models

    from rfdetr_core.factory import create_model

    weights = "/nonexistent/rfdetr-parity.pth" if variant in ("base", "large-legacy") else None
    cfg = getattr(upstream_config, CONFIGS[variant])(pretrain_weights=weights, device="cpu")
    torch.manual_seed(seed)
    upstream = upstream_models.build_model_from_config(cfg).eval()
    images = torch.randn(1, 3, *size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upstream.pth"
        torch.save(upstream.state_dict(), path)
        ours = create_model(variant, weights=path).eval()
    upstream, ours, images = upstream.to(dtype), ours.to(dtype), images.to(dtype)

    scores: dict[str, torch.Tensor] = {}

    def grab(_module, _args, out):  # upstream's first call scores every cell: out [B, S, K]
        scores.setdefault("cells", out.max(-1).values)

    handle = upstream.transformer.enc_out_class_embed[0].register_forward_hook(grab)
    with torch.no_grad():
        try:
            ref = upstream(images)
        finally:
            handle.remove()
        theirs = scores["cells"]  # [B, S]
        k = min(ours.num_queries, theirs.shape[1])
        up_cells = theirs.topk(k, dim=1).indices  # [B, k]
        _, memory, shapes = ours.features(images)
        our_cells = ours.query_selection.scores(memory, shapes).topk(k, dim=1).indices
        raw = ours(images)
        with ours.query_selection.fixed_selection(up_cells):
            pinned = ours(images)

    differ = (up_cells[0] != our_cells[0]).nonzero().flatten()
    if differ.numel():
        gap = (theirs[0][up_cells[0][differ]] - theirs[0][our_cells[0][differ]]).abs().max()
        order = f"{differ.numel()} slots, gap {float(gap):.1e}"
    else:
        order = "same"
    return {
        "variant": variant,
        "size": list(size),
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "sorted": _rel(_sorted(raw), _sorted(ref)),
        "slots": _rel(_slots(raw), _slots(ref)),
        "pinned": _rel(_slots(pinned), _slots(ref)),
        "order": order,
    }


def _parse_case(text: str) -> tuple[str, tuple[int, int]]:
    variant, _, size = text.partition("@")
    h, _, w = size.partition("x")
    return variant, (int(h), int(w or h))


def _parse_seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", nargs="+", default=["large@704", "medium@640", "seg-nano@624", "large@512x640"]
    )
    parser.add_argument("--seeds", default="0-9", help="'0-9' or '1,2,1234'")
    parser.add_argument("--json", type=Path, help="also write every cell here")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="both sides")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("rf-detr").setLevel(logging.ERROR)
    rows = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}")
    print("| variant @ input | seed | sorted | slots | pinned | order | s |")
    print("|---|---|---|---|---|---|---|")
    cases = [_parse_case(c) for c in args.cases]
    for seed in _parse_seeds(args.seeds):
        for variant, size in cases:
            start = time.perf_counter()
            row = measure(variant, size, seed, getattr(torch, args.dtype))
            rows.append(row)
            cells = [_fmt(row[col]) for col in ("sorted", "slots", "pinned")]
            print(
                f"| {variant} @ {size[0]}x{size[1]} | {seed} | {' | '.join(cells)} | {row['order']} | "
                f"{time.perf_counter() - start:.0f} |",
                flush=True,
            )
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))


def _fmt(errors: dict[str, float]) -> str:
    return " / ".join(f"{errors[k]:.1e}" for k in ("pred_logits", "pred_boxes", "pred_masks") if k in errors)


if __name__ == "__main__":
    main()
