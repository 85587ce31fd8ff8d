"""The per-nonce inputs (and the weight pool) drawn on the device, bit-identical to numpy's host draws.

numpy draws `Generator(PCG64(SeedSequence(entropy))).standard_normal(...)` in float64 and the
reference casts the result to the model dtype. Here the host derives only each stream's PCG64 state
(two 128-bit numbers); the device computes every position of the stream at once by jump-ahead, runs
numpy's ziggurat on it with exact integer arithmetic, resolves which positions the ziggurat's rare
slow paths consume, and rounds to the model dtype as the reference does: float64 to float32 to the
model dtype, each to nearest even. The slow paths run in float64 inside a scoped `jax.enable_x64`,
the tail's log1p as glibc computes it.
docs/device-draws.md has the design, what is exact, and the measurements.
"""

from __future__ import annotations

import functools
import math
from decimal import Decimal, localcontext
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .draws import input_seed, seed_entropy

__all__ = [
    "initial_states",
    "make_input_drawer",
    "draw_inputs_on_device",
    "draw_pool_on_device",
    "POOL_CHUNK",
]

# ---------------------------------------------------------------------------------------------
# PCG64 (numpy's pcg64.h): a 128-bit LCG; each draw first steps the state, then outputs the
# XSL-RR of the new state. On the device a 128-bit number is 8 limbs of 16 bits held in uint32
# arrays (least significant first), so that limb products fit in 32 bits.

PCG64_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645
_MASK128 = (1 << 128) - 1
_LIMBS = 8
_LIMB_MASK = 0xFFFF


def _pcg64_state(seed: str, n_digests: int) -> tuple[int, int]:
    """The (state, inc) numpy's PCG64 holds right after seeding from rng(seed, n_digests) (docs/algorithm.md §1)."""
    state = np.random.PCG64(np.random.SeedSequence(seed_entropy(seed, n_digests))).state["state"]
    return state["state"], state["inc"]


def _state_words(states: Sequence[tuple[int, int]]) -> np.ndarray:
    """(B, 8) uint32: the state's four little-endian 32-bit words, then the increment's."""
    data = b"".join(s.to_bytes(16, "little") + inc.to_bytes(16, "little") for s, inc in states)
    return np.frombuffer(data, dtype="<u4").reshape(len(states), 8).astype(np.uint32)


# One nonce's generator state as the device takes it: PCG64's state, then inc, 4 uint32 words each.
STATE_SHAPE = (8,)


def initial_states(block_hash: str, public_key: str, nonces: Sequence[int]) -> np.ndarray:
    """The PCG64 states of the nonces' input generators (docs/algorithm.md §5), shape (len(nonces), 8) uint32."""
    return _state_words([_pcg64_state(input_seed(block_hash, public_key, n), 4) for n in nonces])


def _jump(steps: int) -> tuple[int, int]:
    """(A, D) with state_after_steps = A * state + D * inc (mod 2**128)."""
    mult, add = 1, 0
    step_mult, step_add = PCG64_MULTIPLIER, 1
    while steps:
        if steps & 1:
            mult, add = (mult * step_mult) & _MASK128, (add * step_mult + step_add) & _MASK128
        step_mult, step_add = (step_mult * step_mult) & _MASK128, (step_add * step_mult + step_add) & _MASK128
        steps >>= 1
    return mult, add


def _limb_table(values: Sequence[int]) -> np.ndarray:
    """(8, len(values)) uint32: the 16-bit limbs of 128-bit numbers."""
    data = np.frombuffer(b"".join(v.to_bytes(16, "little") for v in values), dtype="<u2")
    return data.reshape(len(values), _LIMBS).T.astype(np.uint32)


class _JumpTables(NamedTuple):
    """Jump-ahead constants for a stream laid out as rows of `row_len` positions.

    Draw j = h*row_len + c uses the state after j+1 steps, which is
    col_mult[c] * base_h + col_add[c] * inc with base_h = row_mult[h] * state0 + row_add[h] * inc.
    """

    row_mult: np.ndarray  # (8, n_rows)
    row_add: np.ndarray
    col_mult: np.ndarray  # (8, row_len)
    col_add: np.ndarray


@functools.lru_cache(maxsize=16)
def _jump_tables(n_rows: int, row_len: int) -> _JumpTables:
    col = [(1, 0)]
    for _ in range(1, row_len):
        mult, add = col[-1]
        col.append(((mult * PCG64_MULTIPLIER) & _MASK128, (add * PCG64_MULTIPLIER + 1) & _MASK128))
    row_step_mult, row_step_add = _jump(row_len)
    row = [_jump(1)]
    for _ in range(1, n_rows):
        mult, add = row[-1]
        row.append(((row_step_mult * mult) & _MASK128, (row_step_mult * add + row_step_add) & _MASK128))
    return _JumpTables(
        _limb_table([m for m, _ in row]), _limb_table([a for _, a in row]),
        _limb_table([m for m, _ in col]), _limb_table([a for _, a in col]),
    )


def _limbs(table: np.ndarray) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(table[k]) for k in range(_LIMBS))


def _limbs_from_words(words: jax.Array) -> tuple[jax.Array, ...]:
    """8 limbs from (..., 4) uint32 little-endian words."""
    return tuple(limb for w in range(4) for limb in (words[..., w] & _LIMB_MASK, words[..., w] >> 16))


def _words_from_limbs(limbs) -> jax.Array:
    """(..., 4) uint32 little-endian words from 8 limbs."""
    return jnp.stack([limbs[2 * w] | (limbs[2 * w + 1] << 16) for w in range(4)], axis=-1)


def _schoolbook(a, b, columns: list) -> list:
    """Limbs (16 bits each, little-endian) of a * b + columns, truncated to len(columns) limbs.

    Every limb product fits in 32 bits; its halves go to two columns, and the carries are
    propagated at the end (column sums stay below 2**32 for these sizes)."""
    n = len(columns)
    for i in range(len(a)):
        for j in range(min(len(b), n - i)):
            product = a[i] * b[j]
            columns[i + j] = columns[i + j] + (product & _LIMB_MASK)
            if i + j + 1 < n:
                columns[i + j + 1] = columns[i + j + 1] + (product >> 16)
    out, carry = [], 0
    for column in columns:
        total = column + carry
        out.append(total & _LIMB_MASK)
        carry = total >> 16
    return out


def _mul_add_128(a, b, c):
    """(a * b + c) mod 2**128 on limb tuples."""
    return tuple(_schoolbook(a, b, list(c)))


def _xsl_rr(state) -> tuple[jax.Array, jax.Array]:
    """PCG64's output of a state: rotate_right(high64 ^ low64, high64 >> 58), as (high32, low32)."""
    x_lo = (state[0] ^ state[4]) | ((state[1] ^ state[5]) << 16)
    x_hi = (state[2] ^ state[6]) | ((state[3] ^ state[7]) << 16)
    rot = state[7] >> 10
    swap = rot >= 32
    a, b = jnp.where(swap, x_lo, x_hi), jnp.where(swap, x_hi, x_lo)
    k = rot & 31
    return a >> k | _shift_left(b, 32 - k), b >> k | _shift_left(a, 32 - k)


def _shift_left(x, s):
    """x << s for uint32 x and 0 <= s <= 32 (0 where s == 32)."""
    return jnp.where(s < 32, x << jnp.minimum(s, 31), 0).astype(jnp.uint32)


def _shift_right(x, s):
    """x >> s for uint32 x and 0 <= s <= 32 (0 where s == 32)."""
    return jnp.where(s < 32, x >> jnp.minimum(s, 31), 0).astype(jnp.uint32)


# ---------------------------------------------------------------------------------------------
# numpy's ziggurat tables (random/src/distributions/ziggurat_constants.h), rebuilt from the
# construction that generated them: 256 strips of area V under exp(-x*x/2), the tail beyond R,
# every operation rounded to the nearest double. The generator's exp returned one ulp above the
# correctly rounded value at strip 38's edge; that is reproduced, and with it every entry equals
# numpy's (tests/test_device_draws.py checks the tables against numpy's sampler).

ZIGGURAT_NOR_R = 3.6541528853610087963519472518
ZIGGURAT_NOR_INV_R = 0.27366123732975827203338247596
_ZIGGURAT_STRIP_AREA = 0.0049286732339746519
_STRIP_WITH_ROUNDED_UP_PDF = 38


def _ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ki, wi, fi) as numpy's ki_double (uint64), wi_double and fi_double."""

    def correctly_rounded(fn: str, value: float) -> float:
        with localcontext() as ctx:
            ctx.prec = 40
            return float(getattr(Decimal(value), fn)())

    edge = [0.0] * 256  # edge[s]: right edge of strip s; strip 0 is the base with the tail
    edge[255] = ZIGGURAT_NOR_R

    def pdf(s: int) -> float:
        p = correctly_rounded("exp", -0.5 * edge[s] * edge[s])
        return math.nextafter(p, 2.0) if s == _STRIP_WITH_ROUNDED_UP_PDF else p

    for s in range(254, 0, -1):
        edge[s] = math.sqrt(-2 * correctly_rounded("ln", pdf(s + 1) + _ZIGGURAT_STRIP_AREA / edge[s + 1]))
    fi = np.array([pdf(s) for s in range(256)])
    wi = np.array(edge) / 2.0**52
    wi[0] = _ZIGGURAT_STRIP_AREA / fi[255] / 2.0**52
    ki = [round(ZIGGURAT_NOR_R * fi[255] / _ZIGGURAT_STRIP_AREA * 2.0**52)]
    ki += [round(edge[s - 1] / edge[s] * 2.0**52) for s in range(1, 256)]
    return np.array(ki, dtype=np.uint64), wi, fi


KI_DOUBLE, WI_DOUBLE, FI_DOUBLE = _ziggurat_tables()
# Probability that a draw leaves the ziggurat's fast path (wedge or tail test needed).
_P_SLOW = float(np.mean(1.0 - KI_DOUBLE.astype(np.float64) / 2.0**52))
# Probability that a draw's attempt goes to the tail.
_P_TAIL = float(1.0 - KI_DOUBLE[0] / 2.0**52) / 256


def _wi_parts() -> tuple[np.ndarray, np.ndarray]:
    """wi = mantissa * 2**exponent with 53-bit integer mantissas: (4 limbs (4, 256), exponents)."""
    fractions, exponents = np.frexp(WI_DOUBLE)
    mantissas = (fractions * 2.0**53).astype(np.uint64)
    limbs = np.stack([(mantissas >> np.uint64(16 * k)) & np.uint64(_LIMB_MASK) for k in range(4)])
    return limbs.astype(np.uint32), (exponents - 53).astype(np.int32)


_WI_LIMBS, _WI_EXPONENTS = _wi_parts()
_KI_HI = (KI_DOUBLE >> np.uint64(32)).astype(np.uint32)
_KI_LO = (KI_DOUBLE & np.uint64(0xFFFFFFFF)).astype(np.uint32)


# ---------------------------------------------------------------------------------------------
# Exact doubles in integers. A `_Double` is (-1)**negative * mantissa * 2**(exponent - 52) with a
# 53-bit mantissa split into mant_hi (21 bits, the leading one included) and mant_lo (32 bits);
# zero has mantissa 0 and exponent _ZERO_EXPONENT.

_ZERO_EXPONENT = -4096


class _Double(NamedTuple):
    negative: jax.Array  # uint32 0/1
    exponent: jax.Array  # int32
    mant_hi: jax.Array  # uint32
    mant_lo: jax.Array  # uint32


def _mul_wide(a, b) -> list[jax.Array]:
    """The exact product of two 4-limb numbers, as 4 little-endian uint32 words."""
    limbs = _schoolbook(a, b, [jnp.zeros_like(a[0] * b[0]) for _ in range(8)])
    return [limbs[2 * w] | (limbs[2 * w + 1] << 16) for w in range(4)]


def _round_product(a, b, exponent_offset, negative) -> _Double:
    """The double nearest (ties to even) to a * b * 2**exponent_offset, a and b 4-limb integers."""
    words = _mul_wide(a, b)
    lead = jnp.zeros_like(words[0]).astype(jnp.int32)
    for _ in range(3):  # whole-word shifts; an all-zero product stays zero
        empty = words[3] == 0
        words = [jnp.where(empty, lower, word) for lower, word in zip([0] + words[:3], words)]
        lead = lead + jnp.where(empty, 32, 0)
    bits = lax.clz(words[3]).astype(jnp.uint32)
    top = _shift_left(words[3], bits) | _shift_right(words[2], 32 - bits)
    second = _shift_left(words[2], bits) | _shift_right(words[1], 32 - bits)
    rest = words[1] | words[0]  # lower bits only matter as "any set"
    lead = lead + bits.astype(jnp.int32)
    # The normalized product is top:second:..., its leading one at bit 63 of top:second.
    mant_hi, mant_lo = top >> 11, (top << 21) | (second >> 11)
    round_bit = (second >> 10) & 1
    sticky = ((second & 0x3FF) != 0) | (rest != 0)
    round_up = (round_bit == 1) & (sticky | ((mant_lo & 1) == 1))
    mant_lo = mant_lo + round_up.astype(jnp.uint32)
    mant_hi = mant_hi + (round_up & (mant_lo == 0)).astype(jnp.uint32)
    carried = mant_hi == (1 << 21)
    mant_hi = jnp.where(carried, 1 << 20, mant_hi).astype(jnp.uint32)
    zero = top == 0
    exponent = 127 - lead + exponent_offset + carried.astype(jnp.int32)
    return _Double(
        negative.astype(jnp.uint32),
        jnp.where(zero, _ZERO_EXPONENT, exponent).astype(jnp.int32),
        jnp.where(zero, 0, mant_hi).astype(jnp.uint32),
        jnp.where(zero, 0, mant_lo).astype(jnp.uint32),
    )


def _double_limbs(x: _Double):
    """The 53-bit mantissa of x as 4 limbs."""
    return (x.mant_lo & _LIMB_MASK, x.mant_lo >> 16, x.mant_hi & _LIMB_MASK, x.mant_hi >> 16)


def _pack_double(x: _Double) -> tuple[jax.Array, jax.Array]:
    """The IEEE binary64 bits of x (normal or zero) as (high32, low32)."""
    zero = x.exponent == _ZERO_EXPONENT
    biased = jnp.where(zero, 0, x.exponent + 1023).astype(jnp.uint32)
    return (x.negative << 31) | (biased << 20) | (x.mant_hi & 0xFFFFF), x.mant_lo


def _unpack_double(hi, lo) -> _Double:
    """A normal, nonzero double from its bits."""
    exponent = ((hi >> 20) & 0x7FF).astype(jnp.int32) - 1023
    return _Double(hi >> 31, exponent, (hi & 0xFFFFF) | (1 << 20), lo)


def _round_to_format(x: _Double, precision: int, min_exponent: int, width: int) -> jax.Array:
    """The bits (in uint32) of x rounded to nearest-even in a binary format, subnormals included,
    and infinity where the rounded magnitude is beyond the format's largest finite value.

    The format has `precision` significand bits and normal exponents from `min_exponent`
    (IEEE: its largest is 1 - min_exponent). q counts ulps of the binade (or of the subnormal range).
    """
    binade = jnp.maximum(x.exponent, min_exponent)
    shift = jnp.minimum(53 - precision + (binade - x.exponent), 55).astype(jnp.uint32)

    def shifted(s):  # low 32 bits of mantissa >> s, for 1 <= s <= 55
        return jnp.where(s >= 32, _shift_right(x.mant_hi, s - 32),
                         _shift_right(x.mant_lo, s) | _shift_left(x.mant_hi, 32 - s))

    def any_below(s):  # mantissa & (2**s - 1) != 0, for 0 <= s <= 54
        lo_mask = _shift_left(jnp.uint32(1), jnp.minimum(s, 32)) - 1
        hi_mask = _shift_left(jnp.uint32(1), jnp.clip(s, 32, 64) - 32) - 1
        return ((x.mant_lo & lo_mask) != 0) | ((x.mant_hi & hi_mask) != 0)

    q = shifted(shift)
    round_bit = shifted(shift - 1) & 1
    round_up = (round_bit == 1) & (any_below(shift - 1) | ((q & 1) == 1))
    q = q + round_up.astype(jnp.uint32)
    infinity = ((1 << (width - precision)) - 1) << (precision - 1)
    max_exponent = 1 - min_exponent
    # Below max_exponent + 1 the sum stays far inside uint32; a carry into the next binade, or past
    # the largest finite value, lands exactly on the next encoding (infinity at the top).
    magnitude = ((jnp.minimum(binade, max_exponent + 1) - min_exponent).astype(jnp.uint32) << (precision - 1)) + q
    magnitude = jnp.where(x.exponent > max_exponent, infinity, jnp.minimum(magnitude, infinity))
    return (x.negative << (width - 1)) | magnitude.astype(jnp.uint32)


def _float32_as_double(bits: jax.Array) -> _Double:
    """The float32 with these bits (finite: zero, subnormal or normal) as an exact `_Double`."""
    negative = bits >> 31
    biased = ((bits >> 23) & 0xFF).astype(jnp.int32)
    fraction = bits & 0x7FFFFF
    # Normal: the 24-bit significand moves up 29 bits into the 53-bit mantissa.
    significand = fraction | (1 << 23)
    normal = _Double(negative, biased - 127, significand >> 3, (significand & 7) << 29)
    # Subnormal: fraction * 2**-149, its leading one at bit `lead` moved up to bit 52.
    lead = 31 - lax.clz(fraction).astype(jnp.int32)
    up = (52 - lead).astype(jnp.uint32)  # 30 ..= 52
    subnormal = _Double(
        negative, lead - 149,
        jnp.where(up >= 32, _shift_left(fraction, up - 32), _shift_right(fraction, 32 - up)),
        _shift_left(fraction, up),
    )
    zero = _Double(negative, jnp.full_like(biased, _ZERO_EXPONENT), jnp.zeros_like(bits), jnp.zeros_like(bits))
    pick = lambda a, b, c: jnp.where(biased > 0, a, jnp.where(fraction == 0, c, b))
    return _Double(*(pick(a, b, c).astype(a.dtype) for a, b, c in zip(normal, subnormal, zero)))


# The reference casts an input with torch.tensor(x, dtype=...): float64 to float32 first, then to a
# half-precision dtype (docs/algorithm.md §5). Both roundings are to nearest even, done here in integers.
def _via_float32(x: _Double, precision: int, min_exponent: int) -> jax.Array:
    return _round_to_format(_float32_as_double(_round_to_format(x, 24, -126, 32)), precision, min_exponent, 16)


def _to_float16(x: _Double) -> jax.Array:
    return lax.bitcast_convert_type(_via_float32(x, 11, -14).astype(jnp.uint16), jnp.float16)


def _to_float32(x: _Double) -> jax.Array:
    return lax.bitcast_convert_type(_round_to_format(x, 24, -126, 32), jnp.float32)


def _to_bfloat16(x: _Double) -> jax.Array:
    return lax.bitcast_convert_type(_via_float32(x, 8, -126).astype(jnp.uint16), jnp.bfloat16)


def _to_float64_words(x: _Double) -> jax.Array:
    """The float64 bits as (..., 2) uint32 [low, high]; numpy's .view(float64) reads them back."""
    hi, lo = _pack_double(x)
    return jnp.stack([lo, hi], axis=-1)


_POOL_SCALE_LIMBS = tuple(int(m) for m in np.frombuffer(
    int(math.frexp(0.02)[0] * 2**53).to_bytes(8, "little"), dtype="<u2"))
_POOL_SCALE_EXPONENT = math.frexp(0.02)[1] - 53


def _to_pool_float32(x: _Double) -> jax.Array:
    """float32(0.0 + 0.02 * x) with numpy's float64 arithmetic (Generator.normal(0.0, 0.02))."""
    scale = tuple(jnp.uint32(limb) for limb in _POOL_SCALE_LIMBS)
    scaled = _round_product(_double_limbs(x), scale, x.exponent - 52 + _POOL_SCALE_EXPONENT, x.negative)
    plus_zero = scaled._replace(negative=jnp.where(scaled.mant_hi == 0, 0, scaled.negative).astype(jnp.uint32))
    return _to_float32(plus_zero)


_ENCODERS: dict[str, Callable[[_Double], jax.Array]] = {
    "float16": _to_float16,
    "bfloat16": _to_bfloat16,
    "float32": _to_float32,
    "float64_words": _to_float64_words,
    "pool_float32": _to_pool_float32,
}


# ---------------------------------------------------------------------------------------------
# The ziggurat (numpy's random_standard_normal). One attempt starts at a draw r:
#   idx = r & 0xff; negative = bit 8; rabs = bits 9..60; x = rabs * wi[idx], negated if negative.
#   rabs < ki[idx]: x is the value (one draw).
#   idx > 0 (wedge): the next draw u decides; accept x if
#     (fi[idx-1] - fi[idx]) * u + fi[idx] < exp(-x*x/2) (two draws, maybe no value).
#   idx == 0 (tail): pairs of draws (u1, u2) until yy + yy > xx * xx with
#     xx = -log1p(-u1) / R, yy = -log1p(-u2); the value is +-(R + xx), sign = bit 8 of rabs.
# A rejected wedge restarts with a fresh attempt at the following draw.


class _Attempt(NamedTuple):
    idx: jax.Array  # int32
    slow: jax.Array  # bool: rabs >= ki[idx]
    x: _Double
    tail_negative: jax.Array  # uint32


def _attempt(raw_hi, raw_lo) -> _Attempt:
    idx = (raw_lo & 0xFF).astype(jnp.int32)
    negative = (raw_lo >> 8) & 1
    rabs_lo = (raw_lo >> 9) | (raw_hi << 23)
    rabs_hi = (raw_hi >> 9) & 0xFFFFF
    ki_hi, ki_lo = jnp.asarray(_KI_HI)[idx], jnp.asarray(_KI_LO)[idx]
    slow = (rabs_hi > ki_hi) | ((rabs_hi == ki_hi) & (rabs_lo >= ki_lo))
    rabs = (rabs_lo & _LIMB_MASK, rabs_lo >> 16, rabs_hi & _LIMB_MASK, rabs_hi >> 16)
    wi = tuple(jnp.asarray(_WI_LIMBS[k])[idx] for k in range(4))
    x = _round_product(rabs, wi, jnp.asarray(_WI_EXPONENTS)[idx], negative)
    return _Attempt(idx, slow, x, (raw_lo >> 17) & 1)


def _unit_double(raw_hi, raw_lo):
    """numpy's next_double: (r >> 11) * 2**-53, in float64 (inside jax.enable_x64)."""
    r = (raw_hi.astype(jnp.uint64) << 32) | raw_lo.astype(jnp.uint64)
    return (r >> 11).astype(jnp.float64) * (1.0 / 9007199254740992.0)


def _wedge_accepts(x: _Double, idx, u_hi, u_lo) -> jax.Array:
    hi, lo = _pack_double(x)
    with jax.enable_x64(True):
        value = lax.bitcast_convert_type((hi.astype(jnp.uint64) << 32) | lo.astype(jnp.uint64), jnp.float64)
        fi = jnp.asarray(FI_DOUBLE, dtype=jnp.float64)
        f_inner, f_outer = fi[jnp.maximum(idx - 1, 0)], fi[idx]
        # The barrier keeps the compiler from fusing multiply and add into an FMA, which C does not.
        scaled = lax.optimization_barrier((f_inner - f_outer) * _unit_double(u_hi, u_lo))
        return scaled + f_outer < jnp.exp(-0.5 * value * value)


def _tail_round(u1_hi, u1_lo, u2_hi, u2_lo) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rounds of the tail loop: (accepted, bits of R + xx as (high32, low32)). The barrier again
    keeps multiply and add apart."""
    with jax.enable_x64(True):
        logs = _log1p(-_unit_double(jnp.concatenate([u1_hi, u2_hi]), jnp.concatenate([u1_lo, u2_lo])))
        log_u1, log_u2 = logs[: u1_hi.shape[0]], logs[u1_hi.shape[0]:]
        xx = lax.optimization_barrier(-ZIGGURAT_NOR_INV_R * log_u1)
        yy = -log_u2
        bits = lax.bitcast_convert_type(ZIGGURAT_NOR_R + xx, jnp.uint64)
        return yy + yy > xx * xx, (bits >> 32).astype(jnp.uint32), (bits & 0xFFFFFFFF).astype(jnp.uint32)


# ---------------------------------------------------------------------------------------------
# glibc's log1p, as numpy's tail calls it, reproduced operation for operation (float64, inside
# jax.enable_x64). glibc runs a build compiled with FMA on x86-64 CPUs that have it (all since
# 2013): fdlibm's s_log1p.c with some multiply-adds fused; which ones is read off its machine
# code. JAX has no FMA, so it is emulated exactly (Boldo and Melquiond's rounding-to-odd
# method); barriers keep XLA from fusing what glibc does not.

def _f64_from_bits(bits: int) -> float:
    return float(np.array(bits, np.uint64).view(np.float64))


_LN2_HI, _LN2_LO = _f64_from_bits(0x3FE62E42FEE00000), _f64_from_bits(0x3DEA39EF35793C76)
_LOG1P_POLY = [_f64_from_bits(b) for b in (  # fdlibm's Lp1 .. Lp7
    0x3FE5555555555593, 0x3FD999999997FA04, 0x3FD2492494229359, 0x3FCC71C51D8E78AF,
    0x3FC7466496CB03DE, 0x3FC39A09D078C69F, 0x3FC2F112DF3E5244)]
_VELTKAMP_SPLITTER = 134217729.0  # 2**27 + 1


def _two_product(a, b):
    """(p, e): p = a*b rounded, p + e = a*b exactly (Dekker's product, no FMA)."""
    ca, cb, p = lax.optimization_barrier((_VELTKAMP_SPLITTER * a, _VELTKAMP_SPLITTER * b, a * b))
    a_hi, b_hi = ca - (ca - a), cb - (cb - b)
    a_lo, b_lo = a - a_hi, b - b_hi
    hh, hl, lh, ll = lax.optimization_barrier((a_hi * b_hi, a_hi * b_lo, a_lo * b_hi, a_lo * b_lo))
    return p, ((hh - p) + hl + lh) + ll


def _two_sum(a, b):
    """(s, e): s = a+b rounded, s + e = a+b exactly (Knuth's sum)."""
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


def _sum_to_odd(a, b):
    """a+b rounded to odd: the rounded sum, moved one ulp toward the exact sum when it is inexact
    and its last bit is even."""
    s, e = _two_sum(a, b)
    bits = lax.bitcast_convert_type(s, jnp.int64)
    step = jnp.where((e > 0) == (s > 0), 1, -1)
    return lax.bitcast_convert_type(bits + jnp.where((e != 0) & ((bits & 1) == 0), step, 0), jnp.float64)


def _fma(a, b, c):
    """a*b + c rounded once to nearest (no overflow or underflow in the operands used here)."""
    p, e = _two_product(a, b)
    high, low = _two_sum(c, p)
    return high + _sum_to_odd(low, e)


def _high_word(x):
    return (lax.bitcast_convert_type(x, jnp.int64) >> 32).astype(jnp.int32)


def _with_high_word(x, high):
    low = lax.bitcast_convert_type(x, jnp.int64) & 0xFFFFFFFF
    return lax.bitcast_convert_type((high.astype(jnp.int64) << 32) | low, jnp.float64)


def _log1p(x):
    """glibc's log1p (x86-64 FMA build) for -1 < x <= 0."""
    hx = _high_word(x)
    # |x| >= 0.2929: log1p(x) = k*ln2 + log1p(f) with 1+x = 2**k * (1+f), sqrt(2)/2 <= 1+f < sqrt(2)
    reduced = hx > np.int32(np.uint32(0xBFD2BEC3).view(np.int32))
    u = 1.0 + x
    hu = _high_word(u)
    k = (hu >> 20) - 1023
    c = jnp.where(k > 0, 1.0 - (u - x), x - (u - 1.0)) / u  # the rounding error of 1+x, relative
    hu = hu & 0xFFFFF
    upper = hu >= 0x6A09E
    u = _with_high_word(u, jnp.where(upper, hu | 0x3FE00000, hu | 0x3FF00000))
    f = jnp.where(reduced, u - 1.0, x)
    k = jnp.where(reduced, k + upper.astype(jnp.int32), 0).astype(jnp.float64)
    small_f = reduced & (jnp.where(upper, (0x100000 - hu) >> 2, hu) == 0)  # |f| < 2**-20
    c = jnp.where(reduced, c, 0.0)

    (half_f_sq,) = lax.optimization_barrier((0.5 * f * f,))
    s = f / (2.0 + f)
    (z,) = lax.optimization_barrier((s * s,))
    p = _LOG1P_POLY
    z2, r2, r3, r4 = lax.optimization_barrier((z * z, _fma(z, p[2], p[1]), _fma(z, p[4], p[3]), _fma(z, p[6], p[5])))
    z4, z2_r2 = lax.optimization_barrier((z2 * z2, z2 * r2))
    (z6,) = lax.optimization_barrier((z2 * z4,))
    r = _fma(z6, r4, _fma(z4, r3, _fma(z, p[0], z2_r2)))
    (w,) = lax.optimization_barrier((s * (half_f_sq + r),))
    k_ln2_lo = _fma(k, _LN2_LO, c)
    general = jnp.where(k == 0, f - (half_f_sq - w), _fma(k, _LN2_HI, -((half_f_sq - (w + k_ln2_lo)) - f)))

    (r_small,) = lax.optimization_barrier((_fma(-f, 0.66666666666666666, 1.0) * half_f_sq,))
    near_power_of_two = jnp.where(f == 0, _fma(k, _LN2_HI, k_ln2_lo), _fma(k, _LN2_HI, -((r_small - k_ln2_lo) - f)))

    (x_sq,) = lax.optimization_barrier((x * x,))
    ax = hx & 0x7FFFFFFF
    tiny = jnp.where(ax < 0x3C900000, x, x - x_sq * 0.5)  # |x| < 2**-29
    return jnp.where(ax < 0x3E200000, tiny, jnp.where(small_f, near_power_of_two, general))


# ---------------------------------------------------------------------------------------------
# The stream of one generator: positions 0..N-1 laid out as rows of _ROW_LEN, every position
# computed independently; the slow paths are resolved on the short list of positions whose
# attempt would leave the fast path.

_ROW_LEN = 1024
_TAIL_BLOCK = 8
_TAIL_ROUNDS_MAX = 64


class _Plan(NamedTuple):
    n_values: int
    n_rows: int  # a pass computes n_rows * _ROW_LEN positions
    slow_capacity: int
    tail_capacity: int
    max_passes: int

    @property
    def n_positions(self) -> int:
        return self.n_rows * _ROW_LEN


def _capacity(probability: float, n_positions: int) -> int:
    """Room for the positions of a kind occurring with `probability`: mean + 12 sigma + 64."""
    expected = probability * n_positions
    return int(expected + 12 * math.sqrt(expected) + 64)


def _plan(n_values: int, margin: int | None = None, slow_capacity: int | None = None,
          tail_capacity: int | None = None) -> _Plan:
    """Positions per pass (n_values plus a margin for the draws the slow paths consume, about 2%
    of them), room for the positions leaving the fast path and for those in the tail, and a
    bound on the passes (one suffices in practice)."""
    if margin is None:
        margin = n_values // 32 + 1024
    n_rows = -(-(n_values + margin) // _ROW_LEN)
    n_positions = n_rows * _ROW_LEN
    slow_capacity = slow_capacity or _capacity(_P_SLOW, n_positions)
    tail_capacity = tail_capacity or _capacity(_P_TAIL, n_positions)
    # A pass stopped by a full list still resolves about capacity / probability positions.
    max_passes = 3 + math.ceil(2 * n_values * (_P_SLOW / slow_capacity + _P_TAIL / tail_capacity))
    return _Plan(n_values, n_rows, slow_capacity, tail_capacity, max_passes)


class _Draws(NamedTuple):
    """Random access to one stream's raw draws, through the jump tables of _jump_tables."""

    bases: tuple  # limbs, (n_rows,): the state before each row's first draw, stepped once
    col_mult: tuple  # limbs, (_ROW_LEN,)
    col_add: tuple  # limbs, (_ROW_LEN,): col_add table times inc
    words: jax.Array  # (8,): the stream's state before draw 0

    @property
    def n_positions(self) -> int:
        return self.bases[0].shape[0] * _ROW_LEN

    def state_at(self, positions: jax.Array) -> tuple[jax.Array, ...]:
        """The states (limbs) whose outputs are the draws at int32 positions < n_positions."""
        row, col = positions // _ROW_LEN, positions % _ROW_LEN
        return _mul_add_128(tuple(m[col] for m in self.col_mult), tuple(b[row] for b in self.bases),
                            tuple(a[col] for a in self.col_add))

    def at(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Raw draws (high32, low32) at int32 positions < n_positions."""
        return _xsl_rr(self.state_at(positions))

    def grid(self, n_rows: int) -> tuple[jax.Array, jax.Array]:
        """Raw draws of positions 0 .. n_rows*_ROW_LEN - 1, shaped (n_rows, _ROW_LEN)."""
        return _xsl_rr(_mul_add_128(tuple(m[None, :] for m in self.col_mult),
                                    tuple(b[:n_rows, None] for b in self.bases),
                                    tuple(a[None, :] for a in self.col_add)))

    def words_after(self, n_draws: jax.Array) -> jax.Array:
        """The state words (8,) after n_draws (0 .. n_positions) draws."""
        stepped = jnp.concatenate([_words_from_limbs(self.state_at(jnp.maximum(n_draws - 1, 0))), self.words[4:]])
        return jnp.where(n_draws == 0, self.words, stepped)


def _draws(words: jax.Array, n_rows: int) -> _Draws:
    """Random access to draws 0 .. n_rows*_ROW_LEN - 1 of the stream whose state is `words` (8,)."""
    state0, inc = _limbs_from_words(words[:4]), _limbs_from_words(words[4:])
    tables = _jump_tables(n_rows, _ROW_LEN)
    zeros = tuple(jnp.zeros_like(limb) for limb in inc)
    bases = _mul_add_128(_limbs(tables.row_mult), state0, _mul_add_128(_limbs(tables.row_add), inc, zeros))
    return _Draws(bases, _limbs(tables.col_mult), _mul_add_128(_limbs(tables.col_add), inc, zeros), words)


class _Stream(NamedTuple):
    values: jax.Array  # (n_values, ...) encoded; NaN where unresolved (never in practice)
    consumed: jax.Array  # int32: draws used by the values
    words_after: jax.Array  # (8,) uint32: the state after those draws
    passes: jax.Array  # int32: parallel passes it took (1 in practice)


def _stream(words: jax.Array, plan: _Plan, encode: Callable[[_Double], jax.Array]) -> _Stream:
    """The first plan.n_values normals of the stream whose PCG64 state is `words` (8,) uint32.

    Each pass resolves the values it can; a pass that stops early (too few positions, more slow
    positions than the room for them, a tail loop past the look-ahead) leaves the next pass to
    go on from where it stopped. One pass suffices in practice.
    """
    n = plan.n_values
    zero = jnp.zeros_like(words[0], dtype=jnp.int32)  # loop carries vary like the input under shard_map
    value_shape = jax.eval_shape(encode, _Double(*(jax.ShapeDtypeStruct((n,), t) for t in
                                                   (jnp.uint32, jnp.int32, jnp.uint32, jnp.uint32))))
    unresolved = jnp.nan if jnp.issubdtype(value_shape.dtype, jnp.floating) else jnp.iinfo(value_shape.dtype).max
    values = jnp.broadcast_to(jnp.full_like(words[0], unresolved, value_shape.dtype), value_shape.shape)

    def unfinished(carry):
        _, done, _, _, passes = carry
        return (done < n) & (passes < plan.max_passes)

    def next_pass(carry):
        words, done, consumed, values, passes = carry
        values, done, used, words = _pass(words, plan, encode, values, done)
        return words, done, consumed + used, values, passes + 1

    words, _, consumed, values, passes = lax.while_loop(unfinished, next_pass, (words, zero, zero, values, zero))
    return _Stream(values, consumed, words, passes)


def _pass(words, plan: _Plan, encode, values, done):
    """One parallel pass over plan.n_positions draws from state `words`: fills values[done:] as
    far as it can resolve; returns (values, done, draws used, state after them)."""
    n, n_positions, capacity = plan.n_values, plan.n_positions, plan.slow_capacity
    draws = _draws(words, plan.n_rows + 1)  # one row past the grid for the slow paths' look-ahead
    last_position = draws.n_positions - 1

    # Every position as if an attempt started there.
    grid = _attempt(*draws.grid(plan.n_rows))
    fast_values = encode(grid.x)
    fast_values = fast_values.reshape((n_positions,) + fast_values.shape[2:])
    slow_flags = grid.slow.reshape(-1).astype(jnp.int32)

    # The positions that leave the fast path, ascending; the unused slots hold n_positions.
    n_slow = jnp.sum(slow_flags)
    slot = jnp.where(slow_flags == 1, jnp.cumsum(slow_flags) - 1, capacity)
    positions = jnp.full(capacity, n_positions, jnp.int32).at[slot].set(
        jnp.arange(n_positions, dtype=jnp.int32), mode="drop")
    in_list = positions < n_positions
    raw_hi, raw_lo = draws.at(jnp.concatenate([jnp.minimum(positions, n_positions - 1), positions + 1]))
    slow = _attempt(raw_hi[:capacity], raw_lo[:capacity])
    is_tail = in_list & (slow.idx == 0)
    wedge_accepts = _wedge_accepts(slow.x, slow.idx, raw_hi[capacity:], raw_lo[capacity:])

    # The tails (about 2% of the list), gathered into their own list; their loops run all at
    # once, _TAIL_BLOCK rounds at a time, while any tail is still rejected (one block almost
    # always settles all: a round rejects with probability 0.062).
    tail_capacity = plan.tail_capacity
    tail_flags = is_tail.astype(jnp.int32)
    n_tails = jnp.sum(tail_flags)
    tail_rank = jnp.cumsum(tail_flags) - 1
    tail_positions = jnp.full(tail_capacity, last_position, jnp.int32).at[
        jnp.where(is_tail, tail_rank, tail_capacity)].set(positions, mode="drop")

    def tail_block(carry):
        rounds, pending, value_hi, value_lo = carry
        u1 = tail_positions[:, None] + 1 + 2 * (rounds[:, None] + jnp.arange(_TAIL_BLOCK))
        u_hi, u_lo = draws.at(jnp.minimum(jnp.concatenate([u1, u1 + 1]), last_position))
        accepted, hi, lo = _tail_round(u_hi[:tail_capacity], u_lo[:tail_capacity],
                                       u_hi[tail_capacity:], u_lo[tail_capacity:])
        first = jnp.argmax(accepted, axis=1)[:, None]
        done = pending & jnp.any(accepted, axis=1)
        rounds = jnp.where(done, rounds + first[:, 0] + 1, rounds + jnp.where(pending, _TAIL_BLOCK, 0))
        return (rounds, pending & ~done,
                jnp.where(done, jnp.take_along_axis(hi, first, axis=1)[:, 0], value_hi),
                jnp.where(done, jnp.take_along_axis(lo, first, axis=1)[:, 0], value_lo))

    # Loop carries are made from the inputs (zeros_like) so that they vary like them under shard_map.
    no_words = jnp.zeros_like(tail_positions, dtype=jnp.uint32)
    tail_rounds, tail_pending, tail_hi, tail_lo = lax.while_loop(
        lambda carry: jnp.any(carry[1] & (carry[0] < _TAIL_ROUNDS_MAX)), tail_block,
        (jnp.zeros_like(tail_positions), jnp.arange(tail_capacity) < n_tails, no_words, no_words))
    tail_unresolved = tail_pending | (tail_positions + 2 * tail_rounds > last_position)
    in_tail_list = jnp.minimum(tail_rank, tail_capacity - 1)
    rounds = tail_rounds[in_tail_list]
    tail_value = _unpack_double(tail_hi[in_tail_list], tail_lo[in_tail_list])._replace(negative=slow.tail_negative)

    # The pass resolves the attempts that start before `cut`: the first position past the grid,
    # past the last listed slow position, at an unlisted tail or at an unresolved one.
    cut = jnp.where(n_slow > capacity, positions[capacity - 1] + 1, n_positions)
    cut = jnp.minimum(cut, jnp.min(jnp.where(is_tail & (tail_rank >= tail_capacity), positions, n_positions)))
    cut = jnp.minimum(cut, jnp.min(jnp.where(tail_unresolved, tail_positions, n_positions)))

    # Draws an attempt at each listed position consumes, and whether it yields a value.
    length = jnp.where(is_tail, 1 + 2 * rounds, 2)
    emits = (is_tail | wedge_accepts).astype(jnp.int32)
    end = positions + length

    # Which listed positions are real attempt starts: those not inside an earlier real attempt.
    # Each round settles at least the first unsettled entry; 3 or 4 rounds (the last one finding
    # no change) do for a bench-size stream.
    def settle(carry):
        starts, _ = carry
        reach = lax.cummax(jnp.where(starts, end, 0))
        covered = jnp.concatenate([jnp.zeros(1, jnp.int32), reach[:-1]]) > positions
        new = in_list & ~covered
        return new, jnp.any(new != starts)

    starts, _ = lax.while_loop(lambda carry: carry[1], settle, (in_list, jnp.full_like(n_slow, True, jnp.bool_)))

    # Each real slow attempt skips draws [position + emits, end); the values are the fast values
    # of the remaining positions, in order, with the tails' values put in. Value k of the pass
    # reads position k + (draws skipped before it).
    skip = jnp.where(starts, length - emits, 0)
    skipped_before = jnp.cumsum(skip) - skip
    first_after = positions + emits - skipped_before
    offset = jnp.zeros(n, jnp.int32).at[jnp.where(skip > 0, first_after, n)].add(skip, mode="drop")
    source = jnp.arange(n, dtype=jnp.int32) + jnp.cumsum(offset)
    n_resolved = jnp.minimum(jnp.sum(source < cut), n - done)

    k = jnp.arange(n, dtype=jnp.int32) - done
    resolved = (k >= 0) & (k < n_resolved)
    new_values = fast_values[jnp.minimum(source[jnp.clip(k, 0, n - 1)], n_positions - 1)]
    values = jnp.where(resolved.reshape((n,) + (1,) * (values.ndim - 1)), new_values, values)
    tail_k = positions - skipped_before
    tail_out = jnp.where(starts & is_tail & (tail_k < n_resolved), done + tail_k, n)
    values = values.at[tail_out].set(encode(tail_value), mode="drop")

    # Draws used: through the last value's attempt if this finishes the stream, else through
    # every attempt that starts before the cut.
    last = source[jnp.maximum(n_resolved - 1, 0)]
    last_slot = jnp.minimum(jnp.sum(positions < last), capacity - 1)
    last_is_slow_start = (positions[last_slot] == last) & starts[last_slot]
    through_last = jnp.where(last_is_slow_start, end[last_slot], last + 1)
    through_cut = jnp.maximum(cut, jnp.max(jnp.where(starts & (positions < cut), end, 0)))
    done = done + n_resolved
    used = jnp.where(done >= n, through_last, through_cut)
    return values, done, used, draws.words_after(used)


# ---------------------------------------------------------------------------------------------
# Public API.

MODEL_DTYPES = ("float16", "bfloat16", "float32")


def _stream_drawer(n_values: int, encoding: str, nonces_per_pass: int | None, **plan_overrides):
    """A function (B, 8) uint32 states -> _Stream of B streams of n_values encoded normals."""
    plan = _plan(n_values, **plan_overrides)
    encode = _ENCODERS[encoding]

    def draw(states: jax.Array) -> _Stream:
        one = functools.partial(_stream, plan=plan, encode=encode)
        if nonces_per_pass is None or states.shape[0] <= nonces_per_pass:
            return jax.vmap(one)(states)
        return lax.map(one, states, batch_size=nonces_per_pass)

    return draw


def make_input_drawer(seq_len: int, dim: int, dtype: str,
                      nonces_per_pass: int | None = 16) -> Callable[[jax.Array], jax.Array]:
    """A traceable function from device states (B, 8) uint32 (see initial_states) to the inputs
    (B, seq_len, dim) in the model dtype, equal to jaxbench.draws.draw_input for each nonce.

    nonces_per_pass bounds how many nonces are drawn at once (the scratch is about 40 bytes per
    normal); None draws the whole batch at once.
    """
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {dtype!r}")
    draw_streams = _stream_drawer(seq_len * dim, dtype, nonces_per_pass)

    def draw(states: jax.Array) -> jax.Array:
        return draw_streams(states).values.reshape(states.shape[0], seq_len, dim)

    return draw


@functools.lru_cache(maxsize=8)
def _jitted_input_drawer(seq_len: int, dim: int, dtype: str):
    return jax.jit(make_input_drawer(seq_len, dim, dtype))


def draw_inputs_on_device(block_hash: str, public_key: str, nonces: Sequence[int],
                          seq_len: int, dim: int, dtype: str) -> jax.Array:
    """The nonces' inputs (len(nonces), seq_len, dim) in the model dtype, drawn on the default device."""
    states = jnp.asarray(initial_states(block_hash, public_key, nonces))
    return _jitted_input_drawer(seq_len, dim, dtype)(states)


# The weight pool (docs/algorithm.md §3) is one stream of up to ~888 M normals: drawn in chunks, each chunk
# starting from the state the previous one left.
POOL_CHUNK = 1 << 24


@functools.partial(jax.jit, static_argnames="size", donate_argnums=0)
def _write_pool_chunk(pool: jax.Array, words: jax.Array, start: jax.Array, *, size: int):
    stream = _stream_drawer(size, "pool_float32", None)(words[None])
    pool = lax.dynamic_update_slice(pool, stream.values[0], (start,))
    return pool, stream.words_after[0]


def draw_pool_on_device(block_hash: str, pool_size: int, chunk: int = POOL_CHUNK) -> jax.Array:
    """The weight pool as float32 on the default device, equal to jaxbench.draws.draw_pool
    (seeded like rng(block_hash, 4)).

    Every chunk has the same size, so one compiled drawer serves the whole pool (the values drawn
    past its end are cut off: nothing follows them in the stream)."""
    words = jnp.asarray(_state_words([_pcg64_state(block_hash, 4)])[0])
    chunk = min(chunk, pool_size)
    n_chunks = -(-pool_size // chunk)
    pool = jnp.zeros(n_chunks * chunk, jnp.float32)
    for start in range(0, n_chunks * chunk, chunk):
        pool, words = _write_pool_chunk(pool, words, jnp.int32(start), size=chunk)
    return pool[:pool_size]
