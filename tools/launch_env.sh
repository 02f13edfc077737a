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
