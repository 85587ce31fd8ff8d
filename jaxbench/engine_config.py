"""The engine's settings, resolved once against the devices: which paths run where, and what is refused.

| setting | default | on |
|---|---|---|
| draws | `device` on GPUs, `host` elsewhere | where each nonce's input is drawn (docs/device-draws.md) |
| attention | `JAXBENCH_ATTENTION`, else `cudnn` on GPUs of compute capability ≥ 8.0, else `xla` | the full-sequence blocks' attention (float32 always `xla`) |
| ffn | `JAXBENCH_FFN`, else `pallas` on Hopper (9.0), else `xla` | the FFN's gated half (gated_ffn.py needs Hopper) |
| group_size | chosen per parameter set from memory (placement.py) | devices sharing one replica |
| device_memory | what each device reports | bytes the engine may use on each device |

Refused: the pallas FFN off Hopper, and Blackwell data-centre cards (compute capability 10.x and
11.x) with a cuBLAS older than 13.2, which can silently corrupt products there (JAX's CUDA plugin
warns of it at start): every `jax[cuda12]` wheel. The CUDA 13 image (or `pip install 'jax[cuda13]'`)
runs them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax

from . import gated_ffn
from .fields import FieldError
from .model import ATTENTION_IMPLEMENTATIONS, FFN_IMPLEMENTATIONS
from .placement import GROUP_SIZES
from .weights import REFERENCE_LAYOUT, WeightLayout

DRAWS = ("host", "device")
DEFAULT_CACHE_DIR = Path(os.environ.get("JAXBENCH_CACHE_DIR", Path.home() / ".cache" / "jaxbench" / "xla"))
CUDNN_ATTENTION_MIN_CAPABILITY = (8, 0)  # cuDNN's fused attention runs on Ampere and later
SAFE_CUBLAS_ON_BLACKWELL = (13, 2)


def enable_compile_cache(directory: str | os.PathLike | None = DEFAULT_CACHE_DIR) -> None:
    """Persist compiled executables across processes (a restarted server does not recompile)."""
    if not directory:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def compute_capability(device: jax.Device) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA GPU; None for every other device."""
    text = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def cublas_version() -> tuple[int, int] | None:
    """(major, minor) of the cuBLAS that JAX's CUDA plugin loaded; None where it cannot be read."""
    try:
        from jax._src.lib import cuda_versions

        version = int(cuda_versions.cublas_get_version())
    except Exception:  # noqa: BLE001 — no CUDA plugin, or one without the query
        return None
    return version // 10000, version // 100 % 100


def unsafe_blackwell(device: jax.Device, cublas: tuple[int, int] | None) -> str | None:
    """Why this device cannot run checkable work with this cuBLAS; None when it can."""
    capability = compute_capability(device)
    if capability is None or not 10 <= capability[0] < 12:
        return None
    if cublas is not None and cublas >= SAFE_CUBLAS_ON_BLACKWELL:
        return None
    found = "an unknown cuBLAS" if cublas is None else f"cuBLAS {cublas[0]}.{cublas[1]}"
    return (f"{device.device_kind} (compute capability {capability[0]}.{capability[1]}) with {found}: cuBLAS "
            f"before 13.2 can silently corrupt products on this card; use the CUDA 13 image (the -cuda13 tag) or "
            f"pip install 'jax[cuda13]'")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    draws: str
    attention: str  # of float16 and bfloat16 steps; float32 steps step through XLA
    ffn: str
    layout: WeightLayout
    group_size: int | None  # None: chosen per parameter set
    device_memory: int | None  # None: what each device reports

    @classmethod
    def resolve(cls, devices: list[jax.Device], draws: str = "auto", attention: str | None = None,
                ffn: str | None = None, group_size: int | None = None, device_memory: int | None = None,
                cublas: tuple[int, int] | None = None) -> "EngineConfig":
        """Defaults filled in for these devices (environment variables read here, once), and the
        combinations that cannot run refused (ValueError; FieldError naming the setting)."""
        first = devices[0]
        refusal = unsafe_blackwell(first, cublas if cublas is not None else cublas_version())
        if refusal:
            raise ValueError(refusal)
        capability = compute_capability(first)
        if draws == "auto":
            draws = "device" if first.platform == "gpu" else "host"
        if draws not in DRAWS:
            raise FieldError("draws", f"must be 'host', 'device' or 'auto', got {draws!r}")
        attention = attention or os.environ.get("JAXBENCH_ATTENTION") or (
            "cudnn" if capability and capability >= CUDNN_ATTENTION_MIN_CAPABILITY else "xla")
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {attention!r}")
        on_hopper = gated_ffn.on_hopper(first)
        ffn = ffn or os.environ.get("JAXBENCH_FFN") or ("pallas" if on_hopper else "xla")
        if ffn not in FFN_IMPLEMENTATIONS:
            raise ValueError(f"ffn must be one of {', '.join(FFN_IMPLEMENTATIONS)}, got {ffn!r}")
        if ffn == "pallas" and not on_hopper:
            raise ValueError(f"the pallas FFN kernel needs a Hopper GPU, not {first.device_kind}")
        if group_size is not None and group_size not in GROUP_SIZES:
            raise FieldError("group_size", f"must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
        if device_memory is not None and device_memory <= 0:
            raise FieldError("device_memory", f"must be a positive size, got {device_memory}")
        layout = WeightLayout(gate_up_block=gated_ffn.DEFAULT_CONFIG.block) if ffn == "pallas" else REFERENCE_LAYOUT
        return cls(draws, attention, ffn, layout, group_size, device_memory)

    def attention_for(self, dtype: str) -> str:
        return "xla" if dtype == "float32" else self.attention
