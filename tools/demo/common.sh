# Shared by the demo scripts (sourced, not run): the interpreter, a free port
# for torchrun, and a quiet way to run a long step.

export PYTHON=${PYTHON:-.venv/bin/python}
# torchrun's port: a free one unless PORT is given (other jobs may hold 29500)
export PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# run_logged NAME LOG PATTERN CMD...: the full output goes to LOG, the lines
# matching PATTERN to the terminal; on failure, the log's tail and the command's
# exit status (the tools exit 0 exactly when their work is done: docs/advanced_guides/exit_codes.md).
run_logged() {
    local name=$1 log=$2 pattern=$3 status
    shift 3
    mkdir -p "$(dirname "$log")"
    if ! "$@" 2>&1 | tee "$log" | { grep --line-buffered -E "$pattern" || true; }; then
        status=${PIPESTATUS[0]}
        tail -n 40 "$log"
        echo "[$name demo] failed (exit status $status): $*; full log: $log" >&2
        exit 1
    fi
}
