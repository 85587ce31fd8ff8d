import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The network's reference vectors, vendored (tests/data/README.md); JAXBENCH_VECTORS names another copy.
VECTORS = Path(os.environ.get("JAXBENCH_VECTORS") or Path(__file__).parent / "data" / "reference-vectors.json")
# 36.6 G parameters: within every parameter bound (its weight pool stays under 2**31 values) but 75 GiB in
# float16 and 150 GiB in float32, more than the CPU machines the tests run on (CI: 24 GiB).
UNFITTABLE_PARAMS = {"dim": 16384, "n_heads": 128, "n_kv_heads": 128, "n_layers": 5, "ffn_dim_multiplier": 2.9,
                     "vocab_size": 1000}


def load_cases() -> list[dict]:
    return json.loads(VECTORS.read_text())


# One compiled device drawer per dtype serves every test that compares device inputs with the host's
# (a drawer takes 10-20 s to compile on a CPU): DRAWN_NONCES streams of DRAWN_VALUES values each, of
# which a test keeps the prefix it needs (a stream's values do not depend on its length). 64 rows of
# 1024 draws and part of another: the plan's partial last row is exercised too.
DRAWN_NONCES = 8
DRAWN_VALUES = 64 * 1024 + 231


@functools.lru_cache(maxsize=None)
def _shared_drawer(dtype: str):
    import jax

    from jaxbench import device_draws

    return jax.jit(device_draws.make_input_drawer(1, DRAWN_VALUES, dtype, nonces_per_pass=None))


def device_inputs(block_hash: str, public_key: str, nonces: list[int], n_values: int, dtype: str):
    """The first n_values input values of each nonce, drawn on the device: (len(nonces), n_values)."""
    import numpy as np

    from jaxbench import device_draws

    assert n_values <= DRAWN_VALUES
    rows = []
    for start in range(0, len(nonces), DRAWN_NONCES):
        chunk = list(nonces[start : start + DRAWN_NONCES])
        padded = chunk + [chunk[0]] * (DRAWN_NONCES - len(chunk))
        drawn = _shared_drawer(dtype)(device_draws.initial_states(block_hash, public_key, padded))
        rows.append(np.asarray(drawn)[: len(chunk), 0, :n_values])
    return np.concatenate(rows)


_CLI_ENV: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory) -> Path:
    """One persistent XLA compile cache for the run's subprocesses (CLI, notebooks, servers): each
    program is compiled once. Not the user's ~/.cache: every run starts empty. (This process keeps
    JAX's default, no persistent cache: JAX takes its cache directory once per process, and
    test_engine checks that an engine sets it.)"""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's base is inside the run's
        base = base.parent
    path = base / "xla-cache"
    path.mkdir(exist_ok=True)
    _CLI_ENV["JAXBENCH_CACHE_DIR"] = str(path)
    return path


def cli_command(*args, env: dict | None = None) -> tuple[list, dict]:
    """The argv and environment of `python -m jaxbench ARGS` (the session's compile cache, this checkout)."""
    return [sys.executable, "-m", "jaxbench", *args], {**os.environ, "PYTHONPATH": str(ROOT), **_CLI_ENV, **(env or {})}


def run_cli(*args, input: str | None = None, timeout: float = 300, env: dict | None = None, cwd=ROOT):
    """`python -m jaxbench ARGS` in a subprocess; returns the CompletedProcess."""
    argv, full_env = cli_command(*args, env=env)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input, cwd=cwd, env=full_env)


@pytest.fixture(scope="session")
def engine():
    from jaxbench.engine import Engine

    e = Engine(devices=1, draws_mode="host", compile_cache_dir=None)
    yield e
    e.close()


@pytest.fixture(scope="session")
def device_draws_engine():
    from jaxbench.engine import Engine

    e = Engine(devices=1, draws_mode="device", compile_cache_dir=None)
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, compile_cache):
    """A live `python -m service` on 127.0.0.1 for a test module; it must stop cleanly, having
    logged its ready line once and no fatal marker."""
    from service_helpers import ServiceProcess, assert_clean_log

    proc = ServiceProcess(tmp_path_factory.mktemp(request.module.__name__), compile_cache).start()
    yield proc
    assert proc.stop() == 0
    assert_clean_log(proc.log())


@pytest.fixture
def client(server):
    """An HTTP client of the test module's `server` fixture."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
