#!/usr/bin/env bash
# What is still to run on a GPU, sized for one call of a lent machine: 15
# minutes of device time a session, start-up included, 600 s a command. The
# call (`run`'s command, carrying .whl; .dev_scripts/README.md):
#
#   export MMCV_OPS=0; source .dev_scripts/device_env.sh && bash .dev_scripts/gpu_todo.sh
#
# Steps (default: bench tests), in the order to run them:
#   bench    gpu_memory_bench.py: the neural memory's products, its variants,
#            M3 against local-only eager and compiled, numerics, batch 1
#            under CUDA graphs; JSON in $OUT/gpu_memory_bench.json
#   tests    the GPU tests still to run on a GPU: the backbone's graph-break
#            check under CUDA bf16 autocast, and where mmcv has its CUDA ops
#            the fp16 detector step and RoIAlign on the backbone's outputs
#            (not with MMCV_OPS=0: then they are left out, and said so)
#   speed, compile, demo, headroom: each fills a session of its own
#            (benchmark_speed.py, benchmark_compile.py, the detection demo,
#            fp16_headroom.py; docs/notes/gpu_runs.md)
#
# The whole run ends by TOTAL_S seconds after it starts (default 540: with
# `timeout_s` 570 and a minute or two of start-up, a call that fails early
# leaves device time to run it again). Each step gets its own limit
# (BUDGET_<STEP>), cut to what is left, and is skipped, with a line saying
# so, below MIN_S (60) seconds. Logs and results go to $OUT (default
# /tmp/gpu_todo); one line per step says how it ended. Exit status: non-zero
# if any step failed, ran out of time or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_todo}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export OUT PYTHON PYTHONUNBUFFERED=1
TOTAL_S=${TOTAL_S:-540}
MIN_S=${MIN_S:-60}
failed=0

step() {  # NAME LIMIT COMMAND...: run within LIMIT and what is left, log to $OUT/NAME.log
    local name=$1 limit=$2 left=$((TOTAL_S - SECONDS)) start=$SECONDS rc
    shift 2
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt "$MIN_S" ]; then
        echo "[gpu_todo] $name: skipped, ${left} s left of TOTAL_S=$TOTAL_S (needs $MIN_S)"
        failed=1
        return
    fi
    STEP_LIMIT=$limit timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "[gpu_todo] $name: exit $rc in $((SECONDS - start)) s (limit $limit s)"
    tail -n "${TAIL:-25}" "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=1
}

bench() {  # the script's own budget ends 30 s before the step's limit: its JSON is whole
    "$PYTHON" .dev_scripts/gpu_memory_bench.py --out "$OUT/gpu_memory_bench.json" \
        --budget-s $((STEP_LIMIT - 30))
}

gpu_tests() {
    local keys=${TESTS_K:-"graph_breaks"}
    if "$PYTHON" -c "import mmcv.ops" 2>/dev/null; then
        keys="fp16_amp or roi_align or $keys"
    else
        echo "[gpu_todo] tests: mmcv has no CUDA ops here (MMCV_OPS=0): the fp16 detector" \
             "step (fp16_amp) and RoIAlign (roi_align) are left out"
    fi
    local per_test=()
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 150)
    CONVNEUR_TEST_GPU_CHILD=1 "$PYTHON" -m pytest -m gpu tests projects -k "$keys" \
        -p no:cacheprovider -rA --continue-on-collection-errors "${per_test[@]}" \
        --junitxml "$OUT/tests.xml"
}

export -f bench gpu_tests  # run under `timeout` through bash -c

coco_tiny() {  # the tiny COCO set, generated once
    export COCO_TINY_ROOT=${COCO_TINY_ROOT:-/tmp/coco_tiny/}
    [ -f "$COCO_TINY_ROOT/annotations/instances_val2017.json" ] || \
        "$PYTHON" -m convneur_mm.demo_data.coco "$COCO_TINY_ROOT" > /dev/null
}

[ $# -gt 0 ] || set -- bench tests
for todo in "$@"; do
    case $todo in
        bench)
            step bench "${BUDGET_BENCH:-400}" bash -c bench ;;
        tests)
            step tests "${BUDGET_TESTS:-240}" bash -c gpu_tests ;;
        speed)
            step speed "${BUDGET_SPEED:-500}" "$PYTHON" tools/analysis_tools/benchmark_speed.py \
                --device cuda --modes eager compiled --out "$OUT/speed.json" --models \
                ConvNeur-M3 "ConvNeur-M3 local-only" ConvNeXt-V2-P ResNet-50 ;;
        compile)
            step compile "${BUDGET_COMPILE:-250}" "$PYTHON" \
                tools/analysis_tools/benchmark_compile.py --device cuda
            step compile_amp "${BUDGET_COMPILE:-250}" "$PYTHON" \
                tools/analysis_tools/benchmark_compile.py --device cuda --amp ;;
        demo)
            work=/tmp/gpu_todo_demo
            coco_tiny
            step demo_train "${BUDGET_DEMO:-250}" tools/dist_train.sh \
                configs/demo/cascade_rcnn_convneur_m3_coco_tiny.py 1 --work-dir "$work" \
                --amp --compile --auto-scale-lr
            if [ -f "$work/last_checkpoint" ]; then
                step demo_test "${BUDGET_DEMO:-250}" tools/dist_test.sh \
                    configs/demo/cascade_rcnn_convneur_m3_coco_tiny.py \
                    "$(cat "$work/last_checkpoint")" 1 --work-dir "$work/test" --compile
            fi ;;
        headroom)
            coco_tiny
            step headroom "${BUDGET_HEADROOM:-150}" "$PYTHON" \
                tools/analysis_tools/fp16_headroom.py configs/cascade_rcnn_convneur_m3_1x_coco.py \
                --device cuda --batch 2 --iters 3 --cfg-options \
                train_dataloader.dataset.data_root="$COCO_TINY_ROOT" \
                "train_dataloader.dataset.metainfo.classes=(disc,square,triangle,ring)" ;;
        *)
            echo "unknown step '$todo' (bench, tests, speed, compile, demo, headroom)" >&2
            exit 2 ;;
    esac
done
echo "[gpu_todo] done in $SECONDS s (TOTAL_S=$TOTAL_S)"
exit $failed
