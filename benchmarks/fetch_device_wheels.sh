#!/usr/bin/env bash
# Downloads, here, the wheels the GPU machine lacks for the device calls of benchmarks/device_*.sh (that machine has
# no network; the calls carry .whl/). Versions as in uv.lock; upstream rfdetr for the side-by-side runs.
#
#   bash benchmarks/fetch_device_wheels.sh        # -> .whl/ (git-ignored through .git/info/exclude)
#
# The step mode of device_train_speed.sh needs torch-hungarian (upstream 1.11.2's matcher); the loop mode also needs
# the rest of upstream's `train` extra (faster-coco-eval, hotcoco, ...), not fetched here.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
wheels=(
    rfdetr==1.11.2 supervision==0.31.2 pydeprecate==0.9.0 defusedxml==0.7.1
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    pycocotools==2.0.11 albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34
    torch-hungarian==0.1.0rc0  # torch_linear_assignment: upstream's matcher imports it on its training path
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
ls .whl
