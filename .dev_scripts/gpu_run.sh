#!/usr/bin/env bash
# The one GPU run: ConvNeur-MM's GPU figures and GPU tests on a CUDA host,
# results in one folder. Run it from the repository root on the GPU host
# (.dev_scripts/README.md says what to copy there first):
#
#   bash .dev_scripts/gpu_run.sh [--out DIR] [--limit-s S] [--dry-run] [--no-mmcv-ops] [SECTION...]
#
# First the stack is installed from .dev_scripts/wheels beside the host's
# torch (install_stack.sh; without that folder the host's Python is used as
# it is) and mmcv's CUDA ops are checked: nms and RoIAlign on CUDA tensors.
# A failure there ends the run at once with exit status 3, before any section.
#
# Sections (default: the first four, in this order), with their estimated seconds:
#   profile  the memory's kernels under torch.profiler: python -m benchmarks.run
#            memory --sections profile -> profile.json
#   bench    the neural memory's figures: python -m benchmarks.run memory -> bench.json
#            (its options: BENCH_ARGS, e.g. "--sections branch compiled")
#   train    training iterations of the real configs beside their peers, and
#            evaluation: python -m benchmarks.run train -> train.json
#            (its options: TRAIN_ARGS, default "--amp --eval")
#   tests    the GPU tests of `make test-gpu` still to confirm: the backbone's
#            graph-break check under CUDA bf16 autocast, and with mmcv's CUDA
#            ops the fp16 --amp detector step and RoIAlign (pytest -k TESTS_K)
#            -> tests.xml
#   kernels  (only when named) the memory's Triton kernels compiled for this
#            GPU against float64, every operand dtype at the models' widths,
#            forward, backward and projections, and a memory trained with them
#            (pytest -m gpu -k KERNELS_K) -> kernels.xml
#   tune     (only when named) the kernels' launch options chosen by timing at
#            M3's stage 1, bf16, beside the PyTorch path:
#            python -m benchmarks.run tune (options: TUNE_ARGS) -> tune.json
#   precision (only when named) bf16 and fp16 against float32 training, M1 on
#            the tiny ImageNet from three seeds, 300 iterations each: python -m
#            benchmarks.run precision (options: PRECISION_ARGS) -> precision.json
#
# One time limit, --limit-s (default 600), covers the whole run. Each section
# runs under a timeout of what is left of it less the estimates of the
# sections after it (never less than its own estimate), and is skipped when
# less than its estimate is left. A section that fails, runs out of time or is
# skipped is recorded and the next one runs; the exit status is then 0.
# Results: DIR/<section>.log, the files above, DIR/summary.tsv (one line per
# step: name, status, seconds, limit, seconds of the run's limit left when it
# started, command), the table printed at the end.
# SECTION_S="kernels=170 bench=230" replaces those sections' estimates (a
# kernels run narrowed by KERNELS_K needs less than the whole one's).
# --dry-run writes the same plan, logs and summary without running a section
# or installing anything (on any machine, GPU or not).
set -uo pipefail
cd "$(dirname "$0")/.."

SECTIONS=(profile bench train tests)
# seconds on an H200 (the install took 67 more): with the install they fill the
# default limit; the bench records what it had no time for
declare -A ESTIMATE_S=([profile]=55 [bench]=150 [train]=140 [tests]=150 [kernels]=420
                     [tune]=300 [precision]=360)

usage() { sed -n 2,47p "$0" | sed 's/^# \{0,1\}//'; }

RESULTS=gpu_results
LIMIT_S=600
DRY_RUN=0
MMCV_OPS=1
chosen=()
while [ $# -gt 0 ]; do
    case $1 in
        --out) RESULTS=${2:?--out needs a directory}; shift 2 ;;
        --limit-s) LIMIT_S=${2:?--limit-s needs seconds}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --no-mmcv-ops) MMCV_OPS=0; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_run.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
        *) [ -n "${ESTIMATE_S[$1]:-}" ] || {
               echo "gpu_run.sh: unknown section '$1' (sections: ${SECTIONS[*]})" >&2; exit 2; }
           chosen+=("$1"); shift ;;
    esac
done
[[ $LIMIT_S =~ ^[0-9]+$ ]] || { echo "gpu_run.sh: --limit-s takes whole seconds, not '$LIMIT_S'" >&2; exit 2; }
for pair in ${SECTION_S:-}; do
    [[ $pair =~ ^([a-z]+)=([0-9]+)$ && -n "${ESTIMATE_S[${BASH_REMATCH[1]}]:-}" ]] || {
        echo "gpu_run.sh: SECTION_S takes SECTION=SECONDS pairs, not '$pair'" >&2; exit 2; }
    ESTIMATE_S[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done
[ ${#chosen[@]} -gt 0 ] || chosen=("${SECTIONS[@]}")

mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHON PYTHONUNBUFFERED=1 DRY_RUN MMCV_OPS
SUMMARY=$RESULTS/summary.tsv
printf 'step\tstatus\tseconds\tlimit_s\tleft_s\tcommand\n' > "$SUMMARY"

record() {  # NAME STATUS SECONDS LIMIT LEFT COMMAND
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$SUMMARY"
    printf '[gpu_run] %-8s %s in %s s (limit %s s)\n' "$1" "$2" "$3" "$4"
}

section_command() {  # NAME LIMIT: sets cmd
    # the bench gets the section's limit, less a margin to write its JSON: it
    # skips, and records, what no longer fits instead of being cut off
    local budget=$(($2 > 30 ? $2 - 15 : $2))
    case $1 in
        bench)
            local extra
            read -ra extra <<< "${BENCH_ARGS:-}"
            cmd=("$PYTHON" -m benchmarks.run memory --budget-s "$budget"
                 --json "$RESULTS/bench.json" "${extra[@]}") ;;
        profile) cmd=("$PYTHON" -m benchmarks.run memory --sections profile
                      --budget-s "$budget" --json "$RESULTS/profile.json") ;;
        train)
            local extra
            read -ra extra <<< "${TRAIN_ARGS:---amp --eval}"
            cmd=("$PYTHON" -m benchmarks.run train --device cuda
                 "${extra[@]}" --json "$RESULTS/train.json") ;;
        tests)
            # the fp16 detector step and RoIAlign need mmcv's CUDA ops
            local keys=${TESTS_K:-graph_breaks}
            [ "$MMCV_OPS" = 1 ] && [ -z "${TESTS_K:-}" ] && keys="fp16_amp or roi_align or $keys"
            cmd=(env CONVNEUR_TEST_GPU_CHILD=1 "$PYTHON" -m pytest -m gpu tests projects
                 -k "$keys" -p no:cacheprovider -rA --continue-on-collection-errors
                 --junitxml "$RESULTS/tests.xml") ;;
        kernels)
            cmd=(env CONVNEUR_TEST_GPU_CHILD=1 "$PYTHON" -m pytest -m gpu tests/test_models
                 -k "${KERNELS_K:-on_cuda or in_bfloat16}" -p no:cacheprovider -rA
                 --junitxml "$RESULTS/kernels.xml") ;;
        tune)
            # it stops trying candidates at its --limit-s, then times the calls once more
            local extra
            read -ra extra <<< "${TUNE_ARGS:-}"
            cmd=("$PYTHON" -m benchmarks.run tune
                 --limit-s $(($2 > 60 ? $2 - 45 : $2 / 2)) "${extra[@]}"
                 --json "$RESULTS/tune.json") ;;
        precision)
            local extra
            read -ra extra <<< "${PRECISION_ARGS:---precisions float32 bfloat16 float16}"
            cmd=("$PYTHON" -m benchmarks.run precision
                 --work-dir "$RESULTS/precision_runs" "${extra[@]}"
                 --json "$RESULTS/precision.json") ;;
    esac
}

# ---------------------------------------------------------------- install
start=$SECONDS
if ! source .dev_scripts/install_stack.sh > "$RESULTS/install.log" 2>&1; then
    record install failed $((SECONDS - start)) - "$LIMIT_S" 'source .dev_scripts/install_stack.sh'
    echo "[gpu_run] ================================================================" >&2
    echo "[gpu_run] INSTALL FAILED: the stack or mmcv's CUDA ops do not work here;" >&2
    echo "[gpu_run] no section ran. $RESULTS/install.log ends:" >&2
    tail -n 30 "$RESULTS/install.log" >&2
    echo "[gpu_run] ================================================================" >&2
    exit 3
fi
tail -n 8 "$RESULTS/install.log"
record install "$([ "$DRY_RUN" = 1 ] && echo dry-run || echo ok)" $((SECONDS - start)) - \
    "$LIMIT_S" 'source .dev_scripts/install_stack.sh'

# --------------------------------------------------------------- sections
deadline=$((start + LIMIT_S))
for i in "${!chosen[@]}"; do
    name=${chosen[$i]}
    need=${ESTIMATE_S[$name]}
    later=0
    for next in "${chosen[@]:$((i + 1))}"; do later=$((later + ESTIMATE_S[$next])); done
    left=$((deadline - SECONDS))
    limit=$((left - later))
    [ "$limit" -lt "$need" ] && limit=$need
    [ "$limit" -gt "$left" ] && limit=$left
    section_command "$name" "$limit"
    shown=$(printf '%q ' "${cmd[@]}")
    if [ "$left" -lt "$need" ]; then
        record "$name" "skipped: ${left} s left, needs about ${need} s" 0 - "$left" "$shown"
        continue
    fi
    echo "[gpu_run] $name: $shown"
    begin=$SECONDS
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: $shown" > "$RESULTS/$name.log"
        record "$name" dry-run 0 "$limit" "$left" "$shown"
        continue
    fi
    timeout --kill-after=5 "$limit" "${cmd[@]}" > "$RESULTS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out" ;;
        *) status="failed (exit $rc)" ;;
    esac
    tail -n "${TAIL:-25}" "$RESULTS/$name.log"
    record "$name" "$status" $((SECONDS - begin)) "$limit" "$left" "$shown"
done

echo "[gpu_run] done in $SECONDS s (limit $LIMIT_S s); results in $RESULTS"
awk -F'\t' '{printf "%-8s %-36s %8s %8s\n", $1, $2, $3, $4}' "$SUMMARY"
exit 0
