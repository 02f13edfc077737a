#!/usr/bin/env bash
# Builds, on a machine with PyPI and no GPU, mmcv's wheel with its CUDA ops for
# a GPU host's Python and torch, into the wheel folder that travels with the
# repository; the host's install_stack.sh installs it in seconds:
#
#   bash .dev_scripts/build_mmcv_cuda_wheel.sh --python 3.12 --torch 2.11.0+cu130 [--arch "9.0"]
#       [--torch-index URL] [--out DIR] [--build-dir DIR] [--jobs N] [--dry-run]
#
#   --python       the host's Python, X.Y (found here as pythonX.Y, in pyenv or
#                  uv) or the path of an interpreter of that version
#   --torch        the host's torch.__version__ exactly, e.g. 2.11.0+cu130: the
#                  host refuses the wheel for any other torch
#   --arch         TORCH_CUDA_ARCH_LIST (default: $TORCH_CUDA_ARCH_LIST, else
#                  "9.0": H100 and H200); each arch adds to the time and size
#   --torch-index  where to get torch VERSION+cuXYZ (default: PyPI's VERSION,
#                  accepted when it is that build)
#   --out          the wheel folder (default .dev_scripts/wheels, git-ignored)
#   --build-dir    the build's virtual environment and work files (default
#                  ~/.cache/convneur-mm/mmcv-cuda/<python>-<torch>-<arch>; about
#                  6 GB, reused by a later run)
#   --jobs         parallel compile jobs (MAX_JOBS; default: cores, bounded by memory)
#   --dry-run      resolve the interpreter, print the plan, build nothing
#
# The CUDA compiler comes from PyPI, pinned to that torch's CUDA version, and
# mmcv is compiled as tools/setup/setup_env.sh compiles it (the same
# tools/setup/cuda_setup.py steps). The shared library is stripped of its
# symbol table, checked to load against that torch, and its wheel is written
# with DIR/<wheel name>.flavor.json, what the host's check compares.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n 2,29p "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "build_mmcv_cuda_wheel.sh: $*" >&2; exit 2; }

PY_WANT='' TORCH='' ARCH=${TORCH_CUDA_ARCH_LIST:-9.0} INDEX='' WHEEL_DIR=.dev_scripts/wheels
BUILD='' DRY=0
while [ $# -gt 0 ]; do
    case $1 in
        --python) PY_WANT=${2:?}; shift 2 ;;
        --torch) TORCH=${2:?}; shift 2 ;;
        --arch) ARCH=${2:?}; shift 2 ;;
        --torch-index) INDEX=${2:?}; shift 2 ;;
        --out) WHEEL_DIR=${2:?}; shift 2 ;;
        --build-dir) BUILD=${2:?}; shift 2 ;;
        --jobs) export MAX_JOBS=${2:?}; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done
[ -n "$PY_WANT" ] || die "--python X.Y is required (the GPU host's Python)"
[[ $TORCH =~ ^([0-9]+\.[0-9]+\.[0-9]+)(\+cu[0-9]+)?$ ]] || \
    die "--torch takes the host's torch.__version__, e.g. 2.11.0+cu130 or 2.11.0, not '$TORCH'"
TORCH_BASE=${BASH_REMATCH[1]}
[[ $ARCH =~ ^[0-9]+\.[0-9]+a?(\+PTX)?([\;\ ][0-9]+\.[0-9]+a?(\+PTX)?)*$ ]] || \
    die "--arch takes a TORCH_CUDA_ARCH_LIST such as \"9.0\" or \"8.0;9.0+PTX\", not '$ARCH'"
[[ $PY_WANT == */* || $PY_WANT =~ ^3\.[0-9]+$ ]] || \
    die "--python takes X.Y (e.g. 3.12) or an interpreter's path, not '$PY_WANT'"
[ -z "$INDEX" ] || [[ $TORCH == *+* ]] || die "--torch-index needs a local build in --torch (e.g. 2.11.0+cu130)"

find_python() {  # X.Y or a path -> an interpreter of that version, on stdout
    local want=$1 candidate
    if [[ $want == */* ]]; then
        [ -x "$want" ] && "$want" -c 'import sys' 2> /dev/null && echo "$want"
        return
    fi
    for candidate in "python$want" \
        "$(pyenv root 2> /dev/null || echo /nonexistent)"/versions/"$want"*/bin/"python$want" \
        "$(uv python find "$want" 2> /dev/null || true)"; do
        [ -n "$candidate" ] || continue
        if [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2> /dev/null)" \
             = "$want" ]; then
            echo "$candidate"
            return
        fi
    done
}
PY=$(find_python "$PY_WANT") || true
[ -n "$PY" ] || die "no Python $PY_WANT here: install it (pyenv install $PY_WANT, uv python install \
$PY_WANT, or apt's python$PY_WANT-venv) or pass its path; the wheel needs the host's X.Y"
PY_VERSION=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
TAG=cp${PY_VERSION/./}
KEY="$TAG-torch$TORCH-sm${ARCH//[^0-9a-zA-Z.+]/_}"
BUILD=${BUILD:-${XDG_CACHE_HOME:-$HOME/.cache}/convneur-mm/mmcv-cuda/$KEY}
VENV=$BUILD/venv
VPY=$VENV/bin/python
SETUP=tools/setup/cuda_setup.py
MMCV=$(grep -E '^mmcv==' requirements/mmcv.txt)
if [ -n "$INDEX" ]; then TORCH_PIN=torch==$TORCH TORCH_REQ=("$TORCH_PIN" --index-url "$INDEX")
else TORCH_PIN=torch==$TORCH_BASE TORCH_REQ=("$TORCH_PIN"); fi
PIP=("$VPY" -m pip install --disable-pip-version-check --progress-bar off)

run() {  # COMMAND...: run it, or print it in a dry run
    if [ "$DRY" = 1 ]; then echo "[plan] $(printf '%q ' "$@")"; else "$@"; fi
}

echo "[mmcv-cuda] $MMCV for Python $PY_VERSION ($PY), torch $TORCH, TORCH_CUDA_ARCH_LIST=$ARCH"
echo "[mmcv-cuda] build folder $BUILD; wheel into $WHEEL_DIR"
started=$(date +%s)

# 1. a virtual environment of the host's Python with that torch
run "$PY" -m venv "$VENV"
run "${PIP[@]}" -q --upgrade pip
run "${PIP[@]}" -q -r requirements/build.txt
run "${PIP[@]}" "${TORCH_REQ[@]}"
if [ "$DRY" = 0 ]; then
    # PyPI's torch X is PyTorch's X+cuXYZ of its default CUDA, and says so
    built=$("$VPY" -c 'import torch; print(torch.__version__)' 2> /dev/null)
    if [ "$built" != "$TORCH" ] && { [[ $TORCH == *+* ]] || [ "${built%%+*}" != "$TORCH" ]; }; then
        echo "build_mmcv_cuda_wheel.sh: this torch is $built, the host's $TORCH: pass" \
             "--torch-index, an index that has it (PyTorch's: https://download.pytorch.org/whl/cuXYZ)" >&2
        exit 1
    fi
fi

# 2. the CUDA compiler of that torch's CUDA version, and mmcv's build variables
if [ "$DRY" = 1 ]; then
    echo "[plan] ${PIP[*]} \$($VPY $SETUP compiler-requirements) $TORCH_PIN"
    echo "[plan] FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST='$ARCH' $VPY $SETUP flavor  -> FLAVOR"
    echo "[plan] $VPY $SETUP build-env FLAVOR $VENV  -> the build's variables"
    flavor='FLAVOR' build_vars=''
else
    mapfile -t compiler < <("$VPY" "$SETUP" compiler-requirements)
    echo "[mmcv-cuda] CUDA compiler from PyPI: ${compiler[*]}"
    "${PIP[@]}" -q "${compiler[@]}" "$TORCH_PIN"  # the pin keeps pip from moving torch
    flavor=$(FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH "$VPY" "$SETUP" flavor)
    build_vars=$("$VPY" "$SETUP" build-env "$flavor" "$VENV")
    echo "[mmcv-cuda] $flavor"
fi

# 3. mmcv, compiled in BUILD/src, where an interrupted build resumes (ninja
#    skips the objects it has); the wheel is kept in BUILD/raw for later runs
if [ "$DRY" = 1 ] || ! ls "$BUILD"/raw/mmcv-*.whl > /dev/null 2>&1; then
    run rm -rf "$BUILD/raw"
    if [ "$DRY" = 1 ] || ! ls "$BUILD"/src/mmcv-*/setup.py > /dev/null 2>&1; then
        run "$VPY" -m pip download --disable-pip-version-check --progress-bar off --no-deps \
            --no-binary :all: --no-build-isolation -d "$BUILD/sdist" "$MMCV"
        run mkdir -p "$BUILD/src"
        run tar -xzf "$(ls "$BUILD"/sdist/mmcv-*.tar.gz 2> /dev/null || echo SDIST)" -C "$BUILD/src"
    fi
    echo "[mmcv-cuda] compiling mmcv's ops (about two hours per arch on 2 cores, 5 minutes on 16)"
    (eval "$build_vars"
     run "$VPY" -m pip wheel --disable-pip-version-check --progress-bar off --no-deps \
         --no-build-isolation --no-cache-dir -w "$BUILD/raw" \
         "$(ls -d "$BUILD"/src/mmcv-*/ 2> /dev/null || echo "$BUILD/src/MMCV")")
fi

# 4. stripped, checked to load against that torch, written with its flavor
run rm -rf "$BUILD/unpacked"
if [ "$DRY" = 1 ]; then
    echo "[plan] $VPY -m wheel unpack BUILD/raw/mmcv-*.whl; strip --strip-unneeded mmcv/_ext*.so;" \
         "load it beside torch; $VPY -m wheel pack -d $WHEEL_DIR; $VPY $SETUP record FLAVOR" \
         "$WHEEL_DIR/<wheel>.flavor.json"
    echo "[mmcv-cuda] dry run: nothing built"
    exit 0
fi
raw=$(ls "$BUILD"/raw/mmcv-*.whl)
"$VPY" -m wheel unpack -d "$BUILD/unpacked" "$raw" > /dev/null
so=$(ls "$BUILD"/unpacked/mmcv-*/mmcv/_ext*.so)
before=$(du -m "$so" | cut -f1)
# the symbol table serves no one at run time; the kernels and dynamic symbols stay
command -v strip > /dev/null && strip --strip-unneeded "$so"
"$VPY" - "$so" <<'PY'
import importlib.util
import sys

import torch  # noqa: F401  (loads the libraries _ext links against)

spec = importlib.util.spec_from_file_location('mmcv._ext', sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
missing = [name for name in ('nms', 'roi_align_forward') if not hasattr(ext, name)]
if missing:
    sys.exit(f'mmcv._ext has no {missing}')
print(f'[mmcv-cuda] mmcv._ext loads beside torch {torch.__version__}')
PY
glibc=$(objdump -T "$so" 2> /dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)
mkdir -p "$WHEEL_DIR"
rm -f "$WHEEL_DIR"/mmcv-*-"$TAG"-"$TAG"-*.whl "$WHEEL_DIR"/mmcv-*-"$TAG"-"$TAG"-*.flavor.json
"$VPY" -m wheel pack -d "$WHEEL_DIR" "$BUILD"/unpacked/mmcv-*/ > /dev/null
wheel=$(ls "$WHEEL_DIR"/mmcv-*-"$TAG"-"$TAG"-*.whl)
record=$("$VPY" -c 'import json, sys
print(json.dumps(dict(json.loads(sys.argv[1]), glibc=sys.argv[2] or None)))' "$flavor" "$glibc")
"$VPY" "$SETUP" record "$record" "${wheel%.whl}.flavor.json"
echo "[mmcv-cuda] $(basename "$wheel"): $(du -m "$wheel" | cut -f1) MB (_ext: $before MB," \
     "$(du -m "$so" | cut -f1) MB stripped; needs ${glibc:-no versioned glibc}) in" \
     "$(( $(date +%s) - started )) s"
echo "[mmcv-cuda] $record"
