#!/usr/bin/env bash
# tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [ARGS]
# One Slurm task per GPU (GPUS in total, GPUS_PER_NODE per node); each task
# runs tools/train.py with --launcher slurm. Variables: GPUS (8),
# GPUS_PER_NODE (8), CPUS_PER_TASK (5), SRUN_ARGS (more srun options),
# PYTHON (the repository's .venv/bin/python if it exists, else python), PORT
# (the rendezvous port, exported as MASTER_PORT; 29500 if neither is set; give
# concurrent jobs sharing a node different ones), GRES
# (gpu:GPUS_PER_NODE; set it empty on a CPU-only partition, where every task is
# one gloo process).
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: [GPUS=8 GPUS_PER_NODE=8 CPUS_PER_TASK=5 SRUN_ARGS= PORT=] $0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py args]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
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
    "$PYTHON" -u "$TOOLS_DIR/train.py" "$CONFIG" --work-dir="$WORK_DIR" \
    --launcher=slurm "${@:5}"
