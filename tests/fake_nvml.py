"""A stand-in for the `pynvml` module (nvidia-ml-py) with the calls jaxbench.telemetry makes, for
tests on machines without an NVIDIA GPU. Each fake card draws a constant power, and its
total-energy counter advances with the real clock at that power, as a card's does."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_GPU_IS_LOST = 15


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return {NVML_ERROR_NOT_SUPPORTED: "Not Supported", NVML_ERROR_GPU_IS_LOST: "GPU is lost"}.get(
            self.value, f"NVML error {self.value}")


@dataclasses.dataclass
class FakeCard:
    name: str = "NVIDIA H200"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    power_w: float = 700.0
    power_limit_w: float = 700.0
    sm_mhz: int = 1395
    sm_limit_mhz: int = 1980
    reasons: int = 0x4  # the software power cap
    energy_counter: bool = True  # reports nvmlDeviceGetTotalEnergyConsumption
    power_readings: bool = True  # reports nvmlDeviceGetPowerUsage
    lost_after: int | None = None  # power readings after this many fail with "GPU is lost"
    power_calls: int = 0


def gpus(n: int) -> list[SimpleNamespace]:
    """JAX-like GPU devices 0 … n−1."""
    return [SimpleNamespace(platform="gpu", id=i, local_hardware_id=i, device_kind="NVIDIA H200") for i in range(n)]


class FakeNVML:
    NVMLError = NVMLError

    def __init__(self, cards: list[FakeCard], init_error: int | None = None, driver: bytes | str = "580.159.03"):
        self.cards = cards
        self.init_error = init_error
        self.driver = driver
        self.started = time.monotonic()
        self.initialised = 0

    def nvmlInit(self):
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self):
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlDeviceGetHandleByIndex(self, index: int):
        if not 0 <= index < len(self.cards):
            raise NVMLError(2)  # invalid argument
        return self.cards[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str):
        for card in self.cards:
            if card.uuid == uuid:
                return card
        raise NVMLError(6)  # not found

    def nvmlDeviceGetName(self, card: FakeCard):
        return card.name

    def nvmlDeviceGetEnforcedPowerLimit(self, card: FakeCard) -> int:
        return int(card.power_limit_w * 1000)

    def nvmlDeviceGetMaxClockInfo(self, card: FakeCard, clock: int) -> int:
        return card.sm_limit_mhz

    def nvmlDeviceGetPowerUsage(self, card: FakeCard) -> int:
        if not card.power_readings:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        card.power_calls += 1
        if card.lost_after is not None and card.power_calls > card.lost_after:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return int(card.power_w * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, card: FakeCard) -> int:
        if not card.energy_counter:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return int(card.power_w * (time.monotonic() - self.started) * 1000)

    def nvmlDeviceGetClockInfo(self, card: FakeCard, clock: int) -> int:
        assert clock == 1  # NVML_CLOCK_SM
        return card.sm_mhz

    def nvmlDeviceGetCurrentClocksEventReasons(self, card: FakeCard) -> int:
        return card.reasons
