"""What the GPUs did during a timed window: power, energy, SM clock and why the clock was held down.

A `TelemetrySampler` reads NVIDIA's management library (NVML, through the `nvidia-ml-py` binding,
module `pynvml`) for each device of a run:

    with TelemetrySampler(engine.devices) as sampler:   # NVML opened, the devices found
        sampler.begin()                                  # the window starts: energy counters read
        ...                                              # a background thread samples every `interval`
        telemetry = sampler.end()                        # the window ends
    telemetry.fields(nonces)                             # the report's fields (FIELDS)

Each sample holds each device's power draw, SM clock and the clock-event reasons NVML reports
(a bit set: the software power cap, thermal slowdown, …). Energy comes from the device's total-energy
counter read at both ends of the window (`energy_method: "energy_counter"`); where a device does not
report that counter, from its power samples integrated over the window (`"integrated_power"`).

Nothing here raises into the caller and nothing is made up: where there is no NVIDIA GPU, no
binding, or NVML fails to start, every field is null and `telemetry_unavailable` says why; a quantity
a device does not report is null, and its query is listed in `telemetry_unsupported`.

JAX devices are matched to NVML devices through `CUDA_VISIBLE_DEVICES` when it is set (an index or
a `GPU-…` UUID per entry), else by the CUDA ordinal; CUDA and NVML number GPUs alike on a host of
identical cards (both follow the PCI bus order there).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Sequence

# NVML's clock-event reason bits (nvmlClocksEventReason*), by the names the report uses.
CLOCK_EVENT_REASONS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}
NVML_CLOCK_SM = 1
NVML_ERROR_NOT_SUPPORTED = 3

# The fields a report carries (bench's JSON, /benchmark's answer), null where unavailable.
FIELDS = (
    "gpu_name",
    "driver_version",
    "power_limit_w",
    "mean_power_w",
    "energy_joules_per_nonce",
    "energy_method",
    "mean_sm_clock_mhz",
    "max_sm_clock_mhz",
    "sm_clock_limit_mhz",
    "clock_limited_share",
    "telemetry_samples",
    "telemetry_seconds",
    "telemetry_unsupported",
    "telemetry_unavailable",
    "telemetry_devices",  # a list: per device, DEVICE_FIELDS
)
DEVICE_FIELDS = ("device", "nvml_index", "gpu_name", "power_limit_w", "mean_power_w", "energy_joules",
                 "energy_method", "mean_sm_clock_mhz", "max_sm_clock_mhz", "sm_clock_limit_mhz",
                 "clock_limited_share", "samples")
DEFAULT_INTERVAL_S = 0.1


def unavailable(reason: str) -> dict:
    """The report's fields where there is no telemetry: every one null, and the reason."""
    return {**dict.fromkeys(FIELDS), "telemetry_unavailable": reason}


@dataclasses.dataclass(frozen=True)
class Sample:
    t: float  # seconds since the window began
    power_w: float | None
    sm_mhz: float | None
    reasons: int | None  # the clock-event reason bits


@dataclasses.dataclass
class DeviceTelemetry:
    """One device over the window."""

    device: int  # the JAX device id
    nvml_index: int | str  # NVML's index, or the UUID it was found by
    gpu_name: str
    power_limit_w: float | None
    sm_clock_limit_mhz: float | None
    samples: list[Sample] = dataclasses.field(default_factory=list)
    energy_joules: float | None = None
    energy_method: str | None = None

    def mean(self, name: str) -> float | None:
        values = [getattr(s, name) for s in self.samples if getattr(s, name) is not None]
        return sum(values) / len(values) if values else None

    def peak(self, name: str) -> float | None:
        return max((getattr(s, name) for s in self.samples if getattr(s, name) is not None), default=None)

    def integrated_energy(self, seconds: float) -> float | None:
        """Joules from the power samples, trapezoids between them and each end held to the window's edge."""
        points = [(s.t, s.power_w) for s in self.samples if s.power_w is not None]
        if not points:
            return None
        points = [(0.0, points[0][1]), *points, (seconds, points[-1][1])]
        return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(points, points[1:]) if t1 > t0)


def _limited_share(samples: Sequence[Sample]) -> dict | None:
    """The share of samples in which each clock-event reason was active; `none`: no reason at all."""
    read = [s.reasons for s in samples if s.reasons is not None]
    if not read:
        return None
    share = {name: round(sum(1 for r in read if r & bit) / len(read), 3) for name, bit in CLOCK_EVENT_REASONS.items()}
    share["none"] = round(sum(1 for r in read if not r & sum(CLOCK_EVENT_REASONS.values())) / len(read), 3)
    return share


def _rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


@dataclasses.dataclass
class Telemetry:
    """What a window gave: per device samples and energy, or why there is nothing."""

    seconds: float = 0.0
    devices: list[DeviceTelemetry] = dataclasses.field(default_factory=list)
    driver_version: str | None = None
    unsupported: set[str] = dataclasses.field(default_factory=set)
    unavailable: str | None = None

    def fields(self, nonces: int) -> dict:
        """The report's fields (FIELDS and `telemetry_devices`) for a window that computed `nonces`.
        Power, limit and clocks are per device (the mean over the devices); energy per nonce is all
        the devices' energy over all the nonces."""
        if self.unavailable is not None:
            return unavailable(self.unavailable)
        per_device = [self._device_fields(d) for d in self.devices]
        energies = [d.energy_joules for d in self.devices]
        methods = {d.energy_method for d in self.devices}
        samples = [s for d in self.devices for s in d.samples]
        clocks = [s.sm_mhz for s in samples if s.sm_mhz is not None]

        def over_devices(name: str, digits: int = 1):
            values = [f[name] for f in per_device]
            return None if None in values or not values else round(sum(values) / len(values), digits)

        return {
            "gpu_name": ", ".join(sorted({d.gpu_name for d in self.devices})),
            "driver_version": self.driver_version,
            "power_limit_w": over_devices("power_limit_w"),
            "mean_power_w": over_devices("mean_power_w"),
            "energy_joules_per_nonce": (round(sum(energies) / nonces, 4)
                                        if nonces > 0 and None not in energies else None),
            "energy_method": None if None in methods else ("energy_counter" if methods == {"energy_counter"}
                                                           else "integrated_power"),
            "mean_sm_clock_mhz": _rounded(sum(clocks) / len(clocks)) if clocks else None,
            "max_sm_clock_mhz": max(clocks, default=None),
            "sm_clock_limit_mhz": over_devices("sm_clock_limit_mhz", 0),
            "clock_limited_share": _limited_share(samples),
            "telemetry_samples": len(samples),
            "telemetry_seconds": round(self.seconds, 3),
            "telemetry_unsupported": sorted(self.unsupported),
            "telemetry_unavailable": None,
            "telemetry_devices": per_device,
        }

    def _device_fields(self, d: DeviceTelemetry) -> dict:
        mean_power = d.energy_joules / self.seconds if d.energy_joules is not None and self.seconds > 0 else None
        return {
            "device": d.device,
            "nvml_index": d.nvml_index,
            "gpu_name": d.gpu_name,
            "power_limit_w": _rounded(d.power_limit_w),
            "mean_power_w": _rounded(mean_power),
            "energy_joules": _rounded(d.energy_joules, 2),
            "energy_method": d.energy_method,
            "mean_sm_clock_mhz": _rounded(d.mean("sm_mhz")),
            "max_sm_clock_mhz": d.peak("sm_mhz"),
            "sm_clock_limit_mhz": d.sm_clock_limit_mhz,
            "clock_limited_share": _limited_share(d.samples),
            "samples": len(d.samples),
        }

    def series(self) -> list[dict]:
        """Per device, the samples over time: `t` (s since the window began), `power_w`, `sm_mhz`
        (lists, None where a reading failed). Empty where telemetry is unavailable."""
        return [{"device": d.device, "gpu_name": d.gpu_name, "t": [s.t for s in d.samples],
                 "power_w": [s.power_w for s in d.samples], "sm_mhz": [s.sm_mhz for s in d.samples]}
                for d in self.devices]


def _load_nvml():
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class TelemetrySampler:
    """Samples the devices' NVML readings on a background thread between `begin()` and `end()`.

    `devices` are JAX devices (anything with `platform`, `id` and `local_hardware_id`); `nvml` is
    the binding (default: `pynvml`, imported here so that a machine without it still runs).
    """

    def __init__(self, devices: Sequence[Any], interval: float = DEFAULT_INTERVAL_S, nvml=None):
        self.devices = list(devices)
        self.interval = interval
        self._nvml = nvml
        self._opened = False
        self._unavailable: str | None = None
        self._driver: str | None = None
        self._handles: list = []
        self._found: list[DeviceTelemetry] = []
        self._unsupported: set[str] = set()
        self._counters: list[float | None] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._latest: list[Sample | None] = []

    # Opening and closing NVML ------------------------------------------------------------------

    def open(self) -> "TelemetrySampler":
        """Start NVML and find the devices; on any failure the sampler records why and stays inert."""
        try:
            self._unavailable = self._open()
        except Exception as e:  # noqa: BLE001 — telemetry must never stop a run
            self._unavailable = f"NVML failed: {type(e).__name__}: {e}"
        return self

    def _open(self) -> str | None:
        if not self.devices:
            return "no devices"
        platforms = sorted({d.platform for d in self.devices})
        if platforms != ["gpu"]:
            return f"no NVIDIA GPU (the devices are {', '.join(platforms)})"
        if self._nvml is None:
            self._nvml = _load_nvml()
            if self._nvml is None:
                return "nvidia-ml-py is not installed"
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            return f"NVML did not start: {e}"
        self._opened = True
        try:
            self._driver = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            self._unsupported.add("driver_version")
        for device in self.devices:
            try:
                handle, index = self._handle(device)
                name = _text(nvml.nvmlDeviceGetName(handle))
            except (nvml.NVMLError, ValueError, IndexError) as e:
                return f"no NVML device for JAX device {device.id}: {e}"
            self._handles.append(handle)
            self._found.append(DeviceTelemetry(
                device.id, index, name,
                power_limit_w=self._query("power_limit", lambda h: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
                                          handle),
                sm_clock_limit_mhz=self._query("sm_clock_limit",
                                               lambda h: nvml.nvmlDeviceGetMaxClockInfo(h, NVML_CLOCK_SM), handle)))
        return None

    def _handle(self, device) -> tuple[Any, int | str]:
        """The NVML handle of a JAX GPU and how it was found (NVML index or UUID)."""
        nvml = self._nvml
        ordinal = getattr(device, "local_hardware_id", None)
        ordinal = device.id if ordinal is None else ordinal
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        entry = str(ordinal)
        if visible:
            entries = [e.strip() for e in visible.split(",") if e.strip()]
            entry = entries[ordinal]
        if entry.startswith(("GPU-", "MIG-")):
            return nvml.nvmlDeviceGetHandleByUUID(entry), entry
        return nvml.nvmlDeviceGetHandleByIndex(int(entry)), int(entry)

    def close(self) -> None:
        self._stop_thread()
        if self._opened:
            self._opened = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass

    @property
    def unavailable(self) -> str | None:
        """Why `open` found no telemetry (None: it did, or it has not run)."""
        return self._unavailable

    def __enter__(self) -> "TelemetrySampler":
        return self.open()

    def __exit__(self, *_) -> None:
        self.close()

    # The window --------------------------------------------------------------------------------

    def _query(self, name: str, read, handle):
        """One NVML reading, or None (a query the device does not support is remembered by name)."""
        try:
            return read(handle)
        except self._nvml.NVMLError as e:
            if getattr(e, "value", None) == NVML_ERROR_NOT_SUPPORTED:
                self._unsupported.add(name)
            return None
        except Exception:  # noqa: BLE001 — a binding's own failure: no reading
            return None

    def _energy_counters(self) -> list[float | None]:
        return [self._query("total_energy_consumption", self._nvml.nvmlDeviceGetTotalEnergyConsumption, h)
                for h in self._handles]

    def _reasons(self, handle) -> int | None:
        nvml = self._nvml
        read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return self._query("clock_event_reasons", read, handle)

    def _sample(self) -> None:
        nvml, t = self._nvml, time.monotonic() - self._t0
        for i, (device, handle) in enumerate(zip(self._found, self._handles)):
            power = self._query("power_usage", nvml.nvmlDeviceGetPowerUsage, handle)
            sample = Sample(t, None if power is None else power / 1000,
                            self._query("sm_clock", lambda h: nvml.nvmlDeviceGetClockInfo(h, NVML_CLOCK_SM), handle),
                            self._reasons(handle))
            device.samples.append(sample)
            self._latest[i] = sample

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval):
                return

    def begin(self) -> None:
        """The window starts now: counters read, sampling started. Calling it again restarts the window."""
        if self._unavailable is not None or not self._opened:
            return
        self._stop_thread()
        for device in self._found:
            device.samples.clear()
            device.energy_joules = device.energy_method = None
        self._latest = [None] * len(self._found)
        self._counters = self._energy_counters()
        self._t0 = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="jaxbench-telemetry", daemon=True)
        self._thread.start()

    def latest(self) -> dict | None:
        """The newest readings while the window runs: total `power_w` and mean `sm_mhz` of the devices
        (None before the first sample, or where a device does not report them)."""
        samples = list(self._latest)
        if not samples or None in samples:
            return None
        powers = [s.power_w for s in samples]
        clocks = [s.sm_mhz for s in samples]
        return {"power_w": None if None in powers else sum(powers),
                "sm_mhz": None if None in clocks else sum(clocks) / len(clocks)}

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def end(self) -> Telemetry:
        """The window ends now: sampling stopped, energy worked out, the window's telemetry."""
        if self._unavailable is not None or not self._opened:
            return Telemetry(unavailable=self._unavailable or "the sampler was not opened")
        if self._thread is None:
            return Telemetry(unavailable="the window was not begun")
        try:
            counters = self._energy_counters()
            seconds = time.monotonic() - self._t0
            self._stop_thread()
            for device, before, after in zip(self._found, self._counters, counters):
                if before is not None and after is not None and after >= before:
                    device.energy_joules, device.energy_method = (after - before) / 1000, "energy_counter"
                else:
                    device.energy_joules = device.integrated_energy(seconds)
                    device.energy_method = None if device.energy_joules is None else "integrated_power"
            return Telemetry(seconds, [dataclasses.replace(d, samples=list(d.samples)) for d in self._found],
                             self._driver, set(self._unsupported))
        except Exception as e:  # noqa: BLE001 — telemetry must never stop a run
            self._stop_thread()
            return Telemetry(unavailable=f"NVML failed: {type(e).__name__}: {e}")
