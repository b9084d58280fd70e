#!/usr/bin/env bash
# Issue 15's load test (benchmarks/serve_load.py) on the lent GPU machine's CPU cores (the model runs on CPU;
# CUDA is hidden), from a copy of this tree. That machine has no network and no web stack, so everything the
# servers and the client import comes as wheels in $WHL (default .whl_serve, git-ignored), made here first:
#
#   for p in core export serve; do uv build --package rfdetr-$p --wheel -o .whl_serve; done
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl_serve \
#       fastapi starlette uvicorn h11 anyio sniffio python-multipart prometheus-client httpx httpcore certifi \
#       idna onnx onnxscript onnx-ir ml-dtypes protobuf typing-extensions pydantic pydantic-core \
#       annotated-types typing-inspection annotated-doc opentelemetry-api click safetensors tqdm litserve==0.2.19 pyzmq
#       # (the versions of uv.lock; litserve and pyzmq are the benchmark's own, outside the lock)
#
#   bash benchmarks/device_serve_load.sh --onnx --clients 32 --seconds 20 --warmup 15 --rounds 2
#
# Our packages are installed as wheels (not put on PYTHONPATH as sources) because RFDETR.from_file finds the
# ONNX runner through the rfdetr_core.runners entry point, which needs their metadata.
set -uo pipefail
whl=${WHL:-.whl_serve}
out=${OUT:-out}
tag=${TAG:-serve_load}
mkdir -p "$out"
rm -rf /tmp/serve-site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/serve-site "$whl"/*.whl || exit 1
export PYTHONPATH=/tmp/serve-site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=
{
    echo "logical cpus: $(nproc)"
    lscpu | grep -E "Model name|Socket|Core|Thread"
    python3 -c "import torch, onnxruntime, fastapi, uvicorn, litserve; print('torch', torch.__version__, 'onnxruntime', onnxruntime.__version__, 'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'litserve', litserve.__version__)"
} 2>&1 | tee "$out/$tag-machine.txt"
python3 benchmarks/serve_load.py "$@" --json "$out/$tag.json" 2>&1 | tee "$out/$tag.log"
