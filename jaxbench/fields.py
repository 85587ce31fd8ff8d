"""Checks of user-supplied fields, shared by the CLI and the service: each failure names its field."""

from __future__ import annotations

import math
from typing import Any, Mapping

from .nonces import NONCE_MAX
from .params import Params, ParamsError, resolve_params

DTYPES = ("float16", "bfloat16", "float32")
MAX_SEED_TEXT = 4096
MAX_NONCE_LIST = 1_000_000
DEFAULT_SUSTAINED_S = 5.0  # bench's ceiling probe after its end-to-end window
MAX_SUSTAINED_S = 30.0  # the ceiling probe holds the devices this long at most
SCREEN_PRODUCTS = ("fp8",)  # what a screened search's step may run in (jaxbench/screen.py)
# About nine times the largest |fp8 − float16| distance gap measured on a GPU (mainnet: 5.5e-5 over
# 20,480 nonces on an H100, docs/benchmarks.md); on mainnet it makes 6 % of the nonces candidates at
# the network's r_target.
DEFAULT_SCREEN_MARGIN = 0.0005
MAX_SCREEN_MARGIN = 0.1  # a screen margin wider than this screens nothing out (distances spread ~0.01)


class FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


_MISSING = object()


def _get(data: Mapping[str, Any], name: str, default: Any):
    value = data.get(name, _MISSING)
    if value is _MISSING or value is None and default is not _MISSING:
        if default is _MISSING:
            raise FieldError(name, "is required")
        return default
    return value


def seed_text(data: Mapping[str, Any], name: str, default: Any = _MISSING) -> str:
    """A string that goes into seed strings: block hashes, public keys."""
    value = _get(data, name, default)
    if not isinstance(value, str) or not value:
        raise FieldError(name, f"must be a non-empty string, got {value!r:.60}")
    if len(value) > MAX_SEED_TEXT:
        raise FieldError(name, f"must be at most {MAX_SEED_TEXT} characters")
    try:
        value.encode()  # seeds are hashed as UTF-8; a lone surrogate (undecodable argv bytes) has none
    except UnicodeEncodeError:
        raise FieldError(name, f"must be valid UTF-8 text, got {value!r:.60}") from None
    return value


def integer(data: Mapping[str, Any], name: str, default: Any = _MISSING, minimum: int | None = 0) -> int:
    value = _get(data, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, f"must be an integer, got {value!r:.60}")
    if minimum is not None and value < minimum:
        raise FieldError(name, f"must be ≥ {minimum}, got {value}")
    return value


def nonce(data: Mapping[str, Any], name: str, default: Any = _MISSING) -> int:
    """A nonce: an integer of the nonce space [0, NONCE_MAX] (docs/algorithm.md §7)."""
    value = integer(data, name, default)
    if value > NONCE_MAX:
        raise FieldError(name, f"must be at most {NONCE_MAX} (2**63-1, the end of the nonce space), got {value}")
    return value


def node(data: Mapping[str, Any], start_nonce: int) -> tuple[int, int]:
    """`node_id` of `n_nodes` (defaults 0 of 1), whose first nonce, start_nonce + node_id, is in the nonce space."""
    n_nodes = integer(data, "n_nodes", 1, minimum=1)
    node_id = integer(data, "node_id", 0)
    if node_id >= n_nodes:
        raise FieldError("node_id", f"must be below n_nodes ({n_nodes}), got {node_id}")
    if start_nonce + node_id > NONCE_MAX:
        raise FieldError("node_id", f"start_nonce + node_id is past the end of the nonce space ({NONCE_MAX})")
    return node_id, n_nodes


def number(data: Mapping[str, Any], name: str, default: Any = _MISSING, positive: bool = True) -> float:
    value = _get(data, name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(name, f"must be a finite number, got {value!r:.60}")
    if positive and value <= 0:
        raise FieldError(name, f"must be positive, got {value}")
    return float(value)


def p_value_bound(data: Mapping[str, Any], name: str, default: Any = _MISSING) -> float:
    """A bound on a p-value (a fraud threshold): in (0, 1]."""
    value = number(data, name, default)
    if value > 1:
        raise FieldError(name, f"must be at most 1 (a p-value bound), got {value}")
    return value


def sustained_seconds(data: Mapping[str, Any], name: str = "sustained_seconds", default: Any = _MISSING) -> float:
    """Seconds of the sustained-rate probe (jaxbench.sustained): 0 (off) to MAX_SUSTAINED_S."""
    value = number(data, name, default, positive=False)
    if not 0 <= value <= MAX_SUSTAINED_S:
        raise FieldError(name, f"must be between 0 and {MAX_SUSTAINED_S:g} seconds, got {value}")
    return value


def screen(data: Mapping[str, Any]) -> tuple[str | None, float]:
    """`screen` (None or one of SCREEN_PRODUCTS) and `screen_margin` (0 to MAX_SCREEN_MARGIN)."""
    products = _get(data, "screen", None)
    if products is not None and products not in SCREEN_PRODUCTS:
        raise FieldError("screen", f"must be one of {', '.join(SCREEN_PRODUCTS)} or absent, got {products!r:.60}")
    if products is None and _get(data, "screen_margin", None) is not None:
        raise FieldError("screen_margin", "applies only with screen")
    margin = number(data, "screen_margin", DEFAULT_SCREEN_MARGIN, positive=False)
    if not 0 <= margin <= MAX_SCREEN_MARGIN:
        raise FieldError("screen_margin", f"must be between 0 and {MAX_SCREEN_MARGIN:g}, got {margin}")
    return products, margin


def dtype(data: Mapping[str, Any], name: str = "dtype", default: str = "float16") -> str:
    value = _get(data, name, default)
    if value not in DTYPES:
        raise FieldError(name, f"must be one of {', '.join(DTYPES)}, got {value!r:.60}")
    return value


def params(data: Mapping[str, Any], name: str = "params", default: Any = _MISSING) -> Params:
    """An object of parameter fields or a preset name."""
    value = _get(data, name, default)
    if isinstance(value, Params):
        return value
    if not isinstance(value, (Mapping, str)):
        raise FieldError(name, f"must be an object or a preset name, got {type(value).__name__}")
    try:
        return resolve_params(value)
    except ParamsError as e:
        raise FieldError(e.under(name), e.message) from None


def nonce_list(data: Mapping[str, Any], name: str = "nonces", max_len: int = MAX_NONCE_LIST) -> list[int]:
    value = _get(data, name, _MISSING)
    if not isinstance(value, list) or not value:
        raise FieldError(name, "must be a non-empty list of non-negative integers")
    if len(value) > max_len:
        raise FieldError(name, f"must hold at most {max_len} nonces")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= NONCE_MAX:
            raise FieldError(name, f"must hold nonces, integers in [0, 2**63-1], got {v!r:.60}")
    return value


def parse_nonce_ranges(text: str, name: str = "nonces", max_len: int = MAX_NONCE_LIST) -> list[int]:
    """"1,5,10-20" -> [1, 5, 10, …, 20] (ranges inclusive), at most max_len nonces (counted before
    any range is expanded)."""
    bounds: list[tuple[int, int]] = []
    count = 0
    for part in text.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            lo, hi = int(lo), int(hi) if hi else int(lo)
            if lo < 0 or hi < lo or hi > NONCE_MAX:
                raise ValueError
        except ValueError:
            raise FieldError(name, f"bad nonce or range {part!r:.60} (use integers in [0, 2**63-1] and a-b ranges)") from None
        count += hi - lo + 1
        if count > max_len:
            raise FieldError(name, f"at most {max_len:,} nonces")
        bounds.append((lo, hi))
    return [n for lo, hi in bounds for n in range(lo, hi + 1)]


def search_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """The checked fields that define one search, under the names /generate and the CLI's `search`
    and `remote search` share: block_hash, block_height, public_key, r_target, start_nonce, params
    (an object, a preset name or a Params), max_nonces (None when absent) and dtype."""
    return {
        "block_hash": seed_text(data, "block_hash"),
        "block_height": integer(data, "block_height"),
        "public_key": seed_text(data, "public_key"),
        "r_target": number(data, "r_target"),
        "start_nonce": nonce(data, "start_nonce"),
        "params": params(data),
        "max_nonces": None if data.get("max_nonces") is None else nonce_count(data, "max_nonces"),
        "dtype": dtype(data),
    }


def nonce_count(data: Mapping[str, Any], name: str) -> int:
    """How many nonces: 1 to the size of the nonce space, 2**63."""
    value = integer(data, name, minimum=1)
    if value > NONCE_MAX + 1:
        raise FieldError(name, f"must be at most {NONCE_MAX + 1} (2**63, the whole nonce space), got {value}")
    return value
