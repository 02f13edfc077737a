# Sourced by dist_train.sh, dist_test.sh, slurm_train.sh and slurm_test.sh
# with the tool's arguments: the interpreter and the environment they launch.
# PYTHON wins; otherwise the project's .venv when it exists (no need to
# activate it), else `python` from PATH.
LAUNCH_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$LAUNCH_REPO/.venv/bin/python" ]; then
        PYTHON="$LAUNCH_REPO/.venv/bin/python"
    else
        PYTHON=python
    fi
fi
# --deterministic on CUDA: cuBLAS needs a fixed workspace, set before CUDA starts
# (tools/train.py sets it too; exported here for every process the launcher starts).
for launch_arg in "$@"; do
    if [ "$launch_arg" = --deterministic ]; then
        export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
    fi
done

# launch_usage_error MESSAGE: MESSAGE and the script's USAGE on stderr, exit 2
launch_usage_error() {
    [ -n "${1:-}" ] && echo "$0: $1" >&2
    echo "$USAGE" >&2
    exit 2
}

# launch_torchrun GPUS TOOL ARGS...: GPUS processes per node of TOOL under
# torchrun (NCCL on CUDA machines, gloo on CPU-only ones), the multi-node
# variables NNODES, NODE_RANK, MASTER_ADDR and PORT (else MASTER_PORT) with
# single-node defaults.
# The tool imports the installed package: nothing is put on PYTHONPATH.
launch_torchrun() {
    local gpus=$1
    shift
    if ! [[ $gpus =~ ^[1-9][0-9]*$ ]]; then  # torchrun's own check is a bare AssertionError
        launch_usage_error "GPUS (processes per node) must be a positive integer, got '$gpus'"
    fi
    "$PYTHON" -m torch.distributed.run \
        --nnodes="${NNODES:-1}" \
        --node_rank="${NODE_RANK:-0}" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" \
        --nproc_per_node="$gpus" \
        --master_port="${PORT:-${MASTER_PORT:-29500}}" \
        "$@"
}

# launch_srun PARTITION JOB_NAME TOOL ARGS...: one Slurm task per GPU running
# TOOL (variables: see slurm_train.sh); PORT is exported as MASTER_PORT.
launch_srun() {
    local partition=$1 job_name=$2
    shift 2
    local gpus_per_node=${GPUS_PER_NODE:-8}
    local gres=${GRES-gpu:$gpus_per_node}
    if [ -n "${PORT:-}" ]; then
        export MASTER_PORT=$PORT  # srun passes the environment on to every task
    fi
    # shellcheck disable=SC2086  # SRUN_ARGS is a list of options
    srun -p "$partition" \
        --job-name="$job_name" \
        ${gres:+--gres="$gres"} \
        --ntasks="${GPUS:-8}" \
        --ntasks-per-node="$gpus_per_node" \
        --cpus-per-task="${CPUS_PER_TASK:-5}" \
        --kill-on-bad-exit=1 \
        ${SRUN_ARGS:-} \
        "$PYTHON" -u "$@"
}
