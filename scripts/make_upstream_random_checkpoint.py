"""Write a random-init checkpoint in upstream RF-DETR's ``.pth`` layout, built by the upstream package.

Stands in for an official checkpoint where those cannot be downloaded (the GPU machines have no network):
fine-tuning from it exercises the same conversion path (upstream keys -> ours, class heads resized) as
fine-tuning from ``rf-detr-seg-nano.pt``. Needs upstream ``rfdetr`` (a dev dependency of this workspace).

    python scripts/make_upstream_random_checkpoint.py --variant seg-nano --out seg-nano-random.pth

The file holds ``{"model": state_dict, "model_name": "RFDETRSegNano", "args": {...}}`` like upstream's
own ``.pth`` files (``args`` as a plain dict; no pickled classes).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rfdetr_core.weights.files import UPSTREAM_MODEL_NAMES

# our segmentation variant -> upstream model class name (its config class is that name + "Config")
MODEL_NAMES = {v: name for name, v in UPSTREAM_MODEL_NAMES.items() if v.startswith("seg-")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(MODEL_NAMES), default="seg-nano")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    try:
        import rfdetr.config as upstream_config
        import rfdetr.models as upstream_models
    except ImportError as exc:
        raise SystemExit(
            f"upstream rfdetr is needed for this script ({exc}); `uv sync` installs it."
        ) from None

    model_name = MODEL_NAMES[args.variant]
    cfg = getattr(upstream_config, model_name + "Config")(pretrain_weights=None, device="cpu")
    torch.manual_seed(args.seed)
    model = upstream_models.build_model_from_config(cfg)
    resolution = int(cfg.resolution)
    ckpt = {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "model_name": model_name,
        "args": {"resolution": resolution, "num_classes": int(cfg.num_classes)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, args.out)
    n = sum(v.numel() for v in ckpt["model"].values())
    print(f"wrote {args.out}: upstream {model_name}, random init (seed {args.seed}), {n / 1e6:.1f}M values")


if __name__ == "__main__":
    main()
