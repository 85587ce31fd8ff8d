"""`bench` with device draws, in this process: its step is the one test_vectors' first case runs
with device draws (the same shapes, dtype and batch, on the same session engine), so it is compiled
once. test_cli.py runs the command itself."""

from jaxbench.bench import run_bench
from jaxbench.params import PRESETS


def test_device_draw_figures(device_draws_engine, capsys):
    report = run_bench(device_draws_engine, PRESETS["tiny"], "bfloat16", "bench-hash", "bench-key", 1.0, batch=8)
    assert report["draws"] == "device" and report["batch_per_device"] == 8
    for key in ("end_to_end_nonces_per_s", "device_only_nonces_per_s", "draw_nonces_per_s",
                "device_draw_nonces_per_s_alone", "weight_build_seconds", "mean_draw_seconds_per_step",
                "mean_step_seconds", "mean_host_wait_seconds_per_step"):
        assert report[key] > 0, key
    assert report["compile_seconds"] >= 0 and report["nonces_computed"] >= 8
    assert "device_draw_nonces_per_s_alone" in capsys.readouterr().err  # the table
