#!/usr/bin/env bash
# Classification demo: ConvNeur-M1 with the paper's ImageNet recipe (AdamW,
# warm-up + cosine, RandAugment, Mixup, CutMix, Random Erasing, label smoothing)
# on the embedded tiny ImageNet (generated on first use), trained by 2 CPU
# processes with tools/dist_train.sh and evaluated (top-1/top-5) with
# tools/dist_test.sh. About 3 minutes on 2 idle cores.
#
#   tools/demo/classification.sh [WORK_DIR]    (default work_dirs/demo_classification)
#
# Variables: PYTHON (.venv/bin/python), GPUS (processes, 2), IMAGENET_TINY_ROOT
# (data/imagenet_tiny, generated if missing), PORT (torchrun's, a free one).
set -euo pipefail
source "$(dirname "$0")/../usage.sh"  # before the cd: it reads "$0"
usage_or_die 1 "$@"
cd "$(dirname "$0")/../.."
source tools/demo/common.sh
export IMAGENET_TINY_ROOT=${IMAGENET_TINY_ROOT:-data/imagenet_tiny}  # read by the config
WORK_DIR=${1:-work_dirs/demo_classification}
GPUS=${GPUS:-2}
CONFIG=configs/demo/cls_convneur_m1_imagenet_tiny.py
start=$SECONDS

if [ ! -f "$IMAGENET_TINY_ROOT/meta/val.txt" ]; then  # written last by the generator
    echo "[classification demo] generating $IMAGENET_TINY_ROOT"
    "$PYTHON" -m convneur_mm.demo_data.imagenet "$IMAGENET_TINY_ROOT"
fi

# --auto-scale-lr: the config's lr is for 2 x 32 images; other GPUS rescale it
echo "[classification demo] training on $GPUS processes (log: $WORK_DIR/train.log)"
run_logged classification "$WORK_DIR/train.log" 'Epoch\((train|val)\)' \
    tools/dist_train.sh "$CONFIG" "$GPUS" --work-dir "$WORK_DIR" --auto-scale-lr
CHECKPOINT=$(cat "$WORK_DIR/last_checkpoint")

echo "[classification demo] evaluating $CHECKPOINT (log: $WORK_DIR/test.log)"
run_logged classification "$WORK_DIR/test.log" '^(##|\|)' \
    tools/dist_test.sh "$CONFIG" "$CHECKPOINT" "$GPUS" --work-dir "$WORK_DIR/test"
echo "[classification demo] wall time: $((SECONDS - start)) s (data, training, evaluation;" \
     "10 classes: chance is 10% top-1, 50% top-5)"
"$PYTHON" tools/demo/check_band.py classification "$WORK_DIR/test.log"
