#!/usr/bin/env bash
# The main job on the embedded default (called by `make demo`): a smoke run that
# builds every shipped model, then the three task demos, each trained from
# scratch on its generated tiny dataset with 2 CPU processes (tools/dist_train.sh)
# and evaluated from its checkpoint (tools/dist_test.sh):
#   detection       Cascade Mask R-CNN + ConvNeur-M3, tiny COCO     (~13 min on 2 cores)
#   segmentation    Semantic FPN + ConvNeur-M2, tiny ADE20K         (~3 min)
#   classification  ConvNeur-M1, tiny ImageNet                      (~3 min)
# DEMOS="segmentation classification" runs a subset. A failed demo does not
# stop the others; the job then ends with a list of the failures and exit 1.
set -euo pipefail
source "$(dirname "$0")/../usage.sh"  # before the cd: it reads "$0"
usage_or_die 0 "$@"
cd "$(dirname "$0")/../.."
export PYTHON=${PYTHON:-.venv/bin/python}
DEMOS=${DEMOS:-smoke detection segmentation classification}
for demo in $DEMOS; do
    case $demo in
        smoke|detection|segmentation|classification) ;;
        *) echo "unknown demo '$demo' (smoke, detection, segmentation, classification)" >&2
           exit 2 ;;
    esac
done
start=$SECONDS
failed=()
for demo in $DEMOS; do
    if [ "$demo" = smoke ]; then
        "$PYTHON" tools/demo/smoke.py || failed+=("$demo")
    else
        bash "tools/demo/$demo.sh" || failed+=("$demo")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "main job: FAILED demos: ${failed[*]} ($((SECONDS - start)) s)" >&2
    exit 1
fi
echo "main job done in $((SECONDS - start)) s; the tables above are the results"
