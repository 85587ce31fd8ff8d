"""The model server's settings (service/config.py): declared once, read from the environment, refused
at start when bad, shown in README.md's table, and handed to the engine."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import httpx
import pytest

from service_helpers import REPO, TINY_BODY, ServiceProcess, assert_clean_log, free_port, model_server_env
from service import signals
from service.config import Settings, SettingsError


def test_readme_table_is_the_declared_settings():
    """README.md's "Model server" table is what scripts/settings_table.py prints from the declarations:
    after changing a setting, run `scripts/settings_table.py --update`."""
    printed = subprocess.run([sys.executable, "scripts/settings_table.py"], cwd=REPO, capture_output=True,
                             text=True, timeout=60, check=True).stdout
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("#### Model server ("):]
    table = section[section.index("\n|") + 1:section.index("\n\n", section.index("\n|")) + 1]
    assert table == printed
    envs = [row.split("`")[1] for row in printed.splitlines()[2:]]
    assert envs == [f.metadata["env"] for f in dataclasses.fields(Settings)]
    assert {"MODEL_GROUP_SIZE", "MODEL_DEVICE_MEMORY", "MODEL_POOLED_PEER_GRACE_S"} <= set(envs)


def test_settings_are_read_from_their_variables(monkeypatch):
    for f in dataclasses.fields(Settings):
        monkeypatch.delenv(f.metadata["env"], raising=False)
    assert Settings.from_env() == Settings()
    assert Settings().group_size is None and Settings().device_memory is None
    given = {"MODEL_GROUP_SIZE": "4", "MODEL_DEVICE_MEMORY": "24GiB", "MODEL_DEVICES": "2", "MODEL_DRAWS": "host",
             "MODEL_ACCESS_LOG": "true", "LOG_LEVEL": "debug", "MODEL_HTTP_TIMEOUT_S": " 2.5 ", "MODEL_BATCH": ""}
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    s = Settings.from_env()
    assert (s.group_size, s.device_memory, s.devices, s.draws) == (4, 24 * 2**30, 2, "host")
    assert (s.access_log, s.log_level, s.http_timeout_s, s.batch) == (True, "DEBUG", 2.5, None)
    only = Settings.from_env(only=("devices",))
    assert only.devices == 2 and only.group_size is None and only.draws == "auto"


@pytest.mark.parametrize("name, value", [
    ("MODEL_GROUP_SIZE", "3"), ("MODEL_GROUP_SIZE", "16"), ("MODEL_GROUP_SIZE", "two"),
    ("MODEL_DEVICE_MEMORY", "lots"), ("MODEL_DEVICE_MEMORY", "0GiB"), ("MODEL_DEVICE_MEMORY", "-1GiB"),
    ("MODEL_SERVER_PORT", "70000"), ("MODEL_SERVER_PORT", "0"), ("MODEL_DEVICES", "0"), ("MODEL_BATCH", "1.5"),
    ("MODEL_DRAWS", "gpu"), ("MODEL_HTTP_TIMEOUT_S", "nan"), ("MODEL_HTTP_TIMEOUT_S", "-1"),
    ("MODEL_RETRY_ATTEMPTS", "0"), ("MODEL_MAX_BODY_BYTES", "-5"),
])
def test_a_bad_value_is_refused_naming_its_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=f"^{name}="):
        Settings.from_env()
    assert Settings.from_env(only=("port",) if name != "MODEL_SERVER_PORT" else ("host",))  # others read fine


def test_a_bad_engine_setting_stops_the_server_at_start(tmp_path):
    log = tmp_path / "server.log"
    env = model_server_env(log, free_port(), tmp_path / "cache", {"MODEL_GROUP_SIZE": "3"})
    out = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    fatal = f"{signals.FATAL_MARKER} {signals.BAD_CONFIGURATION}: MODEL_GROUP_SIZE='3': must be one of 1, 2, 4, 8"
    assert fatal in log.read_text() and fatal in out.stdout


def test_the_pyworker_reads_only_its_settings():
    """The PyWorker's venv has no jaxbench: engine settings meant for the model server (a size that
    jaxbench parses, a group size) must not stop it, nor pull in JAX."""
    code = "import sys, pyworker.worker as w; print(w.MODEL_SETTINGS.port, 'jax' in sys.modules, 'jaxbench' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MODEL_SERVER_PORT": "18123", "MODEL_DEVICE_MEMORY": "24GiB",
           "MODEL_GROUP_SIZE": "3"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["18123", "False", "False"]


def test_engine_settings_reach_the_engine(tmp_path, compile_cache):
    """MODEL_GROUP_SIZE and MODEL_DEVICE_MEMORY go to the Engine: /health shows the groups, and a cap
    below the tiny set's need makes it a 400 on `params` that names the cap (without it the host has gigabytes)."""
    server = ServiceProcess(tmp_path, compile_cache, {"MODEL_GROUP_SIZE": "1", "MODEL_DEVICE_MEMORY": "256KiB"})
    server.start()
    try:
        h = server.health()
        assert h["group_size"] == 1 and h["groups"] == len(h["devices"])
        r = httpx.post(server.url + "/generate", json={**TINY_BODY, "max_nonces": 8}, timeout=30)
        assert r.status_code == 400 and r.json()["field"] == "params", r.text
        assert "256.00 KiB available" in r.json()["error"]
        assert "(256.00 KiB is the device memory cap; each device has " in r.json()["error"]
        assert "group(s) of 1" in server.log()
    finally:
        assert server.stop() == 0
    assert_clean_log(server.log())
