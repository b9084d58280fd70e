#!/usr/bin/env bash
# Training-speed calls of issue 18 on the lent GPU machine (no network there), run from a copy of this tree:
#
#   bash benchmarks/device_train_speed.sh step  [ARGS...]  # benchmarks/train_step_profile.py --upstream ARGS
#   bash benchmarks/device_train_speed.sh loop  [ARGS...]  # the whole-loop mode on .data/coco128_seg
#
# Needs the wheels of benchmarks/fetch_device_wheels.sh in .whl/ (WHL=path), the dataset copy (DATA=path), $OUT for logs and JSON.
set -uo pipefail
mode=${1:?step or loop}
shift
whl=${WHL:-.whl}
out=${OUT:-out}
mkdir -p "$out"
# Installed once per machine, again whenever the set of wheels changed (a warm machine kept the old set).
stamp=$(ls "$whl" | sha1sum | cut -c1-12)
if [ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$stamp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$whl"/*.whl || exit 1
    echo "$stamp" > /tmp/site/.wheels
fi
export PYTHONPATH=$PWD/packages/rfdetr-core/src:$PWD/packages/rfdetr-train/src:/tmp/site
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
tag=${TAG:-$mode}
case "$mode" in
    step) python3 benchmarks/train_step_profile.py --upstream --json "$out/$tag.json" "$@" 2>&1 | tee "$out/$tag.log" ;;
    loop) python3 benchmarks/train_step_profile.py --loop --upstream --data "${DATA:-.data/coco128_seg}" \
              --loop-out /tmp/train_loop --json "$out/$tag.json" "$@" 2>&1 | tee "$out/$tag.log"
          for f in /tmp/train_loop/loop_*.log; do [ -f "$f" ] && tail -c 200000 "$f" > "$out/$tag-$(basename "$f")"; done ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
