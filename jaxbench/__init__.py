"""jaxbench: the Gonka Proof-of-Compute nonce search in JAX, bit-exact to the network's reference."""

import os

# XLA replays GPU work through CUDA graphs; capturing cuDNN's fused attention into one fails now and
# then ("capturing stream has unjoined work"). Keep cuDNN out of the graphs unless the user decides.
if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT"
    ).strip()

from .params import PRESETS, Params, ParamsError, resolve_params  # noqa: E402

__all__ = ["PRESETS", "Params", "ParamsError", "resolve_params"]
