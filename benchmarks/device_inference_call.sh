#!/usr/bin/env bash
# Issue 17's GPU call on the lent GPU machine (no network there), run from a copy of this tree:
#
#   bash benchmarks/device_inference_call.sh [BENCH ARGS...]
#
# 1. builds the CUDA deformable-attention kernel once (the processes below would wait on its build lock);
# 2. starts benchmarks/gpu_inference_vs_upstream.py --parallel (one process per variant) in the background:
#    its compile phases overlap the GPU test suite, and its timed part waits until the tests are done
#    (--wait-for), so no timing runs beside the tests;
# 3. runs the GPU test suite (pytest -m gpu; TESTS=paths for a part of it, MARKS="gpu and not slow" to leave out
#    the slow ones) and writes the done marker.
#
# Needs the wheels of benchmarks/fetch_device_wheels.sh in .whl/ (WHL=path) and $OUT. Writes under $OUT: gpu.txt (card, driver, clocks),
# gpu_tests.log, bench.log (the parent's merged table), gpu_inference.json, and results.tgz with the children's
# logs, JSON and profiler tables (the device returns at most 8 files).
set -uo pipefail
out=${OUT:-out}
whl=${WHL:-.whl}
mkdir -p "$out"
res=/tmp/gpu_inference_results
mkdir -p "$res"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$whl"/*.whl || exit 1
src=$PWD/packages
export PYTHONPATH=$src/rfdetr-core/src:$src/rfdetr-train/src:$src/rfdetr-export/src:$src/rfdetr-serve/src:/tmp/site
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore RFDETR_DEFORM_ATTN=cuda \
    TORCH_CUDA_ARCH_LIST=9.0 CC=gcc CXX=g++
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,memory.total --format=csv \
    | tee "$out/gpu.txt"
python3 -c "import torch, rfdetr, rfdetr_core.ops as o; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'upstream rfdetr', rfdetr.__version__ if hasattr(rfdetr, '__version__') else '?', 'kernel', o.use_cuda_kernel())" \
    2>&1 | grep -v WARNING | tee -a "$out/gpu.txt"
done_marker=$res/tests-done
python3 benchmarks/gpu_inference_vs_upstream.py --parallel --wait-for "$done_marker" --json "$res/gpu_inference.json" \
    "$@" > "$out/bench.log" 2>&1 &
bench=$!
# written straight under $OUT, so a call cut at its time limit still brings the log back
python3 -m pytest -m "${MARKS:-gpu}" ${TESTS:-tests/} -q -rfEP -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
echo "pytest exit $?" >> "$out/gpu_tests.log"
touch "$done_marker"
wait "$bench"
echo "benchmark exit $?" >> "$out/bench.log"
cp "$res/gpu_inference.json" "$out/" 2>/dev/null
tar czf "$out/results.tgz" -C "$res" .
