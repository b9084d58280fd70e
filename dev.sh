#!/usr/bin/env bash
# Set-up-and-run entry point for newcomers and CI. Needs only Python >= 3.11 on the PATH:
# installs uv when missing, then lets uv create .venv from uv.lock and run the command.
#
#   ./dev.sh demo    train the small model on the built-in synthetic dataset, print per-class metrics
#   ./dev.sh test    run the test suite (what CI runs)
#   ./dev.sh lint    ruff
set -euo pipefail
cd "$(dirname "$0")"

# uv must use the Python found here rather than download its own.
export UV_PYTHON_DOWNLOADS=never
# Tests and the demo never download anything from a model hub.
export HF_HUB_OFFLINE=1

if ! command -v uv >/dev/null 2>&1; then
    if [ -x "$HOME/.local/bin/uv" ]; then
        export PATH="$HOME/.local/bin:$PATH"
    else
        echo "dev.sh: installing uv (python3 -m pip install --user uv)" >&2
        python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
        export PATH="$HOME/.local/bin:$PATH"
    fi
fi
PY="$(command -v python3)"

sync() { uv sync --frozen --all-packages --python "$PY" --quiet; }

case "${1:-}" in
    demo)
        shift; sync
        uv run --frozen --no-sync python -m rfdetr_train "$@"
        ;;
    test)
        shift; sync
        uv run --frozen --no-sync pytest "$@"
        ;;
    lint)
        shift; sync
        uv run --frozen --no-sync ruff check . "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo|test|lint [args...]" >&2
        exit 2
        ;;
esac
