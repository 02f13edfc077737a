#!/usr/bin/env bash
# The segmentation main job: Semantic FPN with ConvNeur-M2 (the real config,
# inherited by configs/demo/fpn_convneur_m2_ade20k_tiny.py) trained from scratch
# on the tiny synthetic ADE20K with 2 CPU processes, then its last checkpoint
# evaluated with 2 processes; prints mIoU / mAcc / aAcc and the wall time.
#
#   tools/demo/segmentation.sh [WORK_DIR]      (default work_dirs/demo_segmentation)
#
# Variables: PYTHON (.venv/bin/python), GPUS (processes, 2), ADE20K_TINY_ROOT
# (data/ade20k_tiny/, generated if missing), PORT (torchrun's, a free one).
set -euo pipefail
source "$(dirname "$0")/../usage.sh"  # before the cd: it reads "$0"
usage_or_die 1 "$@"
cd "$(dirname "$0")/../.."
source tools/demo/common.sh
export ADE20K_TINY_ROOT=${ADE20K_TINY_ROOT:-data/ade20k_tiny/}  # read by the config
CONFIG=configs/demo/fpn_convneur_m2_ade20k_tiny.py
WORK_DIR=${1:-work_dirs/demo_segmentation}
GPUS=${GPUS:-2}
start=$SECONDS

# the generator writes sceneCategories.txt last, so its presence means complete
if [ ! -f "$ADE20K_TINY_ROOT/sceneCategories.txt" ]; then
    echo "[segmentation demo] generating $ADE20K_TINY_ROOT"
    "$PYTHON" -m convneur_mm.demo_data.ade20k "$ADE20K_TINY_ROOT"
fi

echo "[segmentation demo] training on $GPUS processes (log: $WORK_DIR/train.log)"
run_logged segmentation "$WORK_DIR/train.log" 'Iter\(train\)' \
    tools/dist_train.sh "$CONFIG" "$GPUS" --work-dir "$WORK_DIR"
CHECKPOINT=$(cat "$WORK_DIR/last_checkpoint")

echo "[segmentation demo] evaluating $CHECKPOINT (log: $WORK_DIR/test.log)"
run_logged segmentation "$WORK_DIR/test.log" '^(##|\| (metric|aAcc|mIoU|mAcc) |\|---)' \
    tools/dist_test.sh "$CONFIG" "$CHECKPOINT" "$GPUS" --work-dir "$WORK_DIR/test"
echo "[segmentation demo] wall time: $((SECONDS - start)) s (data, training, evaluation)"
"$PYTHON" tools/demo/check_band.py segmentation "$WORK_DIR/test.log"
