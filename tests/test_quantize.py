"""Rotation, conditional rounding, modulus bits and Skellam noise (shared/quantize.py).

Statistical checks use fixed seeds, so they are deterministic; their thresholds
(4 standard errors per coordinate on a few coordinates) would also hold for
almost every other seed.
"""

import math

import numpy as np
import pytest

from scipy.linalg import hadamard

from fedsilo.secagg import masking
from fedsilo.shared import quantize as qz
from fedsilo.shared.csprng import NoiseStream

_COUNTER = iter(range(1, 1 << 30))


def _stream():
    """A reproducible noise stream for a test (a real round draws a fresh key from os.urandom)."""
    return NoiseStream.for_tests(next(_COUNTER).to_bytes(32, "little"))


# --- randomized Hadamard rotation -----------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3, 8, 1000, 1024])
def test_flatten_round_trip_and_norm(d):
    rng = np.random.default_rng(d)
    x = rng.normal(size=(4, d)) * 10
    y = qz.flatten(x, seed=12345)
    assert y.shape == (4, qz.padded_dim(d))
    assert np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=0, atol=1e-9)
    assert np.max(np.abs(qz.unflatten(y, seed=12345, d=d) - x)) < 1e-9
    assert np.max(np.abs(qz.unflatten(qz.flatten(x[0], 7), 7, d) - x[0])) < 1e-9  # one vector too


def test_flatten_is_the_hadamard_matrix_times_public_signs():
    x = np.arange(1.0, 6.0)
    signs = np.random.default_rng(99).choice(np.array([-1.0, 1.0]), size=8)
    padded = np.concatenate([x, np.zeros(3)])
    expected = hadamard(8) @ (signs * padded) / math.sqrt(8)
    assert np.allclose(qz.flatten(x, 99), expected, atol=1e-12)
    assert np.array_equal(qz.flatten(x, 99), qz.flatten(x, 99))  # the seed is all there is
    assert not np.allclose(qz.flatten(x, 99), qz.flatten(x, 100))


def test_flatten_spreads_a_spike_over_every_coordinate():
    spike = np.zeros(256)
    spike[17] = 5.0
    assert np.allclose(np.abs(qz.flatten(spike, 3)), 5.0 / 16)


def test_unflatten_refuses_the_wrong_length():
    with pytest.raises(ValueError, match="length"):
        qz.unflatten(np.zeros(8), seed=1, d=9)
    with pytest.raises(ValueError, match="dimension"):
        qz.padded_dim(0)


# --- conditional randomized rounding --------------------------------------------------------


def test_rounded_bound_is_kairouz_et_al():
    c, d, beta = 30.0, 1024, math.exp(-0.5)
    expected = math.sqrt(c**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2))
    assert qz.rounded_bound(c, d) == pytest.approx(expected)
    assert qz.rounded_bound(c, d, beta=0.0) == pytest.approx(c + math.sqrt(d))
    assert qz.rounded_bound(0.5, 1, beta=1e-12) == pytest.approx(0.5 + 1)  # the always-bound is smaller
    assert qz.rounded_bound(30.0, 1024, 0.1) > qz.rounded_bound(30.0, 1024, 0.5)
    for bad in (dict(c_scaled=0.0, d=4), dict(c_scaled=1.0, d=0), dict(c_scaled=1.0, d=4, beta=1.0)):
        with pytest.raises(ValueError):
            qz.rounded_bound(**bad)


def test_unconditioned_rounding_breaks_the_bound_at_most_beta_often():
    rng = np.random.default_rng(0)
    c, d, beta = 4.0, 64, 0.2
    x = qz.flatten(rng.normal(size=(20_000, d)), 1)
    x *= c / np.linalg.norm(x, axis=1, keepdims=True)
    floor = np.floor(x)
    draws = floor + (rng.random(x.shape) < x - floor)
    assert np.mean(np.linalg.norm(draws, axis=1) > qz.rounded_bound(c, d, beta)) <= beta


def _within_standard_errors(draws, x, k):
    frac = x - np.floor(x)
    standard_error = np.sqrt(frac * (1 - frac) / draws.shape[0])
    return np.all(np.abs(draws.mean(axis=0) - x) <= k * standard_error + 1e-12)


def test_randomized_rounding_is_unbiased():
    x = np.array([0.3, -1.7, 2.5, 0.05, -0.95, 3.0, -2.2, 0.61])
    draws = qz.conditional_round(np.tile(x, (40_000, 1)), math.inf, _stream())
    assert _within_standard_errors(draws, x, 4)
    assert set(np.unique(draws - np.floor(x))) <= {0, 1}  # floor or ceil, nothing else


def test_conditioning_on_the_bound_biases_little():
    """Where the default bound is rarely hit (high d), still unbiased within 5 s.e. on 1024 coordinates.

    In low dimension the conditioning shrinks toward 0 measurably (here: up to
    0.04 per coordinate at ‖x‖ = 5.3, d = 8), which Kairouz et al. bound; it costs
    accuracy, not privacy.
    """
    rng = np.random.default_rng(43)
    x = qz.flatten(rng.normal(size=1024), 5)
    x *= 30.0 / np.linalg.norm(x)
    draws = qz.conditional_round(np.tile(x, (4000, 1)), qz.rounded_bound(30.0, 1024), _stream())
    assert _within_standard_errors(draws, x, 5)
    small = np.array([0.3, -1.7, 2.5, 0.05, -0.95, 3.0, -2.2, 0.61])
    tight = qz.conditional_round(np.tile(small, (40_000, 1)), qz.rounded_bound(5.3, 8), _stream())
    assert np.max(np.abs(tight.mean(axis=0) - small)) < 0.06


def test_the_norm_bound_always_holds_and_gives_the_sensitivities():
    rng = np.random.default_rng(7)
    c, d = 3.0, 16
    x = rng.normal(size=(50_000, d))
    x *= c / np.linalg.norm(x, axis=1, keepdims=True)
    bound = qz.rounded_bound(c, d)
    rounded = qz.conditional_round(x, bound, _stream())
    assert rounded.dtype == np.int64
    assert np.max(np.linalg.norm(rounded, axis=1)) <= bound
    l1, l2 = qz.record_sensitivity(c, d)
    assert l2 == bound and l1 == pytest.approx(min(math.sqrt(d) * bound, bound**2))
    assert np.max(np.abs(rounded).sum(axis=1)) <= l1


def test_the_retry_limit_raises():
    with pytest.raises(RuntimeError, match="after 5 rounding attempts"):
        qz.conditional_round(np.full((2, 64), 0.5), bound=0.5, stream=_stream(), max_tries=5)


# --- modulus bits ------------------------------------------------------------------------------


def test_bits_for_is_monotone():
    base = dict(n=100, bound=40.0, mu=1e4, d=1024, tail=1e-9)
    bits = qz.bits_for(**base)
    for key, bigger in (("n", 10_000), ("bound", 4000.0), ("mu", 1e8), ("d", 2**20)):
        assert qz.bits_for(**(base | {key: bigger})) >= bits
    assert qz.bits_for(**(base | {"n": 10**6})) > bits
    assert qz.bits_for(**(base | {"tail": 1e-3})) <= bits
    assert qz.skellam_tail_threshold(1e4, 1024, 1e-12) > qz.skellam_tail_threshold(1e4, 1024, 1e-3)
    with pytest.raises(ValueError):
        qz.bits_for(n=1, bound=1.0, mu=1.0, d=1, tail=0.0)


def test_skellam_tail_threshold_holds_by_monte_carlo():
    mu, d, tail = 50.0, 4, 0.01
    t = qz.skellam_tail_threshold(mu, d, tail)
    noise = qz.skellam_noise(mu, (200_000, d), _stream())
    exceeded = np.mean(np.abs(noise).max(axis=1) >= t)
    assert exceeded <= tail
    assert t < 10 * math.sqrt(mu)  # and not absurdly loose


def test_a_secure_sum_at_bits_for_does_not_wrap():
    """Worst-case signals plus noise, summed in Z_2^k as secagg does, decode to the true sum."""
    n, bound, mu, d, tail = 6, 5.0, 40.0, 8, 1e-3
    bits = qz.bits_for(n, bound, mu, d, tail)
    trials = 20_000
    signal = np.full((trials, d), n * math.floor(bound), dtype=np.int64)  # beyond any real sum
    signal[: trials // 2] *= -1
    noisy = signal + qz.skellam_noise(mu, (trials, d), _stream())

    def wraps(k):
        half = 1 << (k - 1)
        return int(np.sum(np.any((noisy < -half) | (noisy >= half), axis=1)))

    assert wraps(bits) <= tail * trials
    assert wraps(bits - 1) > tail * trials  # one bit fewer does wrap: the check can fail
    # Through the secure-aggregation arithmetic: three departments' shares sum exactly.
    bits = max(bits, masking.MIN_BITS)
    half = 1 << (bits - 1)
    fits = noisy[np.all((noisy >= -half) & (noisy < half), axis=1)][:3]
    parts = [fits[0] - fits[1], fits[1], fits[2] - fits[0]]  # any integer split of a sum
    total = np.zeros(d, dtype=np.uint64)
    for part in parts:
        total = masking.add(total, part.astype(np.uint64) & masking.modulus_mask(bits), bits)
    assert np.array_equal(masking.decode_signed(total, bits), fits[2])


# --- Skellam noise -------------------------------------------------------------------------


def test_skellam_noise_has_mean_zero_and_variance_mu():
    mu, size = 37.5, 400_000
    noise = qz.skellam_noise(mu, size, _stream())
    assert noise.dtype == np.int64
    assert abs(noise.mean()) <= 4 * math.sqrt(mu / size)
    # Var of the sample variance: (2μ² + μ)/n (Skellam's fourth cumulant is μ).
    assert abs(noise.var() - mu) <= 4 * math.sqrt((2 * mu**2 + mu) / size)
    # Closed under summation: ten shares of μ/10 sum to variance μ.
    shares = sum(qz.skellam_noise(mu / 10, size, _stream()) for _ in range(10))
    assert abs(shares.var() - mu) <= 4 * math.sqrt((2 * mu**2 + mu) / size)


def test_skellam_noise_refuses_a_numpy_generator_or_a_bad_mu():
    assert np.array_equal(qz.skellam_noise(0.0, 5, _stream()), np.zeros(5, dtype=np.int64))
    with pytest.raises(TypeError, match="NoiseStream"):
        qz.skellam_noise(1.0, 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="mu"):
        qz.skellam_noise(-1.0, 5, _stream())
