"""Repro: the layer-batched loss pass through inductor, CUDA-like path (folded mask head, batched layers), on CPU."""
import sys, time
import torch
sys.path.insert(0, "/work/main/benchmarks")
from train_step_profile import _targets
from rfdetr_core.factory import build_model
from rfdetr_core.variants import get_variant
from rfdetr_train.losses import build_criterion

fold = "nofold" not in sys.argv
amp = "noamp" not in sys.argv
v = get_variant("seg-nano")
torch.manual_seed(0)
model = build_model(v, 80).train()
model.mask_head.fold_in_training = fold
crit = build_criterion(80, v.group_detr, segmentation=True, compile_losses=True)
crit.batch_layers = True
images = torch.randn(2, 3, v.resolution, v.resolution)
targets = _targets(2, 80, v.resolution, torch.device("cpu"))
print(torch.__version__, "fold", fold, "amp", amp, flush=True)
t0 = time.time()
with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
    out = model(images)
    losses = crit(out, targets)
total = crit.total_loss(losses)
total.backward()
print("ok", float(total), f"{time.time()-t0:.0f} s", flush=True)
