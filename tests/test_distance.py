import math

import numpy as np

from jaxbench.distance import binomial_sf, fraud_report, split_target


def test_binomial_tail_matches_direct_sum():
    n, p = 30, 0.05
    for k in (0, 1, 3, 10, 30):
        direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert math.isclose(binomial_sf(k, n, p), direct, rel_tol=1e-9)
    assert binomial_sf(31, 30, p) == 0.0


def test_fraud_report_counts_invalid_and_nan():
    report = fraud_report(np.array([1.0, 1.0, 1.0]), np.array([1.39, 1.5, np.nan]), r_target=1.4)
    assert report["n_invalid"] == 2 and report["invalid_indices"] == [1, 2]
    assert report["fraud"] is (report["p_value"] < 1e-7)


def test_split_target_keeps_float64_precision():
    t = np.random.default_rng(0).standard_normal(1000)
    hi, lo = split_target(t)
    assert np.max(np.abs(hi.astype(np.float64) + lo.astype(np.float64) - t)) < 1e-13
