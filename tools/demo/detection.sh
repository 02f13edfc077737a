#!/usr/bin/env bash
# The detection main job: Cascade Mask R-CNN with ConvNeur-M3 (the real config,
# inherited by configs/demo/cascade_rcnn_convneur_m3_coco_tiny.py) trained from
# scratch on the tiny synthetic COCO with 2 CPU processes, then its last
# checkpoint evaluated with 2 processes; prints the COCO bbox and segm tables
# (pycocotools) and the wall time.
#
#   tools/demo/detection.sh [WORK_DIR]     (default work_dirs/demo_detection)
#
# Variables: PYTHON (.venv/bin/python), GPUS (processes, 2), COCO_TINY_ROOT
# (data/coco_tiny/, generated if missing), PORT (torchrun's, a free one).
set -euo pipefail
source "$(dirname "$0")/../usage.sh"  # before the cd: it reads "$0"
usage_or_die 1 "$@"
cd "$(dirname "$0")/../.."
source tools/demo/common.sh
export COCO_TINY_ROOT=${COCO_TINY_ROOT:-data/coco_tiny/}  # read by the config
CONFIG=configs/demo/cascade_rcnn_convneur_m3_coco_tiny.py
WORK_DIR=${1:-work_dirs/demo_detection}
GPUS=${GPUS:-2}
start=$SECONDS

# the generator writes the val annotation file last, so its presence means complete
if [ ! -f "$COCO_TINY_ROOT/annotations/instances_val2017.json" ]; then
    echo "[detection demo] generating $COCO_TINY_ROOT"
    "$PYTHON" -m convneur_mm.demo_data.coco "$COCO_TINY_ROOT"
fi

echo "[detection demo] training on $GPUS processes (log: $WORK_DIR/train.log)"
# --auto-scale-lr: the config's lr is for 2 x 2 images; unscaled on one process
# it diverges (NaN losses on a GPU under fp16 and on the CPU)
run_logged detection "$WORK_DIR/train.log" 'Epoch\(train\) +\[[0-9]+\]\[([0-9]+)/\1\]' \
    tools/dist_train.sh "$CONFIG" "$GPUS" --work-dir "$WORK_DIR" --auto-scale-lr
CHECKPOINT=$(cat "$WORK_DIR/last_checkpoint")

echo "[detection demo] evaluating $CHECKPOINT (log: $WORK_DIR/test.log)"
run_logged detection "$WORK_DIR/test.log" '^(##|\|)' \
    tools/dist_test.sh "$CONFIG" "$CHECKPOINT" "$GPUS" --work-dir "$WORK_DIR/test"
echo "[detection demo] wall time: $((SECONDS - start)) s (data, training, evaluation)"
"$PYTHON" tools/demo/check_band.py detection "$WORK_DIR/test.log"
