#!/usr/bin/env bash
# Run here, on a machine with PyPI, for a GPU host that has its own Python,
# CUDA torch, torchvision, numpy and OpenCV but no package index: downloads the
# rest of the pinned stack as wheels for the host's Python, and mmcv's source
# distribution (its Python part, for MMCV_OPS=0), into the wheel folder that
# travels with the repository; install_stack.sh installs them on the host.
#
#   bash .dev_scripts/download_stack.sh [--python X.Y (default 3.12)] [DIR (default .dev_scripts/wheels)]
#
# mmcv's CUDA wheel comes from build_mmcv_cuda_wheel.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=3.12 DIR=.dev_scripts/wheels
while [ $# -gt 0 ]; do
    case $1 in
        --python) PY=${2:?--python needs X.Y}; shift 2 ;;
        -h|--help) sed -n 2,10p "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "download_stack.sh: unknown option '$1'" >&2; exit 2 ;;
        *) DIR=$1; shift ;;
    esac
done
[[ $PY =~ ^3\.[0-9]+$ ]] || { echo "download_stack.sh: --python takes X.Y, not '$PY'" >&2; exit 2; }
mkdir -p "$DIR"
pin() {  # the version requirements/*.txt pins NAME to
    grep -h -i -E "^$1==" requirements/*.txt | head -1
}
# the pinned toolboxes, and what a Python with torch, numpy and OpenCV lacks of
# their dependencies (importlib_metadata 10 needs a lazy_importer module: 8.5
# does not); pytest for the GPU tests
PACKAGES=("$(pin mmengine)" "$(pin mmdet)" "$(pin mmsegmentation)" "$(pin mmpretrain)"
          "$(pin model-index)" "$(pin tabulate)" addict yapf termcolor pycocotools ftfy wcwidth
          terminaltables prettytable mat4py platformdirs shapely ordered-set
          importlib_metadata==8.5.0 pytest pluggy iniconfig pygments)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$DIR" "${PACKAGES[@]}"
# pip cannot download mmcv's sdist without building its metadata (which needs
# torch): fetch it from PyPI's simple index and check its sha256
MMCV=$(pin mmcv | cut -d= -f3)
URL=$(curl -fsS "https://pypi.org/simple/mmcv/" \
      | grep -o "href=\"[^\"]*mmcv-$MMCV.tar.gz#sha256=[0-9a-f]*\"" | head -1 | cut -d'"' -f2)
[ -n "$URL" ] || { echo "mmcv-$MMCV.tar.gz not found on PyPI" >&2; exit 1; }
curl -fsSL -o "$DIR/mmcv-$MMCV.tar.gz" "${URL%%#*}"
echo "${URL##*sha256=}  $DIR/mmcv-$MMCV.tar.gz" | sha256sum -c --quiet
du -sh "$DIR"
