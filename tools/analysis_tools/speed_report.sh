#!/usr/bin/env bash
# Run the speed benchmarks of docs/notes/benchmarks.md on this machine: every
# table and figure goes to OUT_DIR (default work_dirs/speed_report/), each
# command's output beside it.
#
#   tools/analysis_tools/speed_report.sh [OUT_DIR]
#
# Run it on an otherwise idle machine: the ratios are measured in one run, but
# other load skews them. On a CUDA machine the speed and scaling benchmarks run
# on the GPU (batch 128 for throughput, as in the OverLoCK paper's table).
set -euo pipefail
USAGE="usage: [PYTHON=.venv/bin/python] $0 [OUT_DIR]   (default OUT_DIR: \
work_dirs/speed_report, relative to the repository)"
if [ $# -eq 1 ] && { [ "$1" = -h ] || [ "$1" = --help ]; }; then
    echo "$USAGE"
    exit 0
fi
if [ $# -gt 1 ] || [[ ${1:-} == -* ]]; then  # an option is no OUT_DIR
    echo "$USAGE" >&2
    exit 2
fi
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-work_dirs/speed_report}
if ! mkdir -p -- "$OUT" || ! [ -w "$OUT" ]; then
    echo "$0: cannot write in OUT_DIR $OUT" >&2
    exit 2
fi
run() {  # run NAME CMD...: the output to the terminal and to OUT/NAME.md
    local name=$1
    shift
    echo "### $name: $*" >&2
    "$@" | tee "$OUT/$name.md"
}
run speed "$PYTHON" tools/analysis_tools/benchmark_speed.py --rounds 3 --out "$OUT/speed.json"
run memory_branch "$PYTHON" tools/analysis_tools/benchmark_memory.py
run resolution_scaling "$PYTHON" tools/analysis_tools/resolution_scaling.py \
    --sizes 256 512 1024 1536 2048 --budget 60 --out-dir "$OUT"
run with_cp "$PYTHON" tools/analysis_tools/benchmark_with_cp.py
# ERF of the memory model, its local-only ablation and a ConvNeXt peer
run erf "$PYTHON" tools/analysis_tools/effective_receptive_field.py \
    --models ConvNeur-M3 "ConvNeur-M3 local-only" ConvNeXt-V2-P --num-images 8 \
    --out "$OUT/erf.png"
# Figure 4 panels with the segmentation demo's trained S-FPN M2 (make demo) on
# a tiny-ADE20K validation image; random weights when the demo has not run.
image=$(ls data/ade20k_tiny/images/validation/*.jpg 2>/dev/null | head -n 1 || true)
if [ -z "$image" ]; then
    "$PYTHON" -m convneur_mm.demo_data.ade20k data/ade20k_tiny/ > /dev/null
    image=$(ls data/ade20k_tiny/images/validation/*.jpg | head -n 1)
fi
checkpoint=$(cat work_dirs/demo_segmentation/last_checkpoint 2>/dev/null || true)
run gates "$PYTHON" tools/analysis_tools/visualize_gates.py "$image" \
    configs/demo/fpn_convneur_m2_ade20k_tiny.py $checkpoint --short-side 256 \
    --out "$OUT/gates.png"
