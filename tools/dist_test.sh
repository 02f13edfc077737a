#!/usr/bin/env bash
# tools/dist_test.sh CONFIG CHECKPOINT GPUS [ARGS]   (same variables as dist_train.sh)
set -euo pipefail
USAGE="usage: [NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 PORT=29500] $0 CONFIG CHECKPOINT GPUS [test.py args]"
if [ $# -lt 3 ]; then
    echo "$USAGE" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
if ! [[ $GPUS =~ ^[1-9][0-9]*$ ]]; then  # torchrun's own check is a bare AssertionError
    echo "$0: GPUS (processes per node) must be a positive integer, got '$GPUS'" >&2
    echo "$USAGE" >&2
    exit 2
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
TOOLS_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/launch_env.sh
source "$TOOLS_DIR/launch_env.sh" "$@"

PYTHONPATH="$TOOLS_DIR/..${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$TOOLS_DIR/test.py" \
    "$CONFIG" \
    "$CHECKPOINT" \
    --launcher pytorch "${@:4}"
