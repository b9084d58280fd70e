#!/usr/bin/env bash
# A/B of older commits against the working tree on the GPU machine, one call, interleaved (issue 17/18 diagnosis).
#
#   bash benchmarks/device_ab.sh prepare COMMIT...        # here: each commit's packages/*/src into ab_src/COMMIT/
#   bash benchmarks/device_ab.sh run ROUNDS SCRIPT ARGS...  # there: SCRIPT ARGS with each tree's sources first on
#                                                           # PYTHONPATH (ab_src/* then the working tree), ROUNDS times
#
# The benchmark script itself comes from the working tree, so old and new code run under one harness; ab_src/ is
# untracked and travels with the tree (delete it afterwards). Needs the wheels of benchmarks/fetch_device_wheels.sh
# in .whl/ (WHL=path) and $OUT; writes $OUT/ab.log and, where the script takes --json, $OUT/ab_<tree>_<round>.json.
# Example (the CUDA-graph training step of 89a5169 against this code):
#   bash benchmarks/device_ab.sh prepare 89a5169
#   bash benchmarks/device_ab.sh run 2 benchmarks/train_step_profile.py --variant seg-medium --batch 8 \
#       --modes compile-graphs --steps 16 --repeats 2 --warmup-steps 4 --memory-budget 0.5 --phases --syncs
set -uo pipefail
mode=${1:?prepare or run}
shift
case "$mode" in
    prepare)
        for commit in "$@"; do
            rm -rf "ab_src/$commit" && mkdir -p "ab_src/$commit"
            git archive "$commit" packages/rfdetr-core/src packages/rfdetr-train/src packages/rfdetr-export/src \
                packages/rfdetr-serve/src | tar -x -C "ab_src/$commit" || exit 1
        done ;;
    run)
        rounds=${1:?rounds}
        script=${2:?benchmark script}
        shift 2
        out=${OUT:-out}
        mkdir -p "$out"
        whl=${WHL:-.whl}
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$whl"/*.whl > /dev/null || exit 1
        export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
        json=()
        grep -q -- "--json" "$script" && json=(--json)
        for round in $(seq 1 "$rounds"); do
            for tree in ab_src/* .; do
                name=$( [ "$tree" = . ] && echo tree || basename "$tree")
                src=$PWD/$tree/packages
                echo "== $name, round $round" | tee -a "$out/ab.log"
                PYTHONPATH=$src/rfdetr-core/src:$src/rfdetr-train/src:$src/rfdetr-export/src:$src/rfdetr-serve/src:/tmp/site \
                    python3 "$script" "$@" ${json:+"${json[@]}" "$out/ab_${name}_$round.json"} 2>&1 \
                    | grep -v WARNING | tee -a "$out/ab.log"
            done
        done ;;
    *) echo "unknown mode $mode (prepare or run)" >&2; exit 2 ;;
esac
