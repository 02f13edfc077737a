#!/usr/bin/env bash
# Create or update the project-local virtual environment (.venv by default).
#
# Idempotent: a stamp holding the hash of every requirements file makes a second
# run a no-op. The first run on a fresh machine compiles mmcv's C++ ops (about
# 25 minutes on 2 cores); pip's wheel cache makes later runs take seconds.
# CUDA users: run with FORCE_CUDA=1 (and a CUDA toolkit matching torch's) on a
# machine with a GPU so that mmcv compiles its CUDA ops; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.convneur-setup-stamp"
want=$(cat requirements/*.txt setup.py tools/setup_env.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

echo "[setup] preparing $VENV with $($PYTHON --version)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)

"${pip[@]}" -q --upgrade pip
"${pip[@]}" -r requirements/build.txt
"${pip[@]}" -r requirements/torch.txt -r requirements/build.txt
"${pip[@]}" -r requirements/openmmlab.txt -r requirements/torch.txt -r requirements/build.txt
echo "[setup] installing mmengine and compiling mmcv ops (first time: ~25 min on 2 cores)"
MMCV_WITH_OPS=1 "${pip[@]}" --no-deps --no-build-isolation -r requirements/mmcv.txt
"${pip[@]}" -r requirements/tests.txt
"${pip[@]}" --no-deps -r requirements/mim.txt  # its dependencies would downgrade the stack
"${pip[@]}" --no-deps --no-build-isolation -e .

# Fail here, not in the middle of a training run, if the stack is inconsistent.
"$VENV/bin/python" - <<'PY'
import torch, torchvision, cv2, mmengine, mmcv, mmdet, mmseg, mmpretrain
from mmcv.ops import nms  # noqa: F401  (needs the compiled mmcv._ext)
import convneur_mm
print(f'[setup] torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), '
      f'torchvision {torchvision.__version__}, mmengine {mmengine.__version__}, '
      f'mmcv {mmcv.__version__} with ops, mmdet {mmdet.__version__}, '
      f'mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}, '
      f'opencv {cv2.__version__}')
PY
echo "$want" > "$STAMP"
