"""Device memory a parameter set needs, from its sizes alone: a set that cannot fit is refused before
anything is allocated or compiled, and the batch is bounded by what is left after the weights.

The estimate is deliberately generous (a refusal costs a caller one clear error; an allocation that
fails midway costs the whole worker).
"""

from __future__ import annotations

import dataclasses
import os

import jax

from .draws import NUMPY_DTYPES
from .params import Params
from .sizes import format_size


@dataclasses.dataclass(frozen=True)
class MemoryNeed:
    """Bytes on one device: the weights stay, the weight pool and a step's activations come and go.

    The pool is drawn in float32 on the first device and cast there to the model dtype (both at once,
    before any weight exists); each device then holds the model-dtype pool while its weights are
    gathered from it, and frees it before the first step."""

    weights: int
    pool: int  # the pool in the model dtype, while the weights are gathered from it
    pool_draw: int  # the pool in float32 and in the model dtype, while it is drawn and cast
    per_nonce: int  # one nonce's live activations, inputs and permutation inside a step

    @classmethod
    def of(cls, params: Params, dtype: str, layers: range | None = None) -> "MemoryNeed":
        """The need of a device holding `layers` (a run of the model's layers, None: all of them), and the
        final norm and head when the run ends the model."""
        item = NUMPY_DTYPES[dtype].itemsize
        layers = range(params.n_layers) if layers is None else layers
        n_weights = len(layers) * params.layer_parameters()
        if layers.stop == params.n_layers:
            n_weights += params.head_parameters()
        return cls(
            weights=n_weights * item,
            pool=params.pool_size * item,
            pool_draw=params.pool_size * (4 + item),
            per_nonce=activation_bytes(params, dtype),
        )

    def total(self, batch: int) -> int:
        return max(self.pool_draw, self.weights + max(self.pool, batch * self.per_nonce))

    def describe(self, batch: int = 1) -> str:
        return (f"{format_size(self.total(batch))} on each device (weights {format_size(self.weights)}, "
                f"weight pool {format_size(self.pool)} while building, {batch} nonce(s) of activations "
                f"{format_size(batch * self.per_nonce)})")



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
