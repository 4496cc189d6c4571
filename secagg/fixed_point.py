"""A department's FedAvg contribution as a vector of Z_{2^k}, and the weighted mean back from their sum.

Secure aggregation sums integers, so a department sends ``w * clip(Δ)`` in fixed
point: its update Δ (trained − global, a dict of float arrays) is clipped per
coordinate to ±``bound``, multiplied by its weight ``w`` (the example count it
reports, an integer in [0, ``max_weight``]), scaled by 2^``frac_bits`` and
randomly rounded (unbiased: E[q] = w·Δ·2^f), with one extra coordinate holding
``w`` itself.  The coordinator decodes the sum and divides by Σw: the weighted
mean of the clipped updates, within :meth:`FixedPointCodec.max_error` per
coordinate.  The modulus is the least that no sum of ``n`` contributions can wrap.
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import numpy as np

from .masking import MAX_BITS, decode_signed, encode_signed, required_bits

Layout = Mapping[str, tuple[int, ...]]


class FixedPointCodec:
    """Fixed-point encoding of weighted updates with the given ``layout`` (key -> array shape).

    Keys are flattened in sorted order, so both sides agree whatever order a dict was built in.

    Parameters
    ----------
    layout : mapping of str to tuple of int
        The shape of every array of an update.
    bound : float
        Each coordinate of Δ is clipped to [-bound, bound].
    frac_bits : int
        Fractional bits: a coordinate of w·Δ is a multiple of 2^-frac_bits (after random rounding).
    max_weight : int
        The largest weight a department may report.
    n : int
        The most departments whose contributions are summed.
    """

    def __init__(self, layout: Layout, bound: float, frac_bits: int, max_weight: int, n: int) -> None:
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise ValueError(f"the clipping bound must be a finite number > 0, not {bound!r}")
        for what, value, low in (("frac_bits", frac_bits, 0), ("max_weight", max_weight, 1), ("n", n, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{what} must be an integer >= {low}, not {value!r}")
        self.layout = {key: tuple(int(d) for d in layout[key]) for key in sorted(layout)}
        self.sizes = {key: math.prod(shape) for key, shape in self.layout.items()}
        self.bound, self.frac_bits, self.max_weight, self.n = float(bound), frac_bits, max_weight, n
        self.vector_length = sum(self.sizes.values()) + 1
        self._scale = 2.0 ** frac_bits
        # The same float product the encoder forms, so no rounded coordinate can exceed it (rounding is monotone).
        self.max_abs = max(math.ceil(float(max_weight) * self.bound * self._scale), max_weight)
        try:
            self.modulus_bits = required_bits(self.max_abs, n)
        except ValueError:
            bits = (n * self.max_abs).bit_length() + 1
            raise ValueError(f"a sum of {n} contributions of |w·Δ·2^f| up to {self.max_abs} (bound {self.bound}, "
                             f"frac_bits {frac_bits}, max_weight {max_weight}) needs {bits} bits; at most "
                             f"{MAX_BITS}: lower frac_bits, bound or max_weight") from None

    def __repr__(self) -> str:
        return (f"FixedPointCodec(coordinates={self.vector_length - 1}, bound={self.bound}, "
                f"frac_bits={self.frac_bits}, max_weight={self.max_weight}, n={self.n}, "
                f"modulus_bits={self.modulus_bits})")

    @staticmethod
    def layout_of(update: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        """The layout (key -> shape) of ``update``."""
        return {key: tuple(np.shape(value)) for key, value in update.items()}

    def max_error(self, total_weight: int, contributors: int | None = None) -> float:
        """The worst-case error per coordinate of :meth:`decode`'s mean, against the exact weighted mean
        of the clipped updates: each contribution's random rounding is off by less than one unit of
        2^-frac_bits (plus float64 rounding of w·Δ), and the sum is divided by 2^frac_bits · Σw."""
        if total_weight < 1:
            raise ValueError("the error is defined for a total weight of at least 1")
        count = self.n if contributors is None else contributors
        per_contribution = 1.0 + self.max_abs * 2.0 ** -52
        return count * per_contribution / (self._scale * total_weight) + self.bound * 2.0 ** -50

    def quantize(self, update: Mapping[str, np.ndarray], weight: int) -> tuple[np.ndarray, int]:
        """The signed integer vector of ``weight · clip(update)`` (and ``weight`` last), and how many
        coordinates were clipped.  The rounding draws from the OS CSPRNG, and only from it."""
        if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or not 0 <= weight <= self.max_weight:
            raise ValueError(f"the weight must be an integer in [0, {self.max_weight}], not {weight!r}")
        flat = self._flatten(update)
        clipped = int(np.count_nonzero(np.abs(flat) > self.bound))
        scaled = (float(weight) * np.clip(flat, -self.bound, self.bound)) * self._scale
        low = np.floor(scaled)
        uniform = _csprng_uniform(scaled.shape)
        rounded = low + (uniform < (scaled - low))
        return np.append(rounded.astype(np.int64), np.int64(weight)), clipped

    def encode(self, update: Mapping[str, np.ndarray], weight: int) -> tuple[np.ndarray, int]:
        """``quantize``'s vector as an element of Z_{2^modulus_bits} (uint64), and the clipped count."""
        values, clipped = self.quantize(update, weight)
        return encode_signed(values, self.modulus_bits), clipped

    def decode(self, total: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        """The weighted mean update (key -> float64 array) and Σw, from the sum of encoded vectors."""
        values = np.asarray(total)
        if values.shape != (self.vector_length,):
            raise ValueError(f"a summed vector has shape ({self.vector_length},) for this layout, not {values.shape}")
        signed = decode_signed(values, self.modulus_bits)
        total_weight = int(signed[-1])
        if not 0 < total_weight <= self.n * self.max_weight:
            raise ValueError(f"the summed weight {total_weight} is outside [1, {self.n * self.max_weight}]: "
                             "no contribution, or a sum of other vectors")
        mean = signed[:-1].astype(np.float64) / (self._scale * total_weight)
        out, start = {}, 0
        for key, shape in self.layout.items():
            out[key] = mean[start:start + self.sizes[key]].reshape(shape)
            start += self.sizes[key]
        return out, total_weight

    def _flatten(self, update: Mapping[str, np.ndarray]) -> np.ndarray:
        if set(update) != set(self.layout):
            raise ValueError(f"the update's keys differ from the layout's: missing {sorted(set(self.layout) - set(update))}, "
                             f"unexpected {sorted(set(update) - set(self.layout))}")
        parts = []
        for key, shape in self.layout.items():
            array = np.asarray(update[key], dtype=np.float64)
            if array.shape != shape:
                raise ValueError(f"'{key}' has shape {array.shape}, the layout says {shape}")
            parts.append(array.ravel())
        flat = np.concatenate(parts) if parts else np.zeros(0)
        if not np.all(np.isfinite(flat)):
            raise ValueError("the update has NaN or infinite coordinates")
        return flat


def _csprng_uniform(shape) -> np.ndarray:
    """Uniform floats in [0, 1) with 53 random bits each, from ``os.urandom``: the rounding of what a
    department masks is unpredictable to the coordinator, like every other secret the protocol draws."""
    count = int(np.prod(shape, dtype=np.int64))
    words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(11)
    return (words.astype(np.float64) * 2.0 ** -53).reshape(shape)
