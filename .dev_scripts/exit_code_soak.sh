#!/usr/bin/env bash
# Exit-code soak: the distributed tools must exit 0 every time they
# have done their work, also on a busy machine. Runs, beside LOAD busy
# processes, SEG_RUNS times the segmentation demo's evaluation
# (tools/dist_test.sh, 2 gloo processes) and CLS_RUNS times the classification
# demo (tools/dist_train.sh + tools/dist_test.sh), and counts non-zero exits.
#
#   .dev_scripts/exit_code_soak.sh WORK_DIR
#
# Variables: SEG_RUNS (30), CLS_RUNS (10), LOAD (busy processes beside the
# runs, 1), RUN_TIMEOUT (s per tool run, 1800: a hang counts as a failure),
# LOAD_LIMIT (s after which a busy process stops even if the soak was killed,
# 14400), PYTHON (.venv/bin/python), ADE20K_TINY_ROOT / IMAGENET_TINY_ROOT (generated
# if missing), SEG_CHECKPOINT (the segmentation demo's checkpoint; trained once
# into WORK_DIR if not given and SEG_RUNS > 0), REPO_UNDER_TEST (the checkout whose tools run,
# default this one: point it at an older checkout to measure "before").
# Logs of failed runs stay in WORK_DIR; the summary is the last lines.
set -uo pipefail
USAGE="usage: [SEG_RUNS=30 CLS_RUNS=10 LOAD=1 REPO_UNDER_TEST=.] $0 WORK_DIR"
if [ $# -eq 1 ] && { [ "$1" = -h ] || [ "$1" = --help ]; }; then
    echo "$USAGE"
    echo "(what it runs and every variable: the comment at the top of $0)"
    exit 0
fi
if [ $# -ne 1 ] || [[ $1 == -* ]]; then  # an option is no WORK_DIR
    echo "$USAGE" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")/.." && pwd)
# no errexit here (the runs' exit codes are counted): an unusable directory
# stops the soak before it writes anywhere else
REPO=$(cd "${REPO_UNDER_TEST:-$HERE}" && pwd) ||
    { echo "$0: REPO_UNDER_TEST is not a directory: $REPO_UNDER_TEST" >&2; exit 2; }
WORK=$(mkdir -p -- "$1" && cd -- "$1" && pwd) ||
    { echo "$0: cannot make or enter WORK_DIR $1" >&2; exit 2; }
SEG_RUNS=${SEG_RUNS:-30}
CLS_RUNS=${CLS_RUNS:-10}
LOAD=${LOAD:-1}
RUN_TIMEOUT=${RUN_TIMEOUT:-1800}
LOAD_LIMIT=${LOAD_LIMIT:-14400}
export PYTHON=${PYTHON:-$HERE/.venv/bin/python}
export ADE20K_TINY_ROOT=${ADE20K_TINY_ROOT:-$WORK/data/ade20k_tiny/}
export IMAGENET_TINY_ROOT=${IMAGENET_TINY_ROOT:-$WORK/data/imagenet_tiny}
SEG_CONFIG=$REPO/configs/demo/fpn_convneur_m2_ade20k_tiny.py
CLS_CONFIG=$REPO/configs/demo/cls_convneur_m1_imagenet_tiny.py
cd "$HERE"

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# run_tool LOG CMD...: runs one tool with a fresh port; prints its exit status
run_tool() {
    local log=$1
    shift
    PORT=$(free_port) timeout "$RUN_TIMEOUT" "$@" > "$log" 2>&1
    echo $?
}

[ -f "$ADE20K_TINY_ROOT/sceneCategories.txt" ] ||
    "$PYTHON" -m convneur_mm.demo_data.ade20k "$ADE20K_TINY_ROOT" > /dev/null
[ -f "$IMAGENET_TINY_ROOT/meta/val.txt" ] ||
    "$PYTHON" -m convneur_mm.demo_data.imagenet "$IMAGENET_TINY_ROOT" > /dev/null
SEG_CHECKPOINT=${SEG_CHECKPOINT:-}
if [ -z "$SEG_CHECKPOINT" ] && [ "$SEG_RUNS" -gt 0 ]; then
    echo "[soak] training the segmentation demo once (no SEG_CHECKPOINT given)"
    rc=$(run_tool "$WORK/seg_train.log" "$REPO/tools/dist_train.sh" "$SEG_CONFIG" 2 \
         --work-dir "$WORK/seg_train")
    [ "$rc" = 0 ] || { echo "[soak] training failed (rc $rc): $WORK/seg_train.log" >&2; exit 1; }
    SEG_CHECKPOINT=$(cat "$WORK/seg_train/last_checkpoint")
fi

burners=()
stop_load() { [ ${#burners[@]} -eq 0 ] || kill "${burners[@]}" 2>/dev/null; }
trap stop_load EXIT
for ((i = 0; i < LOAD; i++)); do
    timeout "$LOAD_LIMIT" bash -c 'while :; do :; done' &
    burners+=($!)
done

echo "[soak] $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)," \
     "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); load before start:" \
     "$(cut -d' ' -f1-3 /proc/loadavg); $LOAD busy process(es) beside the runs"
echo "[soak] tools of $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"

start=$SECONDS
seg_failed=0
for ((i = 1; i <= SEG_RUNS; i++)); do
    t=$SECONDS
    log=$WORK/seg_test_$i.log
    rc=$(run_tool "$log" "$REPO/tools/dist_test.sh" "$SEG_CONFIG" "$SEG_CHECKPOINT" 2 \
         --work-dir "$WORK/seg_test")
    note=""
    if [ "$rc" != 0 ]; then
        seg_failed=$((seg_failed + 1))
        note=" FAILED ($(grep -c 'terminate called without an active exception' "$log")" 
        note+=" 'terminate called' lines; log: $log)"
    else
        rm -f "$log"
    fi
    echo "[soak] segmentation dist_test $i/$SEG_RUNS: exit $rc, $((SECONDS - t)) s$note"
done
seg_time=$((SECONDS - start))

start=$SECONDS
cls_failed=0
for ((i = 1; i <= CLS_RUNS; i++)); do
    t=$SECONDS
    dir=$WORK/cls_$i
    rc=$(run_tool "$dir.train.log" "$REPO/tools/dist_train.sh" "$CLS_CONFIG" 2 --work-dir "$dir")
    step=dist_train
    if [ "$rc" = 0 ]; then
        step=dist_test
        rc=$(run_tool "$dir.test.log" "$REPO/tools/dist_test.sh" "$CLS_CONFIG" \
             "$(cat "$dir/last_checkpoint")" 2 --work-dir "$dir/test")
    fi
    note=""
    if [ "$rc" != 0 ]; then
        cls_failed=$((cls_failed + 1))
        note=" FAILED in $step (logs: $dir.*.log)"
    else
        top1=$(grep -oE 'accuracy/top1 \| [0-9.]+' "$dir.test.log" | grep -oE '[0-9.]+$')
        note=" (top-1 ${top1:-?})"
        rm -rf "$dir" "$dir".*.log
    fi
    echo "[soak] classification dist_train + dist_test $i/$CLS_RUNS: exit $rc, $((SECONDS - t)) s$note"
done
cls_time=$((SECONDS - start))

echo "[soak] segmentation dist_test: $seg_failed of $SEG_RUNS runs exited non-zero ($seg_time s)"
echo "[soak] classification dist_train + dist_test: $cls_failed of $CLS_RUNS runs exited non-zero ($cls_time s)"
[ $((seg_failed + cls_failed)) -eq 0 ]
