"""What ships: the requirement sets, the image's two flavours (cuda12, cuda13) and their pins, the
Dockerfile and its build context, start_server.sh, and the PyWorker's needs in the environment
Vast.ai gives it."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from service_helpers import FakeHTTPServer, assert_clean_log, free_port, model_server_env

from service import signals
from service.signals import FATAL_CAUSES, FATAL_MARKER, READY_LINE

ROOT = Path(__file__).resolve().parents[1]


def requirements(path: Path) -> dict[str, Requirement]:
    """The requirements of a file, each on a line of its own (comments only on lines of their own:
    setuptools, which may read requirements.txt for the package, takes no inline ones)."""
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


FLAVOURS = ("cuda12", "cuda13")


def build_arg_default(name: str) -> str:
    (value,) = [args.split("=", 1)[1] for op, args in dockerfile() if op == "ARG" and args.startswith(f"{name}=")]
    return value


def image_requirements(tmp: Path, flavour: str) -> dict[str, Requirement]:
    """What the image of a flavour installs: the Dockerfile's own command that derives its requirement
    file from requirements.txt, run on a copy, then that file and the flavour's file read."""
    (install,) = [args.replace("${JAX_CUDA}", flavour) for op, args in dockerfile() if op == "RUN" and "pip install" in args]
    derive, pip_install = [part.strip() for part in install.split("&&")][:2]
    target = re.fullmatch(r".* requirements\.txt > (\S+)", derive).group(1)
    assert pip_install.split()[-6:] == ["-r", target, "-r", f"requirements-{flavour}.txt", "-c",
                                        f"constraints-{flavour}.txt"], pip_install
    (tmp / "requirements.txt").write_text((ROOT / "requirements.txt").read_text())
    subprocess.run(["bash", "-c", derive], cwd=tmp, check=True)
    return {**requirements(tmp / target), **requirements(ROOT / f"requirements-{flavour}.txt")}


RUNTIME = requirements(ROOT / "requirements.txt")
DEV = requirements(ROOT / "requirements-dev.txt")
GPU = {flavour: requirements(ROOT / f"requirements-{flavour}.txt") for flavour in FLAVOURS}
PINS = {flavour: requirements(ROOT / "docker" / f"constraints-{flavour}.txt") for flavour in FLAVOURS}
PYWORKER_ONLY = {"vastai", "setuptools", "matplotlib"}  # below the pyworker-only line (matplotlib: the client's)


def pinned_versions(flavour: str) -> dict[str, str]:
    versions = {}
    for name, pin in PINS[flavour].items():
        (spec,) = pin.specifier
        assert spec.operator == "==" and not pin.marker and not pin.extras, str(pin)
        versions[name] = spec.version
    return versions


def own_packages(flavour: str) -> set[str]:
    """The packages only that flavour's image has: JAX's CUDA plugin and NVIDIA's wheels."""
    return {name for name in PINS[flavour] if name.startswith(("jax-cuda", "nvidia-"))}


# Requirement sets and image pins ------------------------------------------------------------------


def test_dev_set_is_the_runtime_set_and_both_have_cpu_jax():
    """JAX's convention: plain `jax` is its CPU build, the GPU runtime an extra (requirements-cuda*.txt)."""
    for name, req in RUNTIME.items():
        assert name in DEV, f"{name} is in requirements.txt but not in requirements-dev.txt"
        assert DEV[name].specifier == req.specifier, name
    assert RUNTIME["jax"].extras == set() and DEV["jax"].extras == set()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_each_gpu_runtime_is_jax_with_that_extra_and_the_same_range(flavour):
    assert GPU[flavour]["jax"].extras == {flavour}
    assert GPU[flavour]["jax"].specifier == RUNTIME["jax"].specifier and not GPU[flavour]["jax"].marker
    # Beside jax, NVIDIA's NVML binding (bench's telemetry) and cuda13's floor of cuBLAS (below).
    assert set(GPU[flavour]) == {"jax", "nvidia-ml-py"} | ({"nvidia-cublas"} if flavour == "cuda13" else set())


def test_a_cuda13_install_cannot_get_a_cublas_that_corrupts_blackwell_results():
    """pip resolves the [cuda13] extra (and the cuda13 image) to a cuBLAS of 13.2 or newer, whatever
    jax-cuda13-plugin itself would accept."""
    floor = GPU["cuda13"]["nvidia-cublas"].specifier
    assert not floor.contains("13.1.9") and floor.contains("13.2.0")


def test_the_image_builds_the_cuda12_flavour_by_default():
    assert build_arg_default("JAX_CUDA") == "cuda12"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_image_installs_the_model_server_without_the_pyworker(tmp_path, flavour):
    image = image_requirements(tmp_path, flavour)
    assert set(image) == (set(RUNTIME) - PYWORKER_ONLY) | set(GPU[flavour])
    assert all(image[name] == (GPU[flavour] if name in GPU[flavour] else RUNTIME)[name] for name in image)
    assert not PYWORKER_ONLY & set(PINS[flavour]), "the image pins the PyWorker's packages"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_image_pins_are_exact_and_within_the_ranges(tmp_path, flavour):
    versions = pinned_versions(flavour)
    for name, req in image_requirements(tmp_path, flavour).items():
        assert name in versions, f"{name} has no pin in docker/constraints-{flavour}.txt"
        assert req.specifier.contains(versions[name], prereleases=True), f"{name}=={versions[name]} vs {req}"
    jax_family = {name: versions[name] for name in ("jax", "jaxlib", f"jax-{flavour}-plugin", f"jax-{flavour}-pjrt")}
    assert len(set(jax_family.values())) == 1, jax_family


def test_the_flavours_differ_only_in_the_cuda_runtime():
    cuda12, cuda13 = pinned_versions("cuda12"), pinned_versions("cuda13")
    shared = set(cuda12) - own_packages("cuda12")
    assert shared == set(cuda13) - own_packages("cuda13")
    assert {name: cuda12[name] for name in shared} == {name: cuda13[name] for name in shared}
    assert not [name for name in cuda13 if name.endswith("-cu12") or "cuda12" in name]
    assert not [name for name in cuda12 if name.endswith("-cu13") or "cuda13" in name]


def test_the_cuda13_flavour_has_a_cublas_that_blackwell_cards_can_trust():
    """JAX warns that cuBLAS 12.8 to 13.1 frees tensor memory twice in many kernels, which can corrupt
    data silently on compute capability 10.x-11.x cards (jax_plugins/cuda/__init__.py); 13.2 fixes it."""
    cublas = Version(pinned_versions("cuda13")["nvidia-cublas"])
    assert cublas >= Version("13.2"), cublas
    assert Version(pinned_versions("cuda12")["nvidia-cublas-cu12"]) < Version("13.2")  # why cuda13 exists


def test_requirements_install_in_the_pyworker_venv():
    """Vast.ai's bootstrap installs requirements.txt into a Python 3.10 venv for the PyWorker, and
    jax >= 0.11 and flax 0.12 have no release for it: they must be marked for Python >= 3.12."""
    python_3_10 = {**default_environment(), "python_version": "3.10", "python_full_version": "3.10.13"}
    applying = {name for name, r in RUNTIME.items() if r.marker is None or r.marker.evaluate(python_3_10)}
    assert "vastai" in applying
    assert not applying & {"jax", "flax"}, sorted(applying & {"jax", "flax"})


def test_pyworker_needs_only_its_own_packages():
    """The PyWorker imports the model server's settings and log signals, but not JAX or Quart."""
    heavy = ("jax", "jaxlib", "jaxbench", "numpy", "quart", "hypercorn", "flax")
    code = f"import sys, pyworker.worker; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for path in ["worker.py", *sorted(ROOT.glob("pyworker/*.py")), "service/__init__.py", "service/config.py",
                 "service/signals.py"]:
        ast.parse((ROOT / path).read_text(), str(path), feature_version=(3, 10))


# Dockerfile and build context ---------------------------------------------------------------------


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negated
    return ignored


def test_image_copies_the_code_and_the_pinned_requirements():
    steps = dockerfile()
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.13")
    copied = [src for op, args in steps if op == "COPY" for src in args.split()[:-1]]
    assert {"jaxbench/", "service/", "start_server.sh", "entrypoint.sh", "requirements.txt",
            "requirements-${JAX_CUDA}.txt", "docker/constraints-${JAX_CUDA}.txt"} <= set(copied)
    sources = sorted({src.replace("${JAX_CUDA}", flavour) for src in copied for flavour in FLAVOURS})
    for src in sources:
        files = [src] if (ROOT / src).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*.py") if "__pycache__" not in p.parts
        ]
        assert files, src
        for f in files:
            assert not dockerignored(f), f"{f} is copied but .dockerignore leaves it out"
    for local in (".venv/bin/python", ".git/HEAD", "tests/test_packaging.py", "notebooks/profiling.ipynb",
                  "jaxbench/__pycache__/engine.cpython-313.pyc"):
        assert dockerignored(local), local
    assert steps[-1] == ("CMD", '["/app/entrypoint.sh"]')
    assert not any(op == "ENTRYPOINT" for op, _ in steps)  # arguments replace the command (`docker run … bash`)


def image_environment() -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(args for op, args in dockerfile() if op == "ENV")))


def test_image_keeps_the_unauthenticated_model_server_off_the_network():
    """Vast publishes every EXPOSEd port: the model server (no signature check, no queue) must listen on
    loopback only, behind the PyWorker, and its port must not be exposed."""
    env = image_environment()
    assert env["MODEL_SERVER_HOST"] == "127.0.0.1"
    exposed = [port for op, args in dockerfile() if op == "EXPOSE" for port in args.split()]
    assert not [p for p in exposed if p.split("/")[0] == env["MODEL_SERVER_PORT"]], exposed


def test_image_exposes_the_pyworkers_port_only():
    """The PyWorker listens on Vast's bootstrap's default WORKER_PORT, 3000; the SDK reads its public
    port from VAST_TCP_PORT_3000, which Vast sets only for a published port. README's template
    publishes the same port (`-p 3000:3000`), as a cross-check."""
    exposed = [port for op, args in dockerfile() if op == "EXPOSE" for port in args.split()]
    assert exposed == ["3000"]
    assert "`-p 3000:3000`" in (ROOT / "README.md").read_text()


def test_image_environment_matches_the_model_server_defaults():
    from service.config import Settings

    env = image_environment()
    assert env["MODEL_LOG"] == Settings().log_path
    assert int(env["MODEL_SERVER_PORT"]) == Settings().port
    assert env["MODEL_SERVER_PYTHON"] == "/usr/local/bin/python3"  # the python:3.13 image's, where pip installed
    assert {"JAXBENCH_CACHE_DIR", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION"} <= set(env)


@pytest.mark.parametrize("status", [200, 503, None])
def test_healthcheck_probes_the_model_server_with_python(status):
    (healthcheck,) = [args for op, args in dockerfile() if op == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:])
    assert command[0] == "python3"

    def probe(port: int) -> int:
        env = {**os.environ, "MODEL_SERVER_PORT": str(port)}
        return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode

    if status is None:  # nothing listening
        returncode = probe(free_port())
    else:
        with FakeHTTPServer(lambda method, path, query, body: (status if path == "/health" else 404, {})) as server:
            returncode = probe(int(server.url.rsplit(":", 1)[1]))
    assert (returncode == 0) == (status == 200)


# start_server.sh ----------------------------------------------------------------------------------


def start_script(log: Path, port: int, compile_cache: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(ROOT / "start_server.sh")], env=model_server_env(log, port, compile_cache, env),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finished(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def fatal_cause(line: str) -> str | None:
    """The listed cause a log line starts with (after its timestamp), if any."""
    text = line.split(" ", 1)[1] if " " in line else line
    return next((cause for cause in FATAL_CAUSES if text.startswith(cause)), None)


def test_start_script_logs_only_this_runs_lines_and_stops_on_sigterm(tmp_path, compile_cache):
    log = tmp_path / "model" / "server.log"
    log.parent.mkdir()
    log.write_text(f"a line of the last run: {READY_LINE}\n")
    last_run = log.stat().st_ino
    port = free_port()
    proc = start_script(log, port, compile_cache)
    try:
        deadline = time.monotonic() + 120
        while READY_LINE not in log.read_text() or "the last run" in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert log.read_text().count(READY_LINE) == 1
        # The last run's log was moved aside, not emptied in place: the PyWorker sees a new inode.
        old = tmp_path / "model" / "server.log.old"
        assert "the last run" in old.read_text()
        assert old.stat().st_ino == last_run != log.stat().st_ino

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert_clean_log(log.read_text())
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        finished(proc, 0)


def test_start_script_logs_the_fatal_marker_when_the_server_exits(tmp_path, compile_cache):
    log = tmp_path / "server.log"
    status = finished(start_script(log, 0, compile_cache), 120)  # port 0: a configuration the server refuses
    assert status != 0
    last = log.read_text().splitlines()[-1]
    assert fatal_cause(last) == f"{FATAL_MARKER} {signals.SERVER_EXITED}"
    assert last.endswith(f": status {status}")


def test_start_script_reports_a_python_without_jax_as_such(tmp_path, compile_cache):
    no_jax = tmp_path / "python-without-jax"  # this Python with its site-packages (jax among them) hidden
    no_jax.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    no_jax.chmod(0o755)
    for python, says in ((str(no_jax), f"jax is not installed: no jax module for {no_jax} ({no_jax})"),
                         ("python3.0-nowhere", "jax is not installed: there is no python3.0-nowhere")):
        log = tmp_path / "server.log"
        assert finished(start_script(log, free_port(), compile_cache, {"MODEL_SERVER_PYTHON": python}), 30) == 1
        (line,) = log.read_text().splitlines()  # the server was never started
        assert fatal_cause(line) == f"{FATAL_MARKER} {signals.JAX_NOT_INSTALLED}"
        assert line.endswith(f"{FATAL_MARKER} {says}")


def test_every_fatal_line_starts_with_a_listed_cause():
    """The PyWorker reports the pattern that matched; each fatal line must match a specific one."""
    calls = [path.read_text().count("log_fatal(") for path in sorted((ROOT / "service").glob("*.py"))]
    names = [name for path in sorted((ROOT / "service").glob("*.py"))
             for name in re.findall(r'log_fatal\(\s*signals\.([A-Z_]+),', path.read_text())]
    assert len(names) >= 5 and len(names) == sum(calls) - 1, names  # every call but the definition names a cause
    names += re.findall(r'^\s*fatal ([A-Z_]+) "', (ROOT / "start_server.sh").read_text(), flags=re.M)
    assert {"JAX_NOT_INSTALLED", "SERVER_EXITED"} <= set(names)
    for name in names:
        cause = getattr(signals, name, None)
        assert isinstance(cause, str) and f"{FATAL_MARKER} {cause}" in FATAL_CAUSES, name
