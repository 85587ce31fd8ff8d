#!/usr/bin/env bash
# The image's command: the model server (start_server.sh) and, when asked, Vast.ai's PyWorker
# bootstrap, fetched from PYWORKER_BOOTSTRAP_URL (it clones PYWORKER_REPO into a venv of its own and
# runs its worker.py). Vast's two launch modes run it differently (README, "3. The template"): the
# entrypoint mode runs it as the container's command; the SSH and Jupyter modes run Vast's own init
# instead, and the template's on-start script starts it in the background.
#
# Whether the PyWorker starts: JAXBENCH_PYWORKER=1/true/yes/on (any case) starts it, 0/false/no/off
# keeps it off; unset or empty, it starts when PYWORKER_REPO is set (the predecessor's templates set
# only that). The decision and its reason are logged either way. Any other value, or a PyWorker asked
# for without PYWORKER_REPO (the bootstrap would clone Vast's example PyWorker instead), ends the
# script with status 2 before anything starts.
#
# It lasts as long as the model server; SIGTERM or SIGINT stops the server and the PyWorker. When the
# server dies by itself, the PyWorker stays up to report the worker as errored (the autoscaler then
# replaces it), and this script ends when the PyWorker does, with the server's status.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# Vast's bootstrap at a fixed commit of vast-ai/pyworker (README, "2. The PyWorker repository"):
# its main branch can change under a running fleet.
bootstrap_url="${PYWORKER_BOOTSTRAP_URL:-https://raw.githubusercontent.com/vast-ai/pyworker/2207a3f94b55a0921c1641520eeb83de5a0c1611/start_server.sh}"

say() { echo "entrypoint: $*" >&2; }

switch="${JAXBENCH_PYWORKER:-}"
case "${switch,,}" in
    1 | true | yes | on)
        start_pyworker=1; reason="JAXBENCH_PYWORKER=$switch" ;;
    0 | false | no | off)
        start_pyworker=0; reason="JAXBENCH_PYWORKER=$switch" ;;
    "")
        if [ -n "${PYWORKER_REPO:-}" ]; then
            start_pyworker=1; reason="PYWORKER_REPO is set and JAXBENCH_PYWORKER is not (JAXBENCH_PYWORKER=0 turns it off)"
        else
            start_pyworker=0; reason="neither JAXBENCH_PYWORKER nor PYWORKER_REPO is set"
        fi ;;
    *)
        say "JAXBENCH_PYWORKER=$switch is neither 1/true/yes/on nor 0/false/no/off"
        exit 2 ;;
esac
if [ "$start_pyworker" = 1 ] && [ -z "${PYWORKER_REPO:-}" ]; then
    say "$reason asks for the PyWorker, but PYWORKER_REPO is unset (Vast's bootstrap would clone its own example PyWorker): set it to this repository's git URL"
    exit 2
fi
if [ "$start_pyworker" = 1 ]; then
    say "starting the PyWorker ($reason): bootstrap $bootstrap_url, repository $PYWORKER_REPO${PYWORKER_REF:+ at $PYWORKER_REF}"
else
    say "not starting the PyWorker ($reason): only the model server runs"
fi

"$here/start_server.sh" &
server=$!

pyworker=""
if [ "$start_pyworker" = 1 ]; then
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
        say "the model server exited (status $status); the PyWorker goes on to report it"
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
