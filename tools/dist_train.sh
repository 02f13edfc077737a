#!/usr/bin/env bash
# tools/dist_train.sh CONFIG GPUS [ARGS]
# Starts GPUS processes per node with torchrun: NCCL on CUDA machines, gloo on
# CPU-only machines (one process per requested "GPU"). Multi-node: run it on
# every node with the same NNODES, MASTER_ADDR (node 0's address) and PORT,
# and NODE_RANK = 0 .. NNODES-1. PYTHON picks the interpreter (default: the repository's
# .venv/bin/python if it exists, else python).
set -euo pipefail
USAGE="usage: [NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 PORT=29500] $0 CONFIG GPUS [train.py args]"
if [ $# -lt 2 ]; then
    echo "$USAGE" >&2
    exit 2
fi
CONFIG=$1
GPUS=$2
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
    "$TOOLS_DIR/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
