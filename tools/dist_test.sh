#!/usr/bin/env bash
# tools/dist_test.sh CONFIG CHECKPOINT GPUS [ARGS]   (same variables as dist_train.sh)
set -euo pipefail
USAGE="usage: [NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 PORT=29500] $0 CONFIG CHECKPOINT GPUS [test.py args]"
TOOLS_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/launch_env.sh
source "$TOOLS_DIR/launch_env.sh" "$@"
[ $# -ge 3 ] || launch_usage_error
launch_torchrun "$3" "$TOOLS_DIR/test.py" "$1" "$2" --launcher pytorch "${@:4}"
