"""jaxbench: the Gonka Proof-of-Compute nonce search in JAX, bit-exact to the network's reference."""

from .params import PRESETS, Params, ParamsError, resolve_params

__all__ = ["PRESETS", "Params", "ParamsError", "resolve_params"]
