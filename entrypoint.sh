#!/usr/bin/env bash
# The image's command: the model server (start_server.sh) and, with JAXBENCH_PYWORKER=1, Vast.ai's
# PyWorker bootstrap, fetched from PYWORKER_BOOTSTRAP_URL (it clones PYWORKER_REPO into a venv of its
# own and runs its worker.py). Vast's two launch modes run it differently (README, "3. The template"):
# the entrypoint mode runs it as the container's command; the SSH and Jupyter modes run Vast's own
# init instead, and the template's on-start script starts it in the background.
#
# It lasts as long as the model server; SIGTERM or SIGINT stops the server and the PyWorker. When the
# server dies by itself, the PyWorker stays up to report the worker as errored (the autoscaler then
# replaces it), and this script ends when the PyWorker does, with the server's status.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bootstrap_url="${PYWORKER_BOOTSTRAP_URL:-https://raw.githubusercontent.com/vast-ai/pyworker/main/start_server.sh}"

"$here/start_server.sh" &
server=$!

pyworker=""
if [ "${JAXBENCH_PYWORKER:-0}" = 1 ]; then
    echo "entrypoint: starting the PyWorker bootstrap from $bootstrap_url" >&2
    # A session of its own, so that stopping its process group also stops a PyWorker that the bootstrap
    # left running in the background. ROTATE_MODEL_LOG=false: start_server.sh has already begun a new
    # log, and moving it aside again while the server writes to it would hide the server's lines from
    # the PyWorker.
    # shellcheck disable=SC2016  # $1 is the inner shell's
    ROTATE_MODEL_LOG=false setsid bash -c 'set -o pipefail; curl -fsSL "$1" | bash' pyworker-bootstrap \
        "$bootstrap_url" &
    pyworker=$!
fi

stopping=0
# shellcheck disable=SC2329  # called by the trap
stop() {
    stopping=1
    kill -TERM "$server" 2>/dev/null || true
    if [ -n "$pyworker" ]; then
        kill -TERM -- "-$pyworker" 2>/dev/null || true
    fi
}
trap stop TERM INT

# `wait` returns early (status > 128) when a trapped signal arrives: wait again until the server is gone.
while :; do
    status=0
    wait "$server" || status=$?
    kill -0 "$server" 2>/dev/null || break
done

if [ -n "$pyworker" ]; then
    if [ "$stopping" = 0 ]; then
        echo "entrypoint: the model server exited (status $status); the PyWorker goes on to report it" >&2
    fi
    stop_by=""
    while kill -0 -- "-$pyworker" 2>/dev/null; do
        if [ "$stopping" = 1 ]; then  # asked to stop: 10 s to go, then killed
            stop_by="${stop_by:-$((SECONDS + 10))}"
            if [ "$SECONDS" -ge "$stop_by" ]; then
                kill -KILL -- "-$pyworker" 2>/dev/null || true
            fi
        fi
        sleep 0.5
    done
fi
exit "$status"
