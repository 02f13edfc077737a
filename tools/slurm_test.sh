#!/usr/bin/env bash
# tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [ARGS]
# Same variables as slurm_train.sh (GPUS defaults to 8).
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: [GPUS=8 GPUS_PER_NODE=8 CPUS_PER_TASK=5 SRUN_ARGS= PORT=] $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
CHECKPOINT=$4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
GRES=${GRES-gpu:$GPUS_PER_NODE}
if [ -n "${PORT:-}" ]; then
    export MASTER_PORT=$PORT  # srun passes the environment on to every task
fi
TOOLS_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/launch_env.sh
source "$TOOLS_DIR/launch_env.sh" "$@"

# shellcheck disable=SC2086  # SRUN_ARGS is a list of options
PYTHONPATH="$TOOLS_DIR/..${PYTHONPATH:+:$PYTHONPATH}" \
srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    ${GRES:+--gres="$GRES"} \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    $SRUN_ARGS \
    "$PYTHON" -u "$TOOLS_DIR/test.py" "$CONFIG" "$CHECKPOINT" --launcher=slurm "${@:5}"
