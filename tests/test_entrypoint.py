"""entrypoint.sh, the image's command, in Vast.ai's two launch modes: as the container's command
(entrypoint mode) and started in the background by an on-start script (SSH/Jupyter modes). Vast's
PyWorker bootstrap is replaced by a local stand-in (PYWORKER_BOOTSTRAP_URL=file://…) that does what
the real one does last: put the repository's PyWorker in place and start it in the background. The
model server and the PyWorker are the real ones, reporting to a fake autoscaler.

Whether the PyWorker starts (JAXBENCH_PYWORKER's spellings, PYWORKER_REPO alone) is checked first,
quickly, with a model server that cannot start and a bootstrap that only leaves a mark."""

from __future__ import annotations

import os
import re
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

    def __init__(self, tmp: Path, vast: FakeVast, compile_cache: Path, pyworker_switch: str | None = "1"):
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
            **({"JAXBENCH_PYWORKER": pyworker_switch} if pyworker_switch is not None else {}),
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
def container(request, tmp_path, vast, compile_cache):
    box = Container(tmp_path, vast, compile_cache, getattr(request, "param", "1"))
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


@pytest.mark.parametrize("container", [None], indirect=True, ids=["PYWORKER_REPO-alone"])
def test_on_start_mode_keeps_the_pyworker_to_report_a_dead_model_server(container):
    """Vast's SSH/Jupyter modes: Vast's init runs the template's on-start script, which starts the
    script in the background and returns at once. The template sets PYWORKER_REPO and not
    JAXBENCH_PYWORKER, as the predecessor's did."""
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


def test_switched_off_only_the_model_server_runs(tmp_path, vast, compile_cache):
    """JAXBENCH_PYWORKER=0 keeps the PyWorker off although PYWORKER_REPO is set."""
    box = Container(tmp_path, vast, compile_cache, pyworker_switch="0")
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


# Whether the PyWorker starts ---------------------------------------------------------------------

MARKING_BOOTSTRAP = """#!/bin/bash
# Stands in for Vast's bootstrap where only its start matters: it leaves a mark and ends.
touch "$BOOTSTRAP_MARK"
"""


def run_entrypoint(tmp: Path, switch: str | None, repo: str | None) -> tuple[subprocess.CompletedProcess, bool]:
    """entrypoint.sh with a model server that cannot start (no such Python: start_server.sh logs its
    fatal line and exits 1) and the marking bootstrap: its output, and whether the bootstrap ran."""
    bootstrap, mark = tmp / "bootstrap.sh", tmp / "bootstrap-ran"
    bootstrap.write_text(MARKING_BOOTSTRAP)
    env = {
        "PATH": os.environ["PATH"],
        "MODEL_LOG": str(tmp / "model" / "server.log"),
        "MODEL_SERVER_PYTHON": "python3.0-nowhere",
        "PYWORKER_BOOTSTRAP_URL": f"file://{bootstrap}",
        "BOOTSTRAP_MARK": str(mark),
        **({"JAXBENCH_PYWORKER": switch} if switch is not None else {}),
        **({"PYWORKER_REPO": repo} if repo is not None else {}),
    }
    out = subprocess.run([str(ROOT / "entrypoint.sh")], env=env, capture_output=True, text=True, timeout=30,
                         start_new_session=True)
    return out, mark.exists()


REPO_URL = "https://github.com/example/jaxbench"


@pytest.mark.parametrize("switch", ["1", "true", "TRUE", "Yes", "on", "ON"])
def test_truthy_spellings_start_the_pyworker(tmp_path, switch):
    out, bootstrapped = run_entrypoint(tmp_path, switch, REPO_URL)
    assert bootstrapped, out.stderr
    assert f"entrypoint: starting the PyWorker (JAXBENCH_PYWORKER={switch}): bootstrap file://" in out.stderr
    assert f"repository {REPO_URL}" in out.stderr
    assert out.returncode == 1  # the model server's status, once the PyWorker has ended too


@pytest.mark.parametrize("switch", ["0", "false", "False", "no", "OFF"])
def test_falsy_spellings_keep_the_pyworker_off_even_with_a_repository(tmp_path, switch):
    out, bootstrapped = run_entrypoint(tmp_path, switch, REPO_URL)
    assert not bootstrapped
    assert f"entrypoint: not starting the PyWorker (JAXBENCH_PYWORKER={switch}): only the model server runs" in out.stderr
    assert out.returncode == 1


@pytest.mark.parametrize("switch", [None, ""], ids=["unset", "empty"])
def test_a_repository_alone_starts_the_pyworker(tmp_path, switch):
    """The predecessor's templates set only PYWORKER_REPO."""
    out, bootstrapped = run_entrypoint(tmp_path, switch, REPO_URL)
    assert bootstrapped, out.stderr
    assert ("entrypoint: starting the PyWorker (PYWORKER_REPO is set and JAXBENCH_PYWORKER is not "
            "(JAXBENCH_PYWORKER=0 turns it off))") in out.stderr


def test_neither_setting_runs_the_model_server_alone(tmp_path):
    out, bootstrapped = run_entrypoint(tmp_path, None, None)
    assert not bootstrapped
    assert ("entrypoint: not starting the PyWorker (neither JAXBENCH_PYWORKER nor PYWORKER_REPO is set): "
            "only the model server runs") in out.stderr
    assert out.returncode == 1


@pytest.mark.parametrize(("switch", "repo", "says"), [
    ("maybe", REPO_URL, "entrypoint: JAXBENCH_PYWORKER=maybe is neither 1/true/yes/on nor 0/false/no/off"),
    ("1", None, "entrypoint: JAXBENCH_PYWORKER=1 asks for the PyWorker, but PYWORKER_REPO is unset"),
    ("true", "", "entrypoint: JAXBENCH_PYWORKER=true asks for the PyWorker, but PYWORKER_REPO is unset"),
])
def test_a_setting_it_cannot_follow_stops_it_before_anything_starts(tmp_path, switch, repo, says):
    out, bootstrapped = run_entrypoint(tmp_path, switch, repo)
    assert out.returncode == 2 and not bootstrapped
    (line,) = out.stderr.splitlines()
    assert line.startswith(says), line
    assert not (tmp_path / "model").exists()  # the model server was not started either


def test_the_bootstrap_is_pinned_to_a_commit_that_readme_names():
    default = re.search(r'bootstrap_url="\$\{PYWORKER_BOOTSTRAP_URL:-(\S+)\}"', (ROOT / "entrypoint.sh").read_text())
    url = default.group(1)
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/vast-ai/pyworker/[0-9a-f]{40}/start_server\.sh", url), url
    assert url in (ROOT / "README.md").read_text()
    assert "vast-ai/pyworker/main/" not in (ROOT / "README.md").read_text()
