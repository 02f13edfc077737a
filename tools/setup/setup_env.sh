#!/usr/bin/env bash
# Create or update the project-local virtual environment (.venv by default).
#
# Idempotent: a stamp holding the hash of every requirements file and the
# flavor mmcv was built as makes a second run a no-op. mmcv's ops are compiled
# from source: for the CPU (about 25 minutes on 2 cores the first time; pip's
# wheel cache makes later runs take seconds), or with its CUDA ops when torch
# sees a GPU or FORCE_CUDA=1 (a build host without one): then the CUDA
# compiler comes from PyPI, pinned to torch's CUDA version, and nothing needs
# to be installed by hand. docs/user_guides/cuda.md explains every variable:
#   VENV, PYTHON                 where and with which interpreter
#   FORCE_CUDA=1                 build the CUDA ops without a GPU
#   TORCH_CUDA_ARCH_LIST         archs to compile (default: the visible GPUs', or torch's + PTX)
#   MAX_JOBS                     parallel compile jobs (default: cores, bounded by memory)
#   CUDA_HOME                    your own CUDA toolkit instead of the venv's (checked)
#   CONVNEUR_TORCH_BUILD=cu126   torch 2.13.0 built for CUDA 12.6 (older GPUs or drivers)
#   CONVNEUR_TORCH_INDEX         where to get that build (default: PyTorch's index)
#   CONVNEUR_ALLOW_CPU=1         set up for the CPU on a machine whose GPUs torch cannot use
set -euo pipefail
source "$(dirname "$0")/../usage.sh"  # before the cd: it reads "$0"
usage_or_die 0 "$@"
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.convneur-setup-stamp"
FLAVOR_FILE="$VENV/.convneur-mmcv-flavor"
HELPER=tools/setup/cuda_setup.py  # with the standard-library modules beside it
want=$(cat requirements/*.txt setup.py tools/setup/setup_env.sh tools/setup/*.py \
       | sha256sum | cut -d' ' -f1)

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ]; then
    rc=0
    "$VENV/bin/python" "$HELPER" stamp-ok "$STAMP" "$want" 2>/dev/null || rc=$?
    [ "$rc" = 0 ] && exit 0
fi

started=$(date +%s)
# The pins have wheels for CPython 3.10-3.12 only (torch 2.13: 3.10+; numpy < 2:
# up to 3.12); elsewhere pip would stop deep in the install or build numpy.
interpreter=$PYTHON
[ -x "$VENV/bin/python" ] && interpreter="$VENV/bin/python"
if ! "$interpreter" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
    hint="run again with PYTHON=python3.12 (or python3.10, python3.11)"
    [ "$interpreter" = "$PYTHON" ] || hint="remove $VENV (made with it) and $hint"
    echo "[setup] error: the pinned stack needs Python 3.10 to 3.12;" \
         "$interpreter is $("$interpreter" --version 2>&1): $hint." >&2
    exit 2
fi
echo "[setup] preparing $VENV with $($PYTHON --version)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off)

"${pip[@]}" -q --upgrade pip
"${pip[@]}" -r requirements/build.txt
# torch: PyPI's build, or the one CONVNEUR_TORCH_BUILD names (or already installed)
TORCH_REQ="$VENV/.convneur-torch-requirements.txt"
torch_index=$("$py" "$HELPER" torch-requirements "$TORCH_REQ" requirements/torch.txt)
"${pip[@]}" -r "$TORCH_REQ" -c requirements/build.txt ${torch_index:+--index-url "$torch_index"}
"${pip[@]}" -r requirements/openmmlab.txt -r "$TORCH_REQ" -r requirements/build.txt

# mmcv: CPU or CUDA flavor; rebuilt whenever the installed one does not serve it
flavor=$("$py" "$HELPER" flavor)
echo "[setup] mmcv flavor: $flavor"
if ! "$py" "$HELPER" mmcv-covers "$flavor" "$FLAVOR_FILE" 2>/dev/null; then
    "$py" -m pip uninstall -y -q mmcv 2>/dev/null || true
    if [[ $flavor == *'"kind": "cuda"'* ]]; then
        if [ -z "${CUDA_HOME:-}" ]; then
            mapfile -t compiler < <("$py" "$HELPER" compiler-requirements)
            echo "[setup] CUDA compiler from PyPI: ${compiler[*]}"
            "${pip[@]}" "${compiler[@]}" -r "$TORCH_REQ"
        fi
        build_vars=$("$py" "$HELPER" build-env "$flavor" "$VENV")
        # a wheel folder per flavor: pip's wheel cache may hold a CPU-only mmcv
        wheels="$VENV/.mmcv-wheels/$("$py" "$HELPER" wheel-key "$flavor")"
        if ! ls "$wheels"/mmcv-*.whl >/dev/null 2>&1; then
            echo "[setup] compiling mmcv with CUDA ops: $build_vars" | tr '\n' ' '; echo
            (eval "$build_vars"
             "$py" -m pip wheel --disable-pip-version-check --progress-bar off --no-deps \
                 --no-build-isolation --no-cache-dir -w "$wheels" \
                 "$(grep -E '^mmcv==' requirements/mmcv.txt)")
        fi
        "${pip[@]}" --no-deps --force-reinstall "$wheels"/mmcv-*.whl
    else
        echo "[setup] compiling mmcv ops for the CPU (first time: ~25 min on 2 cores)"
        MMCV_WITH_OPS=1 "${pip[@]}" --no-deps --no-build-isolation -r requirements/mmcv.txt
    fi
    "$py" "$HELPER" record "$flavor" "$FLAVOR_FILE"
elif [ ! -f "$FLAVOR_FILE" ]; then
    # a venv from before the flavor record whose probed mmcv serves this flavor
    "$py" "$HELPER" record "$flavor" "$FLAVOR_FILE"
fi
"${pip[@]}" --no-deps --no-build-isolation -r requirements/mmcv.txt  # mmengine
"${pip[@]}" -r requirements/tests.txt
"${pip[@]}" -r requirements/deploy.txt  # ONNX export and its ONNX Runtime check
"${pip[@]}" --no-deps -r requirements/mim.txt  # its dependencies would downgrade the stack
"${pip[@]}" --no-deps --no-build-isolation -e .

# Fail here, not in the middle of a training run, if the stack is inconsistent.
"$py" - <<'PY'
import torch, torchvision, cv2, mmengine, mmcv, mmdet, mmseg, mmpretrain
from mmcv.ops import nms  # noqa: F401  (needs the compiled mmcv._ext)
import convneur_mm
print(f'[setup] torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), '
      f'torchvision {torchvision.__version__}, mmengine {mmengine.__version__}, '
      f'mmcv {mmcv.__version__} with ops, mmdet {mmdet.__version__}, '
      f'mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}, '
      f'opencv {cv2.__version__}')
PY
"$py" "$HELPER" check "$flavor"
{ echo "$want"; cat "$FLAVOR_FILE"; } > "$STAMP"
echo "[setup] done in $(( $(date +%s) - started )) s"
