#!/usr/bin/env bash
# The test suite on another torch than our pin, without touching .venv: the
# torch a GPU host brings, tried here first on the CPU. Its wheels go into
# DIR/site (pip --target, no deps: the CUDA libraries of .venv serve any torch
# built for the same CUDA major), mmcv is compiled against it into DIR/mmcv
# (about 25 minutes on 2 cores, once), and pytest runs with both first on
# PYTHONPATH:
#
#   .dev_scripts/test_other_torch.sh TORCH TORCHVISION TRITON [PYTEST_ARGS (default: tests)]
#       e.g. 2.11.0 0.26.0 3.6.0 (DIR: $OTHER_TORCH_DIR or /tmp/torch-TORCH)
#
# Expect test_requirements.py to fail: it checks the pin.
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,12p "$0"; exit 2; }
TORCH=$1 VISION=$2 TRITON=$3
shift 3
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DIR=${OTHER_TORCH_DIR:-/tmp/torch-$TORCH}
mkdir -p "$DIR/wheels"
if [ ! -d "$DIR/site/torch" ]; then
    "$PY" -m pip download -q --no-deps -d "$DIR/wheels" "torch==$TORCH" \
        "torchvision==$VISION" "triton==$TRITON"
    "$PY" -m pip install -q --no-deps --target "$DIR/site" "$DIR"/wheels/*.whl
fi
if [ ! -d "$DIR/mmcv/mmcv" ]; then
    MMCV=$(grep -E '^mmcv==' requirements/mmcv.txt)
    echo "[other torch] compiling $MMCV against torch $TORCH (about 25 minutes on 2 cores)"
    PYTHONPATH=$DIR/site MMCV_WITH_OPS=1 "$PY" -m pip wheel -q --no-cache-dir --no-deps \
        --no-build-isolation -w "$DIR/mmcv-wheel" "$MMCV"
    "$PY" -m pip install -q --no-deps --target "$DIR/mmcv" "$DIR"/mmcv-wheel/mmcv-*.whl
fi
export PYTHONPATH=$DIR/mmcv:$DIR/site${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch, mmcv.ops; print('[other torch] torch', torch.__version__, 'mmcv ops ok')"
exec "$PY" -m pytest -p no:cacheprovider "${@:-tests}"
