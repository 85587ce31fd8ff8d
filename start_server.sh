#!/usr/bin/env bash
# Run the model server (python -m service) for the Vast.ai PyWorker, which tails $MODEL_LOG.
#
# The server writes each log line to $MODEL_LOG itself and to stdout (the container's log). Before it
# starts, this script moves the last run's log to $MODEL_LOG.old and starts a new, empty file: the
# PyWorker notices a new log by its inode, so it never reads a line of an earlier run, and a reader
# of the old file is not left past the end of a truncated one.
# The server runs on $MODEL_SERVER_PYTHON (default: python3 on PATH; the image sets an absolute
# path, so a venv activated around this script cannot swap it). When that Python lacks jax, or the
# server exits without being asked to, a line with the fatal marker goes to the log, so the PyWorker
# reports the worker as errored even when the server never got to log anything itself.
set -euo pipefail
cd "$(dirname "$0")"

export MODEL_LOG="${MODEL_LOG:-/var/log/model/server.log}"
export PYTHONUNBUFFERED=1
python="${MODEL_SERVER_PYTHON:-python3}"

mkdir -p "$(dirname "$MODEL_LOG")"
if [ -e "$MODEL_LOG" ]; then
    mv -f "$MODEL_LOG" "$MODEL_LOG.old"
fi
: > "$MODEL_LOG"

signal_text() {  # the text of service/signals.py's constant $1
    sed -n "s/^$1 = \"\(.*\)\"\( *#.*\)\{0,1\}\$/\1/p" service/signals.py
}

fatal() {  # fatal CAUSE DETAIL: the fatal line of signals.py's cause CAUSE, in the log and on stdout
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $(signal_text FATAL_MARKER) $(signal_text "$1"): $2" | tee -a "$MODEL_LOG"
}

if ! command -v "$python" >/dev/null; then
    fatal JAX_NOT_INSTALLED "there is no $python"
    exit 1
fi
if ! "$python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("jax") is None)'; then
    fatal JAX_NOT_INSTALLED "no jax module for $python ($(command -v "$python"))"
    exit 1
fi

"$python" -m service &
server=$!
stopping=0
trap 'stopping=1; kill -TERM "$server" 2>/dev/null' TERM INT

# `wait` returns early (status > 128) when a trapped signal arrives: wait again until the server is gone.
while :; do
    status=0
    wait "$server" || status=$?
    kill -0 "$server" 2>/dev/null || break
done

if [ "$stopping" = 0 ]; then
    fatal SERVER_EXITED "status $status"
fi
exit "$status"
