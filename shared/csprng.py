"""Randomness a department keeps from the coordinator: a ChaCha20 keystream and the draws made from it.

Distributed DP's record sampling, randomized rounding and Skellam noise must be
unpredictable to everyone else, so they come from a cryptographic generator, not
numpy's PCG64: :class:`NoiseStream` reads the ChaCha20 keystream (``cryptography``)
of a fresh 256-bit key from ``os.urandom`` as 64-bit words.  Poisson draws use
Hörmann's PTRS (transformed rejection with squeeze, "The transformed rejection
method for generating Poisson random variables", Insurance: Mathematics and
Economics 12, 1993; the algorithm numpy uses) for λ ≥ 10 and inversion below,
vectorized over the pending coordinates; like numpy's they are exact up to float64.
"""

from __future__ import annotations

import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy.special import gammaln

# Re-key well before ChaCha20's 32-bit block counter (2^32 blocks of 64 bytes) could wrap.
REKEY_WORDS = 1 << 30


class NoiseStream:
    """Uniform, Bernoulli, Poisson and Skellam draws from a ChaCha20 keystream keyed from ``os.urandom``."""

    def __init__(self, key: bytes | None = None) -> None:
        self._deterministic = key is not None
        self._key = key
        self._rekey()

    @classmethod
    def for_tests(cls, key: bytes) -> "NoiseStream":
        """A reproducible stream from a fixed 32-byte key: for tests only, never for a real round."""
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError("a test stream's key is 32 bytes")
        return cls(key)

    def _rekey(self) -> None:
        if self._deterministic:  # a test stream moves on deterministically: the next key from its own stream
            key, self._key = self._key, None
            nonce = bytes(16)
        else:
            key, nonce = os.urandom(32), os.urandom(16)
        self._encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._used = 0
        if self._deterministic:
            self._key = self._encryptor.update(bytes(32))
            self._used = 4

    def words(self, count: int) -> np.ndarray:
        """``count`` uniformly random uint64 words."""
        count = int(count)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if self._used + count > REKEY_WORDS:
            self._rekey()
        self._used += count
        return np.frombuffer(self._encryptor.update(bytes(8 * count)), dtype="<u8").astype(np.uint64)

    def uniform(self, size) -> np.ndarray:
        """Floats in [0, 1) with 53 random bits each."""
        shape = _shape(size)
        count = int(np.prod(shape, dtype=np.int64))
        return ((self.words(count) >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(shape)

    def bernoulli(self, p, size) -> np.ndarray:
        """Booleans, each true with probability ``p`` (a scalar or an array broadcast to ``size``)."""
        p = np.asarray(p, dtype=np.float64)
        if np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
            raise ValueError("bernoulli needs probabilities in [0, 1]")
        return self.uniform(size) < p

    def poisson(self, lam: float, size) -> np.ndarray:
        """Poisson(``lam``) draws as int64 (``lam`` a finite number >= 0)."""
        if not (isinstance(lam, (int, float, np.floating)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        shape = _shape(size)
        count = int(np.prod(shape, dtype=np.int64))
        if lam == 0 or count == 0:
            return np.zeros(shape, dtype=np.int64)
        draw = self._ptrs(float(lam), count) if lam >= 10 else self._inversion(float(lam), count)
        return draw.reshape(shape)

    def skellam(self, mu: float, size) -> np.ndarray:
        """Skellam noise of variance ``mu``: Poisson(μ/2) − Poisson(μ/2)."""
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
        return self.poisson(mu / 2, size) - self.poisson(mu / 2, size)

    # --- the samplers ----------------------------------------------------------------------------------------------
    def _inversion(self, lam: float, count: int) -> np.ndarray:
        """λ < 10: the least k with F(k) > U, F the Poisson CDF (tail cut far past float64's resolution)."""
        top = int(lam + 40 * math.sqrt(lam) + 40)
        ks = np.arange(top + 1)
        cdf = np.cumsum(np.exp(-lam + ks * math.log(lam) - gammaln(ks + 1)))
        u = self.uniform(count)
        return np.minimum(np.searchsorted(cdf, u, side="right"), top).astype(np.int64)

    def _ptrs(self, lam: float, count: int) -> np.ndarray:
        slam, loglam = math.sqrt(lam), math.log(lam)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        log_invalpha = math.log(1.1239 + 1.1328 / (b - 3.4))
        vr = 0.9277 - 3.6224 / (b - 2)
        out = np.empty(count, dtype=np.int64)
        pending = np.arange(count)
        while pending.size:
            u = self.uniform(pending.size) - 0.5
            v = self.uniform(pending.size)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / np.maximum(us, 1e-300) + b) * u + lam + 0.43)
            quick = (us >= 0.07) & (v <= vr)
            bad = (k < 0) | ((us < 0.013) & (v > us))
            with np.errstate(divide="ignore", invalid="ignore"):
                slow = (~quick & ~bad) & (
                    np.log(v) + log_invalpha - np.log(a / (us * us) + b)
                    <= -lam + k * loglam - gammaln(np.maximum(k, 0) + 1))
            accept = quick | slow
            out[pending[accept]] = k[accept].astype(np.int64)
            pending = pending[~accept]
        return out


def _shape(size) -> tuple[int, ...]:
    shape = (int(size),) if np.isscalar(size) else tuple(int(s) for s in size)
    if any(s < 0 for s in shape):
        raise ValueError(f"size must be non-negative, got {size!r}")
    return shape
