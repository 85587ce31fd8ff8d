"""`python -m jaxbench remote bench` (jaxbench/remote/fleet.py): rows and files from made-up answers, then
real client (the vastai SDK) against two real workers (model server and PyWorker, CPU, `tiny`)
behind the fake Vast, which prices one of their two instances."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from service_helpers import host_devices_env
from vast_helpers import ACCOUNT_API_KEY, ENDPOINT_NAME, ROOT, FakeVast, running_workers

from jaxbench import telemetry
from jaxbench.remote import fleet

DEVICES = 2
BATCH = 16
START_TIMEOUT_S = 180
PRICED = {1: {"dph_total": 2.5, "dph_base": 2.2, "gpu_name": "H200", "num_gpus": 2}}  # instance 2 has no record


def answer(url: str, **body) -> dict:
    """The SDK's answer to a /benchmark request that succeeded."""
    response = {"status": "done", "reason": "duration", "total_computed": 3000, "workload": 3000,
                "device_kind": "NVIDIA H200", "devices": 1, "window_nonces": 2800, "window_seconds": 9.5,
                "window_nonces_per_s": 294.7, "tflops_per_device": 533.8, "sustained_tflops": 650.1,
                "percent_of_sustained": 82.1, **dict.fromkeys(telemetry.FIELDS), "vast_instance_id": 11, **body}
    return {"ok": True, "status": 200, "url": url, "response": response}


def test_rows_from_answers():
    capped = answer("http://a", gpu_name="NVIDIA H200", energy_joules_per_nonce=2.371, mean_power_w=698.6,
                    power_limit_w=700.0, mean_sm_clock_mhz=1402.3,
                    clock_limited_share={**dict.fromkeys(telemetry.CLOCK_EVENT_REASONS, 0.0), "sw_power_cap": 0.97,
                                         "none": 0.03})
    r = fleet.row(capped, 3.6)
    assert tuple(r) == fleet.ROW_FIELDS
    assert r["gpu"] == "NVIDIA H200" and r["gpu_count"] == 1 and r["vast_instance_id"] == 11
    assert r["nonces_per_s"] == 294.7 and r["tflops_per_gpu"] == 533.8 and r["percent_of_sustained"] == 82.1
    assert r["joules_per_nonce"] == 2.371 and r["power_cap_share"] == 0.97 and r["mean_sm_clock_mhz"] == 1402.3
    assert r["dollars_per_hour"] == 3.6 and r["nonces_per_dollar"] == round(294.7 * 3600 / 3.6)
    assert r["error"] is None

    unpriced = fleet.row(answer("http://b", device_kind="cpu", devices=2), None)
    assert unpriced["gpu"] == "cpu" and unpriced["nonces_per_dollar"] is None and unpriced["power_cap_share"] is None

    refused = fleet.row({"ok": False, "status": 400, "url": "http://c",
                         "response": {"error": "params: unknown preset", "field": "params"}}, None)
    assert refused["error"] == "HTTP 400: params: unknown preset" and refused["nonces_per_s"] is None
    unrouted = fleet.row({"ok": False, "status": None, "response": "RuntimeError: Failed to route endpoint"}, None)
    assert unrouted["worker"] is None and unrouted["error"].endswith("Failed to route endpoint")
    one_step = fleet.row(answer("http://d", window_nonces_per_s=None), 1.0)
    assert one_step["error"] == "no timed window (the search ran one step)" and one_step["nonces_per_dollar"] is None
    stopped = fleet.row(answer("http://e", reason="shutdown"), 1.0)
    assert stopped["error"] == "the search ended: shutdown"


def test_files_hold_a_row_per_worker(tmp_path):
    from PIL import Image

    rows = [fleet.row(answer("http://a", gpu_name="NVIDIA H200"), 3.6),
            fleet.row(answer("http://b", gpu_name="NVIDIA H100 80GB HBM3", window_nonces_per_s=280.0), None),
            fleet.row({"ok": False, "status": 503, "url": "http://c", "response": {"error": "device broken"}}, None)]
    fleet.write_csv(tmp_path / "fleet.csv", rows)
    with (tmp_path / "fleet.csv").open() as f:
        read = list(csv.DictReader(f))
    assert [tuple(r) for r in read] == [fleet.ROW_FIELDS] * 3
    assert [r["worker"] for r in read] == ["http://a", "http://b", "http://c"]
    assert read[0]["nonces_per_dollar"] == str(rows[0]["nonces_per_dollar"]) and read[1]["dollars_per_hour"] == ""

    table = fleet.markdown(rows).splitlines()
    assert len(table) == 2 + 3 and table[0].startswith("| # | GPU | GPUs | nonces/s |")
    assert "| 294.70 |" in table[2] and "| 3.600 |" in table[2]
    assert "failed: HTTP 503: device broken" in table[4]

    fleet.write_chart(tmp_path / "fleet.png", rows, "test fleet")
    with Image.open(tmp_path / "fleet.png") as image:
        assert image.format == "PNG" and image.size[0] > 800 and image.size[1] > 200
        image.load()  # the whole image decodes


# End to end -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, compile_cache):
    """Two workers of two (CPU) devices each, loaded, behind a fake Vast that knows the price of
    instance 1 only."""
    vast = FakeVast(instances=PRICED)
    env = {"MODEL_BATCH": str(BATCH), "MODEL_BENCHMARK_NONCES": "64", "JAXBENCH_BENCHMARK_STEPS": "2",
           **host_devices_env(DEVICES)}
    with running_workers(vast, 2, tmp_path_factory, compile_cache, env, START_TIMEOUT_S, name="fleet") as stacks:
        yield vast, stacks


def remote_bench(vast: FakeVast, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    import certifi

    return subprocess.run(
        [sys.executable, "-m", "jaxbench", "remote", "bench", "--endpoint", ENDPOINT_NAME, "--params", "tiny",
         "--autoscaler-url", vast.url, "--webserver-url", vast.url, "--vast-ca-file", certifi.where(), *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), "VAST_API_KEY": ACCOUNT_API_KEY},
        capture_output=True, text=True, timeout=timeout)


def test_a_row_per_worker_in_every_file(endpoint, tmp_path):
    from PIL import Image

    vast, stacks = endpoint
    out = remote_bench(vast, "--workers", "2", "--seconds", "3", "--sustained-seconds", "1",
                       "--out-dir", str(tmp_path / "fleet"))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    rows = report["rows"]
    assert [tuple(r) for r in rows] == [fleet.ROW_FIELDS] * 2
    assert {r["worker"] for r in rows} == {s.worker_url for s in stacks}  # one request reached each worker
    by_instance = {r["vast_instance_id"]: r for r in rows}
    assert set(by_instance) == {1, 2}
    for r in rows:
        assert r["error"] is None and r["gpu"] == "cpu" and r["gpu_count"] == DEVICES
        assert r["nonces_per_s"] > 0 and r["tflops_per_gpu"] >= 0
        # No GPU: the telemetry and the ceiling are null (each answer says why).
        assert r["joules_per_nonce"] is r["power_cap_share"] is r["sustained_tflops"] is None
    for a in report["answers"]:
        assert a["response"]["telemetry_unavailable"] == "no NVIDIA GPU (the devices are cpu)"
        assert a["response"]["sustained_unavailable"] == "measured on GPUs only (the devices are cpu)"
        assert a["response"]["reason"] == "duration"
    priced, unpriced = by_instance[1], by_instance[2]
    assert priced["dollars_per_hour"] == 2.5
    assert priced["nonces_per_dollar"] == round(priced["nonces_per_s"] * 3600 / 2.5)
    assert unpriced["dollars_per_hour"] is None and unpriced["nonces_per_dollar"] is None

    files = tmp_path / "fleet"
    assert json.loads((files / "fleet.json").read_text()) == report
    with (files / "fleet.csv").open() as f:
        read = list(csv.DictReader(f))
    assert len(read) == 2 and {r["worker"] for r in read} == {s.worker_url for s in stacks}
    assert (files / "fleet.md").read_text().count("\n| ") == 1 + 2  # the header's separator and two rows
    with Image.open(files / "fleet.png") as image:
        assert image.format == "PNG"
        image.load()
    assert "2 of 2 worker(s) measured (2 distinct)" in out.stderr
    assert fleet.markdown(rows) in out.stderr


def test_bad_input_is_one_line_and_status_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VAST_API_KEY": "x"}
    for args, field in ((["--workers", "0"], "--workers"),
                        (["--seconds", "0"], "--seconds"),
                        (["--sustained-seconds", "60"], "--sustained-seconds"),
                        (["--params", "huge"], "--params"),
                        (["--dtype", "int8"], "--dtype"),
                        (["--out-dir", "/dev/null/x"], "--out-dir"),
                        (["--vast-ca-file", "/nonexistent.pem"], "--vast-ca-file")):
        out = subprocess.run([sys.executable, "-m", "jaxbench", "remote", "bench", "--endpoint", "e", *args],
                             env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.startswith(f"error: {field}:"), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == ""
