"""The input cast of docs/algorithm.md §5: float64 → float32 → float16 or bfloat16, both roundings to nearest even,
on the host (draws.cast_input) and on the device (device_draws' encoders), against the rule computed
in exact rationals."""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench import device_draws as dd
from jaxbench.draws import NUMPY_DTYPES, cast_input

# (significand bits, smallest normal exponent) of each format; IEEE: the largest is 1 - the smallest.
FORMATS = {"float32": (24, -126), "float16": (11, -14), "bfloat16": (8, -126)}


def round_exactly(x: Fraction, fmt: str) -> Fraction | float:
    """x rounded to nearest even in the format (subnormals included); ±inf past its largest value."""
    precision, min_exponent = FORMATS[fmt]
    if x == 0:
        return x
    magnitude = abs(x)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1
    ulp = Fraction(2) ** (max(exponent, min_exponent) - precision + 1)
    units, rest = divmod(magnitude, ulp)
    if rest > ulp / 2 or rest == ulp / 2 and units % 2 == 1:
        units += 1
    rounded = units * ulp
    if rounded >= Fraction(2) ** (2 - min_exponent):
        return math.copysign(math.inf, x)
    return rounded if x > 0 else -rounded


def as_float(rounded: Fraction | float, original: float) -> float:
    """A rounded value as a double (exact: every format's values are doubles), zero keeping its sign."""
    return float(rounded) if rounded != 0 else math.copysign(0.0, original)


def two_step(value: float, dtype: str) -> np.ndarray:
    """The reference's cast of one float64, as a 0-d array of the dtype."""
    once = round_exactly(Fraction(value), "float32")
    twice = once if isinstance(once, float) else round_exactly(once, dtype)
    return np.array(as_float(twice, value)).astype(NUMPY_DTYPES[dtype])


EDGES = {
    "float16 double rounding": 1 + 2**-11 + 2**-40,  # float32 gives the tie 1 + 2**-11: even is 1.0
    "bfloat16 double rounding": 1 + 2**-8 + 2**-30,  # float32 gives the tie 1 + 2**-8: even is 1.0
    "float16 tie, kept even": 1 + 2**-11,
    "float16 tie, rounded up": 1 + 3 * 2**-11,
    "bfloat16 tie, rounded up": 1 + 3 * 2**-8,
    "just above a tie in float32 too": 1 + 2**-11 + 2**-23,
    "float16 subnormal tie to zero through float32": 2**-25 + 2**-60,
    "float16 subnormal, above the tie": 2**-25 + 2**-40,
    "float16 smallest subnormal ×1.5": 1.5 * 2**-24,
    "float16 subnormal ×2.5": 2.5 * 2**-24,
    "float16 subnormal near the normals": 1023.5 * 2**-24,
    "float16 largest": 65504.0,
    "float16 below overflow": 65519.99,
    "float16 overflow at the tie": 65520.0,
    "float16 overflow through float32": 65520 - 2**-20,  # direct: 65504; float32 gives 65520 first
    "float16 overflow": 70000.0,
    "bfloat16 largest": (2 - 2**-7) * 2.0**127,
    "bfloat16 overflow": 3.4e38,
    "float32 overflow": 1e39,
    "bfloat16 subnormal": 1.75 * 2**-130,
    "float32 subnormal": 5 * 2**-149 + 2**-160,
    "below float32": 2**-151,
    "a draw's size": 0.7853981633974483,
}
VALUES = [v for x in EDGES.values() for v in (x, -x)]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint16)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_headline_cases_as_torch_gives_them(dtype):
    """Measured with torch 2.11 (docs/algorithm.md §5); a direct float64 cast gives the other value."""
    x = {"float16": 1 + 2**-11 + 2**-40, "bfloat16": 1 + 2**-8 + 2**-30}[dtype]
    assert float(cast_input(np.array([x, -x]), dtype)[0]) == 1.0
    assert float(cast_input(np.array([x, -x]), dtype)[1]) == -1.0


def test_numpys_direct_float16_cast_is_not_the_rule():
    assert float(np.array(1 + 2**-11 + 2**-40).astype(np.float16)) == 1 + 2**-10


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_host_cast_follows_the_two_step_rule(dtype):
    with np.errstate(over="ignore"):
        got = cast_input(np.array(VALUES + [0.0, -0.0]), dtype)
    expected = np.stack([two_step(v, dtype) for v in VALUES + [0.0, -0.0]])
    np.testing.assert_array_equal(_bits(got), _bits(expected))


def _device_double(values: np.ndarray) -> dd._Double:
    """Doubles (normal or zero) in the device's integer form."""
    words = values.view(np.uint32).reshape(-1, 2)
    hi, lo = jnp.asarray(words[:, 1]), jnp.asarray(words[:, 0])
    x = dd._unpack_double(hi, lo)
    zero = jnp.asarray(values == 0)
    return x._replace(exponent=jnp.where(zero, dd._ZERO_EXPONENT, x.exponent),
                      mant_hi=jnp.where(zero, 0, x.mant_hi).astype(jnp.uint32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_device_cast_follows_the_two_step_rule(dtype):
    values = np.array(VALUES + [0.0, -0.0])
    got = np.asarray(jax.jit(dd._ENCODERS[dtype])(_device_double(values)))
    expected = np.stack([two_step(v, dtype) for v in values])
    for i, v in enumerate(values):
        assert _bits(got[i : i + 1]) == _bits(expected[i : i + 1]), f"{v!r}: {got[i]} != {expected[i]}"


def test_device_float32_rounding_and_its_overflow():
    values = np.array(VALUES)
    got = np.asarray(jax.jit(dd._ENCODERS["float32"])(_device_double(values)))
    expected = np.array([as_float(round_exactly(Fraction(v), "float32"), v) for v in VALUES], np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_the_rule_itself_on_known_values():
    """The exact rounding these tests trust, on values whose results are known by hand."""
    assert round_exactly(Fraction(1 + 2**-11 + 2**-40), "float16") == 1 + 2**-10
    assert round_exactly(Fraction(65519), "float16") == 65504
    assert round_exactly(Fraction(65520), "float16") == math.inf
    assert round_exactly(Fraction(-(2**-25)), "float16") == 0
    assert round_exactly(Fraction(3 * 2**-25), "float16") == 2**-23
    assert float(two_step(1 + 2**-11 + 2**-40, "float16")) == 1.0
    assert float(two_step(65520 - 2**-20, "float16")) == math.inf


def _doubles_to_round() -> np.ndarray:
    """Random doubles over the draws' range, and the ties and near-ties of every format."""
    gen = np.random.default_rng(1)
    random = gen.uniform(1, 2, 20000) * np.exp2(gen.integers(-60, 4, 20000)) * gen.choice([-1, 1], 20000)
    cases = [random]
    for precision in (11, 24, 8):  # ties (kept bit even and odd) and near-ties of each format
        kept = gen.integers(1 << (precision - 1), 1 << precision, 400).astype(np.float64)
        scale = np.exp2(gen.integers(-30, 3, 400) - precision)
        for delta in (0.0, 2.0 ** (precision - 50), -(2.0 ** (precision - 50))):
            cases.append((kept + 0.5 + delta) * scale)
    for precision in (11, 8):  # just above a tie of the format: float32 rounds them onto the tie
        cases.append(1 + 2.0**-precision + 2.0**-30 * np.arange(1, 50))
    cases.append(2.0**-24 * np.array([0.5, 0.5 + 2**-30, 1.5, 2.5, 0.25, 1023.5, 1024.5, 1e-3]))
    cases.append(gen.uniform(0, 2.0**-13, 2000))
    return np.concatenate(cases)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_host_and_device_casts_agree_with_numpys_float32_route(dtype):
    """Many values, against numpy's own casts taken explicitly through float32 (both to nearest even)."""
    values = _doubles_to_round()
    expected = values.astype(np.float32).astype(NUMPY_DTYPES[dtype])
    got = np.asarray(jax.jit(dd._ENCODERS[dtype])(_device_double(values)))
    np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))
    np.testing.assert_array_equal(cast_input(values, dtype).view(np.uint8), expected.view(np.uint8))


def test_pool_rounding_matches_numpy():
    """The pool's value, float32(0.0 + 0.02 * x) in float64 arithmetic, as numpy computes it."""
    values = _doubles_to_round()
    got = np.asarray(jax.jit(dd._ENCODERS["pool_float32"])(_device_double(values)))
    np.testing.assert_array_equal(got.view(np.uint32), (0.0 + 0.02 * values).astype(np.float32).view(np.uint32))
