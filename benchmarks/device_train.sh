#!/usr/bin/env bash
# GPU training runs of the training issue, made on the lent GPU machine (no network there):
#
#   bash benchmarks/device_train.sh one-gpu [FLAGS...]   # fine-tune seg-nano on coco128_seg, one GPU
#   bash benchmarks/device_train.sh two-gpu [FLAGS...]   # the same through `accelerate launch --num_processes 2`
#
# FLAGS are passed on to rfdetr_train (e.g. --batch-size 16 --grad-accum 1).
#
# The starting weights are a random-init checkpoint in upstream RF-DETR's .pth layout, written by upstream
# rfdetr itself (scripts/make_upstream_random_checkpoint.py): official weights cannot be downloaded there, and
# this exercises the same conversion path (upstream keys -> ours, class heads resized to the 80 classes).
# Needs: .data/coco128_seg (a copy of the shared coco128_seg), the workspace's sources on PYTHONPATH and
# missing packages installed (see docs/benchmarks.md for the call), $OUT for the logs.
set -uo pipefail
mode=${1:?one-gpu or two-gpu}
shift
epochs=${EPOCHS:-40}
limit=${LIMIT:-3600}  # seconds; then SIGTERM: the trainer saves a resumable checkpoint and stops
out=${OUT:-out}
mkdir -p "$out"
runs=/tmp/rfdetr-runs
ckpt=/tmp/seg-nano-upstream-random.pth
[ -f "$ckpt" ] || python3 scripts/make_upstream_random_checkpoint.py --variant seg-nano --out "$ckpt" 2>&1 \
    | grep -v -i warn
args=(--data .data/coco128_seg --weights "$ckpt" --epochs "$epochs" --log-every 2 --no-progress
      --output "$runs" --name "$mode" --workers 6 "$@")
case "$mode" in
    one-gpu) timeout "$limit" python3 -m rfdetr_train "${args[@]}" 2>&1 | tee "$out/$mode.log" ;;
    two-gpu) timeout "$limit" accelerate launch --num_processes 2 --multi_gpu -m rfdetr_train "${args[@]}" 2>&1 \
                 | tee "$out/$mode.log" ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
rc=${PIPESTATUS[0]}
for f in train_log.csv results.csv; do
    [ -f "$runs/$mode/$f" ] && cp "$runs/$mode/$f" "$out/${mode}_$f"
done
exit "$rc"
