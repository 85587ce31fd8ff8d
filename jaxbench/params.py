"""Model parameters of the PoC search: the validated type, the named presets, sizes and FLOPs."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Mapping


# Hard upper bounds, far above every preset: a request beyond them is refused before any size is derived.
FIELD_LIMITS: dict[str, float] = {
    "dim": 65536,
    "n_layers": 1024,
    "n_heads": 1024,
    "n_kv_heads": 1024,
    "vocab_size": 1 << 21,
    "ffn_dim_multiplier": 64.0,
    "multiple_of": 1 << 20,
    "norm_eps": 1.0,
    "rope_theta": 1e12,
    "seq_len": 1 << 16,
}
# The largest file the command line reads (a params file, a claim: a million nonces are about 45 MB of JSON).
MAX_INPUT_FILE_BYTES = 256 * 2**20
# Weight tensors and the weight pool are indexed with 32-bit integers.
MAX_TENSOR_ELEMENTS = 2**31 - 1


class ParamsError(ValueError):
    """A parameter set is malformed; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{self.under('params')}: {message}")

    def under(self, name: str) -> str:
        """The offending field's path when the parameters arrive as the field `name`."""
        return name if self.field == "params" else f"{name}.{self.field}"


@dataclasses.dataclass(frozen=True)
class Params:
    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    n_kv_heads: int = 16
    vocab_size: int = 8192
    ffn_dim_multiplier: float = 1.3
    multiple_of: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    seq_len: int = 16

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise ParamsError(f.name, f"must be a boolean, got {value!r}")
            elif f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ParamsError(f.name, f"must be an integer, got {value!r}")
                if value <= 0:
                    raise ParamsError(f.name, f"must be positive, got {value}")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ParamsError(f.name, f"must be a number, got {value!r}")
                if not math.isfinite(value) or value <= 0:
                    raise ParamsError(f.name, f"must be a positive finite number, got {value}")
                object.__setattr__(self, f.name, float(value))
            limit = FIELD_LIMITS.get(f.name)
            if limit is not None and getattr(self, f.name) > limit:
                shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
                raise ParamsError(f.name, f"must be at most {shown}, got {value}")
        if self.dim % self.n_heads:
            raise ParamsError("dim", f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ParamsError(
                "n_kv_heads", f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ParamsError("n_heads", f"head_dim = dim // n_heads = {self.head_dim} must be even")
        for rows, field in ((self.hidden_dim, "ffn_dim_multiplier"), (self.vocab_size, "vocab_size")):
            if rows * self.dim > MAX_TENSOR_ELEMENTS:
                raise ParamsError(field, f"a {rows} × {self.dim} weight would have more than "
                                         f"{MAX_TENSOR_ELEMENTS} elements")
        if self.pool_size > MAX_TENSOR_ELEMENTS:
            raise ParamsError("n_layers", f"{self.n_params} parameters make a weight pool of {self.pool_size} values; "
                                          f"at most {MAX_TENSOR_ELEMENTS} are supported")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Params":
        if not isinstance(data, Mapping):
            raise ParamsError("params", f"must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ParamsError(str(key), "unknown field")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """A short description for log lines."""
        return f"dim {self.dim}, {self.n_layers} layers, seq {self.seq_len}, vocab {self.vocab_size}"

    # Derived sizes.
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        h = int(2 * 4 * self.dim / 3)
        h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter in the reference's `named_parameters()` order, PyTorch layout."""
        d, hd, h = self.dim, self.head_dim, self.hidden_dim
        shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (self.vocab_size, d)}
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes[p + "attention.wq.weight"] = (self.n_heads * hd, d)
            shapes[p + "attention.wk.weight"] = (self.n_kv_heads * hd, d)
            shapes[p + "attention.wv.weight"] = (self.n_kv_heads * hd, d)
            shapes[p + "attention.wo.weight"] = (d, self.n_heads * hd)
            shapes[p + "feed_forward.w1.weight"] = (h, d)
            shapes[p + "feed_forward.w2.weight"] = (d, h)
            shapes[p + "feed_forward.w3.weight"] = (h, d)
            shapes[p + "attention_norm.weight"] = (d,)
            shapes[p + "ffn_norm.weight"] = (d,)
        shapes["norm.weight"] = (d,)
        shapes["output.weight"] = (self.vocab_size, d)
        return shapes

    @functools.cached_property  # kept in the instance's __dict__: fields, equality and hashing are untouched
    def n_params(self) -> int:
        """All parameters the reference counts, the unused embedding table included."""
        return sum(math.prod(s) for s in self.parameter_shapes().values())

    @property
    def pool_size(self) -> int:
        return max(50000, int(self.n_params * 0.05))

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes of the weights the forward pass needs (no embedding table) in a dtype of that width."""
        return (self.n_params - self.vocab_size * self.dim) * dtype_bytes

    def layer_parameters(self) -> int:
        """Parameters of one transformer block."""
        d, hd = self.dim, self.head_dim
        return 2 * d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd + 3 * d * self.hidden_dim + 2 * d

    def head_parameters(self) -> int:
        """Parameters after the last block: the final norm and the output projection."""
        return self.dim + self.vocab_size * self.dim

    def layer_flops(self) -> list[int]:
        """FLOPs per nonce of each block, the last one with the final norm and head: linear layers,
        causal attention counted once, and only the last position through the last block's
        query/output/FFN and the head."""
        d, hd, s = self.dim, self.head_dim, self.seq_len
        kv = self.n_kv_heads * hd
        qo = 2 * d * self.n_heads * hd  # wq + wo, per position
        kv_proj = 2 * d * kv  # wk + wv, per position
        ffn = 3 * d * self.hidden_dim
        attn_pairs = s * (s + 1) // 2  # causal (query, key) pairs
        attn = 2 * self.n_heads * hd * attn_pairs  # q.k and p.v

        full_layer = 2 * s * (qo + kv_proj + ffn) + 2 * attn
        last_layer = 2 * s * kv_proj + 2 * (qo + ffn) + 2 * 2 * self.n_heads * hd * s
        head = 2 * d * self.vocab_size
        return [full_layer] * (self.n_layers - 1) + [last_layer + head]

    def flops_per_nonce(self) -> int:
        """The arithmetic floor of one nonce (layer_flops summed)."""
        return sum(self.layer_flops())


PRESETS: dict[str, Params] = {
    "mainnet": Params(
        dim=1792, n_layers=64, n_heads=64, n_kv_heads=64, vocab_size=8196,
        ffn_dim_multiplier=10.0, multiple_of=8192, norm_eps=1e-5, rope_theta=10000.0,
        use_scaled_rope=False, seq_len=256,
    ),
    "testnet": Params(
        dim=1024, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=8196,
        ffn_dim_multiplier=10.0, multiple_of=2048, norm_eps=1e-5, rope_theta=10000.0,
        use_scaled_rope=False, seq_len=128,
    ),
    "bench": Params(
        dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, vocab_size=128256, seq_len=1024,
        rope_theta=500000.0,
    ),
    # Small enough for a CPU demo or test: a few milliseconds a nonce.
    "tiny": Params(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, ffn_dim_multiplier=1.3,
        multiple_of=64, seq_len=8,
    ),
}

DEFAULT_R_TARGET = 1.4013564660458173


def resolve_params(spec: str | Mapping[str, Any] | Params) -> Params:
    """A preset name, a mapping of parameter fields, or a Params: what may arrive over the network.
    JSON text and files are the command line's (`params_from_text`)."""
    if isinstance(spec, Params):
        return spec
    if isinstance(spec, Mapping):
        return Params.from_dict(spec)
    if not isinstance(spec, str):
        raise ParamsError("params", f"must be a preset name or an object, got {type(spec).__name__}")
    if spec.strip() in PRESETS:
        return PRESETS[spec.strip()]
    raise ParamsError("params", f"unknown preset {spec!r:.60} (presets: {', '.join(PRESETS)})")


class InputFileError(ValueError):
    """A file named on the command line cannot be read whole; the message names it and says why."""


def read_input_file(path: str | Path) -> bytes:
    """The bytes of a file named on the command line, at most MAX_INPUT_FILE_BYTES of them."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_INPUT_FILE_BYTES + 1)
    except OSError as e:
        raise InputFileError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    if len(raw) > MAX_INPUT_FILE_BYTES:
        raise InputFileError(f"{str(path)!r} is larger than {MAX_INPUT_FILE_BYTES >> 20} MiB")
    return raw


def params_from_text(text: str) -> Params:
    """The command line's form: a preset name, a JSON object, or `@file.json` holding one."""
    text = text.strip()
    if text.startswith("@"):
        path = Path(text[1:])
        if path.exists() and not path.is_file():
            raise ParamsError("params", f"{str(path)!r} is not a regular file")
        try:
            text = read_input_file(path).decode()
        except InputFileError as e:
            raise ParamsError("params", str(e)) from None
        except UnicodeDecodeError as e:
            raise ParamsError("params", f"cannot read {str(path)!r}: {e}") from None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, and integers too long to convert
            raise ParamsError("params", f"invalid JSON: {e}") from None
        return Params.from_dict(data)
    if text not in PRESETS and _is_json(text):  # '[]', '"tiny"', 3: JSON, but not an object
        raise ParamsError("params", f"{text!r:.60} is not a preset ({', '.join(PRESETS)}) or a JSON object")
    return resolve_params(text)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True
