"""What a new training run starts from when ``--model`` / ``--weights`` leave it open.

* ``--weights NAME|PATH``: those weights; the variant is ``--model``, else the one the file or name says.
* ``--weights none``: random initialisation of ``--model`` (else of the default below); the scratch recipe.
* ``--model V`` alone: V's official COCO weights when V has published ones (fine-tuning), else random init
  (``seg-tiny``, the CPU demo model, has none).
* neither, with a dataset (``--data``, ``--train-ann``): :data:`DATA_DEFAULT` from its official COCO weights
  with the finetune recipe -- real data gets a pretrained model.
* neither, without a dataset (the built-in synthetic demo): ``seg-tiny`` from random weights (scratch recipe).

Only a new run is resolved here: ``--resume`` continues with the run's saved (already resolved) configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

from rfdetr_core.variants import get_variant

# The model real data gets by default: the smallest segmentation variant with published (COCO) weights; it
# fits CPUs and small GPUs. (seg-tiny is smaller, but has no published weights: trained from random weights
# on a small dataset it learns next to nothing in a short run.)
DATA_DEFAULT = "seg-nano"
# ``--weights none``: random initialisation, also of a variant with published weights.
NO_WEIGHTS = "none"


@dataclass(frozen=True)
class StartingPoint:
    """The resolved ``model`` / ``weights`` of a new run (``weights`` None = random init). ``chosen``: why
    the weights were picked when ``--weights`` did not name them (for error messages); ``note``: one log line
    saying what was chosen for the user, why, and how to choose otherwise."""

    model: str | None
    weights: str | None
    chosen: str | None = None
    note: str | None = None


def choose_starting_point(model: str | None, weights: str | None, has_data: bool) -> StartingPoint:
    """Resolve ``--model`` / ``--weights`` of a new run (see the module docstring for the rules)."""
    if weights is not None and weights.strip().lower() == NO_WEIGHTS:
        return StartingPoint(model or (DATA_DEFAULT if has_data else None), None)
    if weights is not None:
        return StartingPoint(model, weights)
    if model is not None:
        published = get_variant(model).weights is not None
        if not published:
            return StartingPoint(model, None)
        return StartingPoint(model, get_variant(model).name, f"what --model {model} means without --weights")
    if not has_data:
        return StartingPoint(None, None)  # the CPU demo: seg-tiny from scratch on the synthetic dataset
    note = (
        f"--data without --model/--weights: fine-tuning {DATA_DEFAULT} from its official COCO weights (the "
        "smallest segmentation variant with published weights; fits CPU and small GPUs). Choose another "
        "with --model VARIANT (e.g. seg-small), your own weights with --weights PATH, or random weights with "
        "--weights none (--model seg-tiny: the small CPU demo model, from scratch)."
    )
    return StartingPoint(DATA_DEFAULT, DATA_DEFAULT, "the default for --data", note)


def has_dataset(data) -> bool:
    """Whether a :class:`~rfdetr_train.data.config.DataConfig` names a dataset (else: the synthetic demo)."""
    return bool(data.path or data.train_ann or data.val_ann or data.test_ann)
