#!/usr/bin/env bash
# The main job on the embedded default (called by `make demo`): a smoke run that
# builds every shipped model, then the three task demos, each trained from
# scratch on its generated tiny dataset with 2 CPU processes (tools/dist_train.sh)
# and evaluated from its checkpoint (tools/dist_test.sh):
#   detection       Cascade Mask R-CNN + ConvNeur-M3, tiny COCO     (~13 min on 2 cores)
#   segmentation    Semantic FPN + ConvNeur-M2, tiny ADE20K         (~3 min)
#   classification  ConvNeur-M1, tiny ImageNet                      (~3 min)
# DEMOS="segmentation classification" runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-.venv/bin/python}
DEMOS=${DEMOS:-smoke detection segmentation classification}
start=$SECONDS
for demo in $DEMOS; do
    case $demo in
        smoke) "$PYTHON" tools/demo/smoke.py ;;
        detection|segmentation|classification) bash "tools/demo/$demo.sh" ;;
        *) echo "unknown demo '$demo' (smoke, detection, segmentation, classification)" >&2
           exit 2 ;;
    esac
done
echo "main job done in $((SECONDS - start)) s; the tables above are the results"
