#!/usr/bin/env bash
# Issue 18's "same validation metrics as before the change" check on the lent GPU machine (no network there):
#
#   bash benchmarks/device_finetune_check.sh            # ARMS x SEEDS runs side by side, then the GPU tests
#
# Every run is the demo recipe (seg-tiny trained from scratch on the built-in synthetic dataset, scratch recipe,
# validation every 400 steps with per-class tables) for STEPS steps, warm-up fixed at the recipe's 100 steps, on
# the GPU with the default mixed precision (bf16 there). Arms:
#   before  the code before issue 18's training changes (BEFORE, default e330c4f^: the per-layer criterion and
#           matcher, no --compile), unpacked with `git archive` into .data/before (carry it);
#   eager   this tree, eager (the layer-batched criterion and matcher on CUDA);
#   graphs  this tree, --compile --compile-mode reduce-overhead --activation-memory-budget 0.5 (CUDA graphs);
#   losses  graphs with --compile-criterion (the loss pass compiled too); not in the default ARMS.
# ARMS (default "before eager graphs") picks them; ARMS x SEEDS runs take 2 cores each, at most 6 of them.
# Each run is pinned to 2 cores (1 loader worker); the GPU test suite runs meanwhile on the last 4 cores (the
# runs are judged by their metrics, not timed). Runs still going after LIMIT seconds get SIGTERM (the trainer
# saves and stops; results.csv keeps the validations made).
#
# Prepare here: rm -rf .data/before && mkdir -p .data/before &&
#   git archive e330c4f^ csrc packages/rfdetr-core/src packages/rfdetr-train/src | tar -x -C .data/before
# Needs the wheels of .whl (WHL=path) and $OUT. Writes under $OUT: finetune.txt (the table), gpu_tests.log,
# runs.tgz (each run's results.csv, train_log.csv and log).
set -uo pipefail
out=${OUT:-out}
whl=${WHL:-.whl}
steps=${STEPS:-1600}
seeds=${SEEDS:-"0 1"}
arms=${ARMS:-"before eager graphs"}
limit=${LIMIT:-470}
before=${BEFORE_TREE:-.data/before}
mkdir -p "$out"
count=$(( $(wc -w <<< "$arms") * $(wc -w <<< "$seeds") ))
[ "$count" -le 6 ] || { echo "$count runs: at most 6 (2 cores each; cores 12-15 run the tests)" >&2; exit 2; }
[[ " $arms " != *" before "* ]] || [ -d "$before/packages" ] || { echo "no $before/packages: unpack the old code first (see the header)" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$whl"/*.whl || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore RFDETR_DEFORM_ATTN=cuda \
    TORCH_CUDA_ARCH_LIST=9.0 CC=gcc CXX=g++ RFDETR_HOME=/tmp/rh OMP_NUM_THREADS=1
new_path=$PWD/packages/rfdetr-core/src:$PWD/packages/rfdetr-train/src:/tmp/site
old_path=$PWD/$before/packages/rfdetr-core/src:$PWD/$before/packages/rfdetr-train/src:/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/finetune.txt"
# build the kernel once (csrc/ is the same in both trees), so the runs do not queue on its build lock
PYTHONPATH=$new_path python3 -c "import torch, rfdetr_core.ops as o; print('torch', torch.__version__, 'kernel', \
o.deform_attn_backend())" 2>&1 | tee -a "$out/finetune.txt"
runs=/tmp/ft_runs
mkdir -p "$runs"
common=(--steps "$steps" --warmup-steps 100 --steps-per-validation 400 --device cuda --workers 1 --no-progress
        --output "$runs")
core=0
for seed in $seeds; do
    for arm in $arms; do
        name=${arm}_s$seed
        extra=()
        path=$new_path
        [ "$arm" = before ] && path=$old_path
        [ "$arm" = graphs ] && extra=(--compile --compile-mode reduce-overhead --activation-memory-budget 0.5)
        [ "$arm" = losses ] && extra=(--compile --compile-mode reduce-overhead --activation-memory-budget 0.5
                                      --compile-criterion)
        PYTHONPATH=$path timeout "$limit" taskset -c "$core,$((core + 1))" \
            python3 -m rfdetr_train --seed "$seed" --name "$name" "${common[@]}" "${extra[@]}" \
            > "$runs/$name.log" 2>&1 &
        core=$((core + 2))
        sleep 1
    done
done
PYTHONPATH=$new_path:$PWD/packages/rfdetr-export/src:$PWD/packages/rfdetr-serve/src taskset -c 12-15 \
    python3 -m pytest -m gpu tests/ -q -rfE --tb=short -p no:cacheprovider > "$runs/gpu_tests_full.log" 2>&1
echo "pytest exit $?" >> "$runs/gpu_tests_full.log"
tail -c 400000 "$runs/gpu_tests_full.log" > "$out/gpu_tests.log"
wait
python3 - "$runs" "$steps" <<'PY' | tee -a "$out/finetune.txt"
import csv, pathlib, sys
runs, steps = pathlib.Path(sys.argv[1]), sys.argv[2]
print(f"seg-tiny, synthetic-v1, {steps} steps, segm AP50 / bbox AP50 / segm AP at each validation")
for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
    f = folder / "results.csv"
    rows = list(csv.DictReader(open(f))) if f.exists() else []
    cells = [f"{r['step']}: {float(r['segm/AP50']):.3f} / {float(r['bbox/AP50']):.3f} / {float(r['segm/AP']):.3f}"
             for r in rows]
    print(f"{folder.name:10s}", "  ".join(cells) or "no validation")
PY
for f in "$runs"/*.log; do grep -q Traceback "$f" && { echo "== $f"; tail -20 "$f"; }; done | tee -a "$out/finetune.txt"
tar czf "$out/runs.tgz" -C "$runs" .
