"""One run of the scratch-recipe sweep: the CPU demo (``seg-tiny`` on the synthetic dataset) with overrides.

An experiment driver, not part of the packages: it patches the recipe tables (``recipes.SCRATCH``,
``SCRATCH_LOSS_WEIGHTS``, ``SCRATCH_MATCH_COSTS``, ``SCRATCH_DATA``), the ``seg-tiny`` variant and, for two options, methods of the
criterion, then calls ``rfdetr_train.train``. ``launch.sh`` starts many of these side by side (one per line
of a ``roundN.txt`` file); the results of the sweep behind the scratch recipe are in
``benchmarks/results/scratch_sweep/h100_runs.json`` and docs/training.md. The rounds' specs override the
recipe of commit b7419d7 (lr 5e-4, upstream loss weights), which later commits replaced by the sweep's winner.

    python benchmarks/scratch_sweep/run_one.py NAME '{"train": {...}, "criterion": {...}, "recipe": {...},
        "variant": {...}, "class_loss": "focal", "mask_final_only": true}'

* ``train``: keyword arguments of ``rfdetr_train.train`` (``seed``, ``lr``, ``steps``, ``device``, ...).
* ``criterion``: ``weight_<loss>`` / ``cost_<term>`` entries (``weight_class``, ``cost_mask_ce``, ...) replacing
  fields of ``SCRATCH_LOSS_WEIGHTS`` / ``SCRATCH_MATCH_COSTS``.
* ``recipe`` / ``data``: entries merged into ``SCRATCH`` / ``SCRATCH_DATA``.
* ``variant``: fields of the ``seg-tiny`` :class:`~rfdetr_core.variants.Variant` to replace.
* ``class_loss: "focal"``: plain sigmoid focal loss (targets 1 at matched cells, alpha 0.25, gamma 2;
  Lin et al. 2017) instead of the IoU-aware BCE.
* ``mask_final_only``: mask losses on the final decoder layer only (none on earlier layers or the two-stage
  output).

Writes ``$SWEEP_JSON/NAME.json`` (else ``$OUT``): the spec, wall time and the history
``[[step, seconds, segm AP50, bbox AP50], ...]``; a run stopped by SIGINT still writes what it validated.
"""

import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

name, spec = sys.argv[1], json.loads(sys.argv[2])
out = os.environ.get("SWEEP_JSON") or os.environ.get("OUT", "/tmp/sweep_out")

from rfdetr_core import variants  # noqa: E402
from rfdetr_train.engine import recipes  # noqa: E402
from rfdetr_train.losses import criterion as crit_mod  # noqa: E402

if spec.get("variant"):
    variants._REGISTRY["seg-tiny"] = dataclasses.replace(variants._REGISTRY["seg-tiny"], **spec["variant"])
# the rounds' flat names -> fields of LossWeights / MatchCosts ("weight_class" -> ce, "cost_class" -> cls)
_crit = spec.get("criterion", {})
_weights = {k.removeprefix("weight_").replace("class", "ce"): v for k, v in _crit.items() if k.startswith("weight_")}
_costs = {k.removeprefix("cost_").replace("class", "cls"): v for k, v in _crit.items() if k.startswith("cost_")}
recipes.SCRATCH_LOSS_WEIGHTS = dataclasses.replace(recipes.SCRATCH_LOSS_WEIGHTS, **_weights)
recipes.SCRATCH_MATCH_COSTS = dataclasses.replace(recipes.SCRATCH_MATCH_COSTS, **_costs)
recipes.SCRATCH.update(spec.get("recipe", {}))
if spec.get("data"):
    recipes.SCRATCH_DATA.update(spec["data"])

if spec.get("class_loss") == "focal" or spec.get("mask_final_only"):
    # The patches below replace per-layer methods: keep the criterion on its per-layer pass.
    _init = crit_mod.SetCriterion.__init__

    def _per_layer_init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        self.batch_layers = False

    crit_mod.SetCriterion.__init__ = _per_layer_init

if spec.get("class_loss") == "focal":
    alpha = spec.get("focal_alpha", 0.25)

    def _focal(self, logits, cells, src_xyxy, tgt_xyxy):
        prob = logits.sigmoid()
        target = torch.zeros_like(logits).index_put(cells, torch.ones_like(cells[0], dtype=logits.dtype))
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = prob * target + (1 - prob) * (1 - target)
        loss = ce * (1 - p_t) ** self.focal_gamma
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
        return loss.sum()

    crit_mod.SetCriterion._ia_bce = _focal

if spec.get("mask_final_only"):
    orig = crit_mod.SetCriterion._layer_losses

    def _layer_losses(self, out_, batch, matches, num_boxes):
        seg = self.segmentation
        if "aux_outputs" not in out_:
            self.segmentation = False
        try:
            return orig(self, out_, batch, matches, num_boxes)
        finally:
            self.segmentation = seg

    crit_mod.SetCriterion._layer_losses = _layer_losses

import rfdetr_train  # noqa: E402

t0 = time.time()
kwargs = dict(output=f"/tmp/sweep_runs/{name}", progress=False)
kwargs.update(spec.get("train", {}))
result = rfdetr_train.train(**kwargs)
hist = [
    [s, sec, m.get("segm", {}).get("AP50"), m.get("bbox", {}).get("AP50")] for s, sec, m in result.history
]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump({"name": name, "spec": spec, "wall": time.time() - t0, "history": hist}, f)
print("RESULT", name, json.dumps(hist))
