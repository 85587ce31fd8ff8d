"""jaxbench.telemetry against a fake NVML (tests/fake_nvml.py): the fields, the energy from the
counter and from integrated power, the clock-event shares, the device matching, and every way
telemetry can be missing (a null field and a reason, never an exception)."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest
from fake_nvml import FakeCard, FakeNVML, gpus

from jaxbench.telemetry import CLOCK_EVENT_REASONS, DEVICE_FIELDS, FIELDS, TelemetrySampler

WINDOW_S = 0.5
INTERVAL_S = 0.02


def window(nvml, devices, nonces: int = 100, seconds: float = WINDOW_S) -> dict:
    with TelemetrySampler(devices, interval=INTERVAL_S, nvml=nvml) as sampler:
        sampler.begin()
        time.sleep(seconds)
        telemetry = sampler.end()
    return telemetry.fields(nonces)


def test_energy_from_the_counter_power_clocks_and_clock_reasons():
    cards = [FakeCard(power_w=700.0, sm_mhz=1395, reasons=0x4),
             FakeCard(power_w=500.0, sm_mhz=1755, reasons=0x1, uuid="GPU-1", power_limit_w=600.0)]
    nvml = FakeNVML(cards, driver=b"580.159.03")
    out = window(nvml, gpus(2), nonces=100)
    assert set(out) == set(FIELDS)
    seconds = out["telemetry_seconds"]
    assert WINDOW_S <= seconds < WINDOW_S + 0.5
    assert out["gpu_name"] == "NVIDIA H200" and out["driver_version"] == "580.159.03"
    assert out["energy_method"] == "energy_counter"
    # The counters advance at 700 W and 500 W over the window (read to the millijoule).
    assert out["energy_joules_per_nonce"] == pytest.approx(1200 * seconds / 100, rel=0.02)
    assert out["mean_power_w"] == pytest.approx(600, rel=0.02)
    assert out["power_limit_w"] == 650.0 and out["sm_clock_limit_mhz"] == 1980
    assert out["mean_sm_clock_mhz"] == pytest.approx((1395 + 1755) / 2) and out["max_sm_clock_mhz"] == 1755
    share = out["clock_limited_share"]
    assert set(share) == set(CLOCK_EVENT_REASONS) | {"none"}
    assert share["sw_power_cap"] == share["gpu_idle"] == 0.5 and share["none"] == 0.0
    assert sum(share.values()) == 1.0
    assert out["telemetry_samples"] >= 2 * 10 and out["telemetry_unsupported"] == []
    assert out["telemetry_unavailable"] is None

    first, second = out["telemetry_devices"]
    assert set(first) == set(DEVICE_FIELDS)
    assert (first["device"], first["nvml_index"], second["nvml_index"]) == (0, 0, 1)
    assert first["mean_power_w"] == pytest.approx(700, rel=0.02) and second["power_limit_w"] == 600.0
    assert first["clock_limited_share"]["sw_power_cap"] == 1.0 and second["clock_limited_share"]["gpu_idle"] == 1.0
    assert first["energy_joules"] == pytest.approx(700 * seconds, rel=0.02)
    assert nvml.initialised == 0  # shut down again


def test_without_the_counter_energy_is_integrated_power():
    nvml = FakeNVML([FakeCard(power_w=640.0, energy_counter=False)])
    out = window(nvml, gpus(1), nonces=64)
    assert out["energy_method"] == "integrated_power"
    assert out["energy_joules_per_nonce"] == pytest.approx(640 * out["telemetry_seconds"] / 64, rel=1e-3)
    assert out["mean_power_w"] == pytest.approx(640, rel=1e-3)
    assert out["telemetry_unsupported"] == ["total_energy_consumption"]


def test_a_card_without_power_readings_has_null_power_and_energy():
    nvml = FakeNVML([FakeCard(energy_counter=False, power_readings=False)])
    out = window(nvml, gpus(1))
    assert out["energy_joules_per_nonce"] is out["energy_method"] is out["mean_power_w"] is None
    assert out["mean_sm_clock_mhz"] == 1395  # what it does report is still there
    assert out["telemetry_unsupported"] == ["power_usage", "total_energy_consumption"]
    assert out["telemetry_unavailable"] is None


def test_a_card_lost_mid_window_ends_without_an_exception():
    nvml = FakeNVML([FakeCard(energy_counter=False, lost_after=3)])
    out = window(nvml, gpus(1))
    (device,) = out["telemetry_devices"]
    assert device["samples"] > 3 and out["energy_method"] == "integrated_power"  # from the 3 readings it had
    assert out["energy_joules_per_nonce"] == pytest.approx(700 * out["telemetry_seconds"] / 100, rel=1e-3)


def test_no_nonces_gives_no_energy_per_nonce():
    out = window(FakeNVML([FakeCard()]), gpus(1), nonces=0)
    assert out["energy_joules_per_nonce"] is None and out["mean_power_w"] == pytest.approx(700, rel=0.05)


@pytest.mark.parametrize("visible, expected", [("3,1", [3, 1]), ("GPU-b, GPU-a", ["GPU-b", "GPU-a"]), ("", [0, 1])])
def test_devices_are_matched_through_cuda_visible_devices(monkeypatch, visible, expected):
    cards = [FakeCard(uuid=f"GPU-{c}", name=f"card {i}") for i, c in enumerate("abcd")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    out = window(FakeNVML(cards), gpus(2), seconds=0.05)
    assert [d["nvml_index"] for d in out["telemetry_devices"]] == expected


def unavailable_reason(out: dict) -> str:
    assert set(out) == set(FIELDS)
    assert all(out[name] is None for name in FIELDS if name != "telemetry_unavailable")
    return out["telemetry_unavailable"]


def test_cpu_devices_have_no_telemetry():
    import jax

    assert unavailable_reason(window(None, jax.devices("cpu"), seconds=0)) == "no NVIDIA GPU (the devices are cpu)"


def test_without_the_binding_the_fields_say_it_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert unavailable_reason(window(None, gpus(1), seconds=0)) == "nvidia-ml-py is not installed"


def test_nvml_that_does_not_start_or_has_no_such_device():
    assert unavailable_reason(window(FakeNVML([FakeCard()], init_error=9), gpus(1), seconds=0)) == \
        "NVML did not start: NVML error 9"
    nvml = FakeNVML([FakeCard()])
    reason = unavailable_reason(window(nvml, gpus(2), seconds=0))
    assert reason.startswith("no NVML device for JAX device 1")
    assert nvml.initialised == 0


def test_a_binding_that_fails_in_its_own_way_is_a_reason_too():
    class Broken(FakeNVML):
        def nvmlSystemGetDriverVersion(self):
            raise RuntimeError("symbol not found")

    reason = unavailable_reason(window(Broken([FakeCard()]), gpus(1), seconds=0))
    assert reason == "NVML failed: RuntimeError: symbol not found"


def test_latest_readings_while_the_window_runs_and_a_window_not_begun():
    with TelemetrySampler(gpus(2), interval=INTERVAL_S, nvml=FakeNVML([FakeCard(), FakeCard(sm_mhz=1405)])) as s:
        assert s.latest() is None
        s.begin()
        time.sleep(0.1)
        assert s.latest() == {"power_w": 1400.0, "sm_mhz": 1400.0}
        s.end()
    with TelemetrySampler(gpus(1), nvml=FakeNVML([FakeCard()])) as s:
        assert s.end().fields(10)["telemetry_unavailable"] == "the window was not begun"
    assert TelemetrySampler([SimpleNamespace(platform="gpu", id=0)]).end().unavailable == "the sampler was not opened"
