"""Fixed-point encoding of weighted updates: the decoded sum is the weighted mean within the stated
error, clipping counts, no sum of n worst-case contributions wraps and one bit fewer would, and a
mismatched layout is refused."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_federation import federation

from fedsilo.secagg import masking
from fedsilo.secagg.fixed_point import FixedPointCodec

LAYOUT = {"fc.weight": (3, 4), "fc.bias": (4,), "conv": (2, 1, 3)}


def _update(rng, scale=0.5):
    return {key: rng.normal(0, scale, shape) for key, shape in LAYOUT.items()}


def _sum(vectors, bits):
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total = masking.add(total, v, bits)
    return total


def _weighted_mean(updates, weights, bound):
    total = sum(weights)
    return {k: sum(w * np.clip(u[k], -bound, bound) for u, w in zip(updates, weights)) / total for k in LAYOUT}


def _seeded_rounding(monkeypatch, seed: int) -> None:
    """Reproducible rounding for a test: the codec's CSPRNG source replaced by a seeded generator."""
    from fedsilo.secagg import fixed_point

    generator = np.random.default_rng(seed)
    monkeypatch.setattr(fixed_point, "_csprng_uniform", lambda shape: generator.random(shape))


def test_decoded_sum_is_the_weighted_mean_within_the_stated_error(monkeypatch):
    _seeded_rounding(monkeypatch, 4)
    codec = FixedPointCodec(LAYOUT, bound=1.0, frac_bits=12, max_weight=5000, n=6)
    rng = np.random.default_rng(3)
    updates = [_update(rng) for _ in range(6)]
    weights = [int(w) for w in rng.integers(1, 5001, 6)]
    encoded = [codec.encode(u, w)[0] for u, w in zip(updates, weights)]
    mean, total_weight = codec.decode(_sum(encoded, codec.modulus_bits))
    assert total_weight == sum(weights)
    exact, error = _weighted_mean(updates, weights, 1.0), codec.max_error(sum(weights))
    assert 0 < error < 1e-6
    for key in LAYOUT:
        assert mean[key].shape == LAYOUT[key]
        assert np.max(np.abs(mean[key] - exact[key])) <= error


def test_random_rounding_is_unbiased_and_fresh_by_default():
    codec = FixedPointCodec({"x": (1,)}, bound=1.0, frac_bits=2, max_weight=1, n=1)
    draws = [codec.quantize({"x": np.array([0.1])}, 1)[0][0] for _ in range(4000)]
    assert set(draws) == {0, 1} and abs(np.mean(draws) - 0.4) < 0.04     # 0.1 · 2^2 = 0.4
    fresh = {codec.quantize({"x": np.array([0.1])}, 1)[0][0] for _ in range(200)}
    assert fresh == {0, 1}


def test_extreme_values_clip_and_are_counted():
    codec = FixedPointCodec({"a": (4,)}, bound=0.5, frac_bits=8, max_weight=10, n=3)
    update = {"a": np.array([3.0, -7.0, 0.25, 0.5])}
    values, clipped = codec.quantize(update, 10)
    assert clipped == 2
    assert values.tolist() == [1280, -1280, 640, 1280, 10]                 # 10 · ±0.5 · 256; weight last
    mean, weight = codec.decode(codec.encode(update, 10)[0])
    assert weight == 10 and mean["a"].tolist() == [0.5, -0.5, 0.25, 0.5]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_no_wrap_at_the_worst_case_and_the_bits_are_minimal(sign):
    n, max_weight = 7, 1000
    codec = FixedPointCodec({"a": (3,)}, bound=2.0, frac_bits=10, max_weight=max_weight, n=n)
    worst = {"a": np.full(3, sign * 2.0)}
    values, _ = codec.quantize(worst, max_weight)
    assert np.abs(values).max() == codec.max_abs
    mean, weight = codec.decode(_sum([codec.encode(worst, max_weight)[0]] * n, codec.modulus_bits))
    assert weight == n * max_weight and mean["a"].tolist() == [sign * 2.0] * 3
    # One bit fewer: the true worst-case sum no longer fits the signed range, so it wraps.
    true = int(sign) * n * codec.max_abs
    assert _as_signed(true, codec.modulus_bits) == true
    assert _as_signed(true, codec.modulus_bits - 1) != true


def _as_signed(value: int, bits: int) -> int:
    """``value`` reduced mod 2^bits and read as signed, as decode_signed reads a sum."""
    return ((value + (1 << (bits - 1))) % (1 << bits)) - (1 << (bits - 1))


def test_too_many_bits_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"needs 6\d bits; at most 62.*frac_bits|frac_bits.*needs 6\d bits"):
        FixedPointCodec({"a": (1,)}, bound=10.0, frac_bits=40, max_weight=1 << 16, n=100)


def test_layout_mismatch_is_refused():
    codec = FixedPointCodec(LAYOUT, bound=1.0, frac_bits=8, max_weight=10, n=3)
    rng = np.random.default_rng(0)
    update = _update(rng)
    with pytest.raises(ValueError, match="missing \\['conv'\\]"):
        codec.encode({k: v for k, v in update.items() if k != "conv"}, 1)
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        codec.encode(dict(update, extra=np.zeros(1)), 1)
    with pytest.raises(ValueError, match="'fc.bias' has shape \\(5,\\)"):
        codec.encode(dict(update, **{"fc.bias": np.zeros(5)}), 1)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(dict(update, **{"fc.bias": np.full(4, np.nan)}), 1)
    for weight in (-1, 11, True, 1.5):
        with pytest.raises(ValueError, match="weight"):
            codec.encode(update, weight)
    with pytest.raises(ValueError, match="shape"):
        codec.decode(np.zeros(codec.vector_length + 1, dtype=np.uint64))
    with pytest.raises(ValueError, match="summed weight 0"):
        codec.decode(np.zeros(codec.vector_length, dtype=np.uint64))


def test_contributions_summed_by_the_protocol_decode_to_the_weighted_mean():
    codec = FixedPointCodec(LAYOUT, bound=1.0, frac_bits=16, max_weight=100, n=5)
    fed = federation(n=5, t=3, bits=codec.modulus_bits, length=codec.vector_length, window=1)
    fed.setup()
    rng = np.random.default_rng(9)
    updates = {name: _update(rng) for name in fed.names}
    weights = {name: int(rng.integers(1, 101)) for name in fed.names}
    inputs = {name: codec.encode(updates[name], weights[name])[0] for name in fed.names}
    mean, total_weight = codec.decode(fed.round(0, inputs, drop_before_unmask=["dept2"]))
    exact = _weighted_mean([updates[n] for n in fed.names], [weights[n] for n in fed.names], 1.0)
    assert total_weight == sum(weights.values())
    assert all(np.max(np.abs(mean[k] - exact[k])) <= codec.max_error(total_weight) for k in LAYOUT)


def test_rounding_without_a_test_generator_draws_from_the_os_csprng_and_stays_unbiased(monkeypatch):
    import os as os_module

    from fedsilo.secagg import fixed_point

    codec = FixedPointCodec({"x": (1,)}, bound=1.0, frac_bits=0, max_weight=1, n=2)
    calls = []
    real = os_module.urandom
    monkeypatch.setattr(fixed_point.os, "urandom", lambda k: calls.append(k) or real(k))
    draws = [codec.quantize({"x": np.array([0.25])}, 1)[0][0] for _ in range(4000)]
    assert calls and all(k == 8 for k in calls)
    assert set(draws) <= {0, 1} and abs(np.mean(draws) - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)
