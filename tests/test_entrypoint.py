"""entrypoint.sh, the image's command, in Vast.ai's two launch modes: as the container's command
(entrypoint mode) and started in the background by an on-start script (SSH/Jupyter modes). Vast's
PyWorker bootstrap is replaced by a local stand-in (PYWORKER_BOOTSTRAP_URL=file://…) that does what
the real one does last: put the repository's PyWorker in place and start it in the background. The
model server and the PyWorker are the real ones, reporting to a fake autoscaler."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from service_helpers import assert_clean_log, free_port, model_server_env, wait_until
from vast_helpers import ROOT, FakeVast, kill_after_a_health_check, listening, model_server_pid, pyworker_env

from service.signals import FATAL_MARKER, READY_LINE, SERVER_EXITED

START_TIMEOUT_S = 120

STAND_IN_BOOTSTRAP = """#!/bin/bash
# Stands in for Vast's PyWorker bootstrap: the clone of PYWORKER_REPO, then its worker started in the
# background, as the real script leaves it.
set -euo pipefail
env > "$WORKSPACE_DIR/bootstrap.env"
clone="$WORKSPACE_DIR/vast-pyworker"
mkdir -p "$clone"
cp -r "$PYWORKER_REPO/worker.py" "$PYWORKER_REPO/pyworker" "$PYWORKER_REPO/service" "$clone/"
cd "$clone"
python3 -m worker > "$WORKSPACE_DIR/pyworker.out" 2>&1 &
echo $! > "$WORKSPACE_DIR/pyworker.pid"
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


class Container:
    """What Vast gives a worker container: the template's environment (JAXBENCH_PYWORKER, the
    bootstrap's variables) and the PyWorker's, with the bootstrap replaced by the stand-in."""

    def __init__(self, tmp: Path, vast: FakeVast, compile_cache: Path, start_pyworker: bool = True):
        self.tmp = tmp
        self.vast = vast
        self.workspace = tmp / "workspace"
        self.workspace.mkdir()
        bootstrap = tmp / "bootstrap.sh"
        bootstrap.write_text(STAND_IN_BOOTSTRAP)
        self.model_port, self.worker_port = free_port(), free_port()
        self.worker_url = f"http://127.0.0.1:{self.worker_port}"
        self.log = tmp / "model" / "server.log"
        self.env = model_server_env(self.log, self.model_port, compile_cache, {
            "MODEL_BATCH": "8",
            "MODEL_ACCESS_LOG": "1",
            "MODEL_BENCHMARK_NONCES": "16",
            "JAXBENCH_BENCHMARK_STEPS": "2",
            "PYWORKER_BOOTSTRAP_URL": f"file://{bootstrap}",
            "PYWORKER_REPO": str(ROOT),
            "WORKSPACE_DIR": str(self.workspace),
            **({"JAXBENCH_PYWORKER": "1"} if start_pyworker else {}),
            **pyworker_env(vast, self.worker_port, container_id=11),
        })
        self.pids: list[int] = []  # for the cleanup: the script's session and the PyWorker's

    def pyworker_pid(self) -> int:
        pid = int((self.workspace / "pyworker.pid").read_text())
        self.pids.append(pid)
        return pid

    def outputs(self) -> str:
        files = [self.tmp / "entrypoint.out", self.workspace / "pyworker.out", self.log]
        return "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-3000:]}" for f in files if f.exists())

    def cleanup(self):
        for pid in self.pids:
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def vast():
    fake = FakeVast()
    yield fake
    fake.close()


@pytest.fixture
def container(tmp_path, vast, compile_cache):
    box = Container(tmp_path, vast, compile_cache)
    try:
        yield box
    except BaseException:
        print(box.outputs())
        raise
    finally:
        box.cleanup()


def test_entrypoint_mode_runs_both_and_stops_both(container):
    """Vast's entrypoint (args) mode: the script is the container's command and nothing else runs."""
    with (container.tmp / "entrypoint.out").open("wb") as out:
        script = subprocess.Popen([str(ROOT / "entrypoint.sh")], env=container.env, start_new_session=True,
                                  stdout=out, stderr=subprocess.STDOUT)
    container.pids.append(script.pid)
    status = container.vast.wait_loaded(container.worker_url, START_TIMEOUT_S)
    assert status["error_msg"] == "" and status["max_perf"] > 0
    bootstrap_env = (container.workspace / "bootstrap.env").read_text().splitlines()
    assert "ROTATE_MODEL_LOG=false" in bootstrap_env and f"PYWORKER_REPO={ROOT}" in bootstrap_env
    pyworker = container.pyworker_pid()
    assert os.getpgid(pyworker) != os.getpgid(script.pid)  # the bootstrap's own session

    script.send_signal(signal.SIGTERM)  # `docker stop`
    assert script.wait(30) == 0
    wait_until(lambda: not alive(pyworker), 15, what="the PyWorker to stop")
    assert not listening(container.model_port) and not listening(container.worker_port)
    assert_clean_log(container.log.read_text())


def test_on_start_mode_keeps_the_pyworker_to_report_a_dead_model_server(container):
    """Vast's SSH/Jupyter modes: Vast's init runs the template's on-start script, which starts the
    script in the background and returns at once."""
    on_start = f"{ROOT}/entrypoint.sh > {container.tmp}/entrypoint.out 2>&1 &\necho $!"
    t0 = time.monotonic()
    shell = subprocess.run(["bash", "-c", on_start], env=container.env, start_new_session=True,
                           capture_output=True, text=True, timeout=20)
    assert shell.returncode == 0 and time.monotonic() - t0 < 5
    script = int(shell.stdout.strip())
    container.pids.append(script)
    container.vast.wait_loaded(container.worker_url, START_TIMEOUT_S)
    pyworker = container.pyworker_pid()

    kill_after_a_health_check(container.log, model_server_pid(container.log))
    assert container.vast.reports_cause(container.worker_url, f"{FATAL_MARKER} {SERVER_EXITED}")
    assert alive(script) and alive(pyworker)

    os.kill(script, signal.SIGTERM)
    wait_until(lambda: not alive(script) and not alive(pyworker), 30, what="the script and the PyWorker to end")
    assert not listening(container.worker_port)


def test_without_the_switch_only_the_model_server_runs(tmp_path, vast, compile_cache):
    box = Container(tmp_path, vast, compile_cache, start_pyworker=False)
    with (tmp_path / "entrypoint.out").open("wb") as out:
        script = subprocess.Popen([str(ROOT / "entrypoint.sh")], env=box.env, start_new_session=True,
                                  stdout=out, stderr=subprocess.STDOUT)
    box.pids.append(script.pid)
    try:
        wait_until(lambda: READY_LINE in (box.log.read_text() if box.log.exists() else ""), START_TIMEOUT_S,
                   interval=0.2, what="the model server's ready line")
        assert not (box.workspace / "bootstrap.env").exists()
        script.send_signal(signal.SIGTERM)
        assert script.wait(30) == 0
        assert not listening(box.model_port)
    finally:
        box.cleanup()
