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
USAGE="usage: [GPUS=8 GPUS_PER_NODE=8 CPUS_PER_TASK=5 SRUN_ARGS= PORT=] $0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py args]"
TOOLS_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/launch_env.sh
source "$TOOLS_DIR/launch_env.sh" "$@"
[ $# -ge 4 ] || launch_usage_error
launch_srun "$1" "$2" "$TOOLS_DIR/train.py" "$3" --work-dir="$4" --launcher=slurm "${@:5}"
