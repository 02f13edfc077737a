#!/usr/bin/env bash
# tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [ARGS]
# Same variables as slurm_train.sh (GPUS defaults to 8).
set -euo pipefail
USAGE="usage: [GPUS=8 GPUS_PER_NODE=8 CPUS_PER_TASK=5 SRUN_ARGS= PORT=] $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args]"
TOOLS_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/launch_env.sh
source "$TOOLS_DIR/launch_env.sh" "$@"
[ $# -ge 4 ] || launch_usage_error
launch_srun "$1" "$2" "$TOOLS_DIR/test.py" "$3" "$4" --launcher=slurm "${@:5}"
