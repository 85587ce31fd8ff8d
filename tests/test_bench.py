"""`bench` with device draws, in this process: its step is the one test_vectors' first case runs
with device draws (the same shapes, dtype and batch, on the same session engine), so it is compiled
once. test_cli.py runs the command itself."""

import pytest

from jaxbench import telemetry
from jaxbench.bench import run_bench, summary_lines
from jaxbench.params import PRESETS


def test_device_draw_figures(device_draws_engine, capsys):
    report = run_bench(device_draws_engine, PRESETS["tiny"], "bfloat16", "bench-hash", "bench-key", 1.0, batch=8)
    assert report["draws"] == "device" and report["batch_per_device"] == 8
    for key in ("end_to_end_nonces_per_s", "device_only_nonces_per_s", "draw_nonces_per_s",
                "device_draw_nonces_per_s_alone", "weight_build_seconds", "mean_draw_seconds_per_step",
                "mean_step_seconds"):
        assert report[key] > 0, key
    # Draws run ahead of the steps, so the devices may never wait for them: zero is a true figure.
    assert 0 <= report["mean_host_wait_seconds_per_step"] <= report["end_to_end_seconds"]
    assert report["compile_seconds"] >= 0 and report["nonces_computed"] >= 8
    lines = summary_lines(report)
    assert capsys.readouterr().err.splitlines()[-len(lines):] == lines  # the summary ends stderr
    summary = lines
    assert f"(device draws alone {report['device_draw_nonces_per_s_alone']:,.1f})" in summary[-3]


def test_on_the_cpu_the_batch_is_the_default_and_telemetry_says_why_it_is_missing(device_draws_engine):
    report = run_bench(device_draws_engine, PRESETS["tiny"], "bfloat16", "bench-hash", "bench-key", 0.5)
    assert report["batch_choice"] == {"source": "default", "seconds": report["batch_choice"]["seconds"],
                                      "block_nonces_per_s": None}  # no sweep ran (the CPU)
    assert report["batch_per_device"] == 8
    for name in telemetry.FIELDS:
        assert report[name] is None or name == "telemetry_unavailable", name
    assert report["telemetry_unavailable"] == "no NVIDIA GPU (the devices are cpu)"
    assert report["sustained_tflops"] is None and report["percent_of_sustained"] is None
    assert report["sustained_unavailable"] == "measured on GPUs only (the devices are cpu)"
    start, end = report["telemetry_window_unix"]
    assert end - start == pytest.approx(report["end_to_end_seconds"], abs=0.05)
