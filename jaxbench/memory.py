"""Device memory a parameter set needs, from its sizes alone: a set that cannot fit is refused before
anything is allocated or compiled, and the batch is bounded by what is left after the weights.

The estimate is deliberately generous (a refusal costs a caller one clear error; an allocation that
fails midway costs the whole worker).
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax

from .draws import NUMPY_DTYPES
from .params import Params

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryNeed:
    """Bytes on each device: the weights stay, the build's pool and a step's activations come and go."""

    weights: int
    build: int  # the pool in float32 and in the model dtype, while the weights are gathered from it
    per_nonce: int  # one nonce's live activations, inputs and permutation inside a step

    @classmethod
    def of(cls, params: Params, dtype: str) -> "MemoryNeed":
        item = NUMPY_DTYPES[dtype].itemsize
        return cls(
            weights=params.weight_bytes(item),
            build=params.pool_size * (4 + item),
            per_nonce=activation_bytes(params, dtype),
        )

    def total(self, batch: int) -> int:
        return self.weights + max(self.build, batch * self.per_nonce)

    def describe(self, batch: int = 1) -> str:
        return (f"{self.total(batch) / GiB:.2f} GiB on each device (weights {self.weights / GiB:.2f} GiB, "
                f"weight pool {self.build / GiB:.2f} GiB while building, {batch} nonce(s) of activations "
                f"{batch * self.per_nonce / GiB:.2f} GiB)")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "24GiB", "24 GB", "512MiB" or a plain number of bytes; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
        raise ValueError(f"{text!r:.40} is not a size (e.g. 24GiB, 24000MB, or bytes)")
    size = int(float(match.group(1)) * unit)
    if size <= 0:
        raise ValueError(f"{text!r:.40} is not a positive size")
    return size


def activation_bytes(params: Params, dtype: str) -> int:
    """A generous estimate of one nonce's live device memory inside a layer of the step."""
    item = NUMPY_DTYPES[dtype].itemsize
    s, d, h = params.seq_len, params.dim, params.hidden_dim
    qkv = s * (params.n_heads + 2 * params.n_kv_heads) * params.head_dim
    scores = params.n_heads * s * s * (4 + 4 + item)  # float32 scores, float32 softmax, rounded probs
    ffn = 3 * s * h * item
    residual = 6 * s * d * 4
    io = s * d * item + params.vocab_size * (4 + 4 + 4)
    return int(1.5 * (qkv * 4 + scores + ffn + residual + io))


def host_available_bytes() -> int | None:
    """Memory the host can still give (MemAvailable), where the CPU backend allocates."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def device_free_bytes(device: jax.Device) -> int | None:
    """What the device can still allocate: its allocator's limit less what is in use; for the CPU
    backend the host's available memory. None when neither is known."""
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit:
        return int(limit - stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        return host_available_bytes()
    return None
