"""The log lines the Vast.ai PyWorker watches for (substring matches on the model server's log).

Kept in one dependency-free module: the service prints them, pyworker/worker.py imports them, and
start_server.sh reads FATAL_MARKER from this file.
"""

# Logged exactly once, when the server can take work.
READY_LINE = "jaxbench model server ready: accepting requests"

# Starts every log line about a condition that needs the worker replaced; no other line contains it.
FATAL_MARKER = "JAXBENCH-FATAL:"

# The beginnings of the fatal lines, one per cause. The PyWorker matches these before the bare marker:
# the vastai SDK reports the pattern that matched, not the line, so the worker's error names its cause.
FATAL_CAUSES = tuple(
    f"{FATAL_MARKER} {cause}"
    for cause in (
        "device failure",  # a job hit a broken device (service/jobs.py)
        "no usable device",  # the engine could not start (service/server.py)
        "jax is not installed",  # start_server.sh, before starting the server
        "model server exited unexpectedly",  # start_server.sh, after the server died
        "bad configuration",
        "cannot write the log file",
        "the server could not start",
        "the server did not accept connections",
        "the server failed",
    )
)
