#!/usr/bin/env bash
# Run here, before borrowing a GPU machine that has its own Python and torch
# but no package index (the lent H100 / H200: Python 3.12, torch 2.11+cu130):
# downloads the rest of the pinned stack as wheels, and mmcv's source
# distribution, into DIR (default .whl, which .git/info/exclude should name).
# .dev_scripts/device_env.sh installs them there. docs/notes/gpu_runs.md tells the story.
set -euo pipefail
DIR=${1:-.whl}
PY=${DEVICE_PYTHON:-3.12}
cd "$(dirname "$0")/.."
mkdir -p "$DIR"
pin() {  # the version requirements/*.txt pins NAME to
    grep -h -i -E "^$1==" requirements/*.txt | head -1
}
# the pinned toolboxes, and what the image lacks of their dependencies
# (importlib_metadata 10 needs a lazy_importer module: 8.5 does not)
PACKAGES=("$(pin mmengine)" "$(pin mmdet)" "$(pin mmsegmentation)" "$(pin mmpretrain)"
          "$(pin model-index)" addict yapf termcolor pycocotools ftfy wcwidth terminaltables
          prettytable mat4py platformdirs shapely ordered-set importlib_metadata==8.5.0)
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
