#!/usr/bin/env bash
# What is still to run on a GPU (docs/cuda.md, "Still to run on a GPU"), as
# steps that fit a borrowed machine's calls (600 s each, 30 minutes a lease):
#
#   source .dev_scripts/device_env.sh && bash .dev_scripts/gpu_todo.sh STEP...
#
# Steps, in the order to run them:
#   tests    the GPU tests of the latest fixes (fp16 detector, stem, input
#            projection, evaluation's graph count, a model cast to 16 bits,
#            FSDP mixed precision, deterministic attention)
#   speed    benchmark_speed.py eager vs compiled, M3 against three peers
#   compile  benchmark_compile.py, float32 and --amp
#   demo     the detection demo trained and evaluated with --compile --amp
#   headroom fp16_headroom.py on the real COCO config (tiny COCO), the whole
#            model under fp16 autocast
#
# Each step has its own time limit (BUDGET_<STEP> seconds; the defaults keep
# every call of docs/cuda.md under 600 s with a carried mmcv) and writes its
# log and results to $OUT (default /tmp/gpu_todo); a line per step says how
# it ended. The demo's work directory (checkpoints) stays outside $OUT.
# Exit status: non-zero if any step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_todo}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHON
failed=0

step() {  # NAME LIMIT COMMAND...: run, log to $OUT/NAME.log, report
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "[gpu_todo] $name: exit $rc in $((SECONDS - start)) s (limit $limit s)"
    tail -n "${TAIL:-15}" "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=1
}

coco_tiny() {  # the tiny COCO set, generated once
    export COCO_TINY_ROOT=${COCO_TINY_ROOT:-/tmp/coco_tiny/}
    [ -f "$COCO_TINY_ROOT/annotations/instances_val2017.json" ] || \
        "$PYTHON" -m convneur_mm.demo_data.coco "$COCO_TINY_ROOT" > /dev/null
}

for todo in "$@"; do
    case $todo in
        tests)
            CONVNEUR_TEST_GPU_CHILD=1 step tests "${BUDGET_TESTS:-300}" "$PYTHON" -m pytest \
                -m gpu tests/test_gpu -p no:cacheprovider -rA \
                -k "fp16_amp or stem or input_projection or symbolic or 16_bits or fsdp or deterministic or reduce_overhead or grn" ;;
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
            echo "unknown step '$todo' (tests, speed, compile, demo, headroom)" >&2
            exit 2 ;;
    esac
done
exit $failed
