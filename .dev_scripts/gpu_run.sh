#!/usr/bin/env bash
# The one GPU run: ConvNeur-MM's GPU checks and figures on a CUDA host, results
# in one folder. Run it from the repository root on the GPU host
# (.dev_scripts/README.md says what to copy there first):
#
#   bash .dev_scripts/gpu_run.sh [--out DIR] [--limit-s S] [--tar PATH] [--dry-run]
#                                [--no-mmcv-ops] [-- GPU_CASE_OPTIONS...]
#
# First the stack is installed from .dev_scripts/wheels beside the host's
# torch (install_stack.sh; without that folder the host's Python is used as
# it is) and mmcv's CUDA ops are checked: nms and RoIAlign on CUDA tensors.
# A failure there ends the run at once with exit status 3, before any step
# (with --tar, DIR/install.log alone packed there).
#
# Then the lab's GPU run, `python -m benchmarks.run gpu --out DIR`, with what
# is left of --limit-s (default 520: within nine minutes, the install and the
# last packing included):
# the kernels' correctness, Nsight Compute and compute-sanitizer on them,
# their tuning, then the figures, each step a process of its own, each saved as it
# finishes (DIR/progress.jsonl, DIR/<step>.log, the steps' JSON), and the
# folder packed to --tar PATH after every step. Run it again with the same
# --out to resume: only what is missing runs. Options after `--` go to the gpu
# case (e.g. `-- --only correctness tune`, `-- --list`);
# benchmarks/README.md lists its steps.
#
# --dry-run installs nothing and runs each step's CPU check instead (on any
# machine, GPU or not). The exit status is the gpu case's: 1 where a step
# failed or timed out, 0 otherwise; 2 for options that do not fit; 3 for a failed install.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

RESULTS=gpu_results
LIMIT_S=520
START_EPOCH=$(date +%s)
DRY_RUN=0
MMCV_OPS=1
TAR=
while [ $# -gt 0 ]; do
    case $1 in
        --out) RESULTS=${2:?--out needs a directory}; shift 2 ;;
        --limit-s) LIMIT_S=${2:?--limit-s needs seconds}; shift 2 ;;
        --tar) TAR=${2:?--tar needs a path}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --no-mmcv-ops) MMCV_OPS=0; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "gpu_run.sh: unknown option '$1' (the gpu case's options go after --)" >&2
           usage >&2; exit 2 ;;
    esac
done
[[ $LIMIT_S =~ ^[0-9]+$ ]] || { echo "gpu_run.sh: --limit-s takes whole seconds, not '$LIMIT_S'" >&2; exit 2; }

mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHON PYTHONUNBUFFERED=1 DRY_RUN MMCV_OPS

start=$SECONDS
if ! source .dev_scripts/install_stack.sh > "$RESULTS/install.log" 2>&1; then
    echo "[gpu_run] ================================================================" >&2
    echo "[gpu_run] INSTALL FAILED: the stack or mmcv's CUDA ops do not work here;" >&2
    echo "[gpu_run] no step ran. $RESULTS/install.log ends:" >&2
    tail -n 30 "$RESULTS/install.log" >&2
    echo "[gpu_run] ================================================================" >&2
    # the install's log alone comes back: a resumed folder's reports could pass
    # the size the tar must keep within
    [ -n "$TAR" ] && tar czf "$TAR" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")/install.log"
    exit 3
fi
tail -n 8 "$RESULTS/install.log"
left=$((LIMIT_S - (SECONDS - start)))
echo "[gpu_run] install $([ "$DRY_RUN" = 1 ] && echo 'dry run' || echo ok) in $((SECONDS - start)) s; $left s left"

# a deadline, not a duration: python's start-up counts against the limit too
args=(--out "$RESULTS" --deadline "$((START_EPOCH + LIMIT_S))")
[ -n "$TAR" ] && args+=(--tar "$TAR")
[ "$DRY_RUN" = 1 ] && args+=(--dry-run)
[ "$MMCV_OPS" = 1 ] || args+=(--no-mmcv-ops)
# exec: an outer timeout's SIGTERM reaches the gpu case itself, which stops its
# step and packs before it exits (a bash in between would exit at once)
exec "$PYTHON" -m benchmarks.run gpu "${args[@]}" "$@"
