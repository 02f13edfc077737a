#!/usr/bin/env bash
# tools/dist_train.sh CONFIG GPUS [ARGS]
# Starts GPUS processes per node with torchrun: NCCL on CUDA machines, gloo on
# CPU-only machines (one process per requested "GPU"). Multi-node: run it on
# every node with the same NNODES, MASTER_ADDR (node 0's address) and PORT,
# and NODE_RANK = 0 .. NNODES-1. PYTHON picks the interpreter (default: the repository's
# .venv/bin/python if it exists, else python).
set -euo pipefail
USAGE="usage: [NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 PORT=29500] $0 CONFIG GPUS [train.py args]"
TOOLS_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/launch_env.sh
source "$TOOLS_DIR/launch_env.sh" "$@"
[ $# -ge 2 ] || launch_usage_error
launch_torchrun "$2" "$TOOLS_DIR/train.py" "$1" --launcher pytorch "${@:3}"
