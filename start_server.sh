#!/usr/bin/env bash
# Run the model server (python -m service) for the Vast.ai PyWorker, which tails $MODEL_LOG.
#
# The server writes each log line to $MODEL_LOG itself and to stdout (the container's log). This
# script empties the log before the server starts, keeping the previous run's as $MODEL_LOG.old,
# so the PyWorker never reads a line of an earlier run, not even while the server is importing.
# If the server exits without being asked to, a line with the fatal marker goes to the log, so the
# PyWorker reports the worker as errored even when the server died before it could log.
set -euo pipefail
cd "$(dirname "$0")"

export MODEL_LOG="${MODEL_LOG:-/var/log/model/server.log}"
export PYTHONUNBUFFERED=1
mkdir -p "$(dirname "$MODEL_LOG")"
if [ -s "$MODEL_LOG" ]; then
    cp "$MODEL_LOG" "$MODEL_LOG.old"
fi
: > "$MODEL_LOG"

python3 -m service &
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
    marker=$(python3 -c 'from service.signals import FATAL_MARKER; print(FATAL_MARKER)')
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $marker model server exited unexpectedly (status $status)" | tee -a "$MODEL_LOG"
fi
exit "$status"
