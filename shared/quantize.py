"""From clipped float gradients to the integers the secure sum adds, and back.

The department's side of a distributed-DP round (see
docs/explanation/distributed-dp.md), each step vectorized numpy:

1. scale each sampled record's clipped gradient by γ (the granularity: one
   integer unit is 1/γ of a gradient unit);
2. :func:`flatten`: a randomized Hadamard rotation from a *public* seed, so that
   every coordinate carries about ‖x‖/√D and the modular sum rarely wraps;
3. :func:`conditional_round` **each record** to integers (see "Why each record"
   below), with the norm bound of :func:`rounded_bound`;
4. sum the records, add :func:`skellam_noise` (this department's share),
   encode into Z_2^k with k from :func:`bits_for`;

and the coordinator decodes the secure sum, :func:`unflatten` s it and divides by γ.

Why each record is rounded, not the department's sum
---------------------------------------------------
The privacy argument needs a bound on how far one record moves the integer sum.
Rounding each record separately gives ``Σ_i R(x_i)``: adding a record adds
``R(x)``, a vector whose norm conditional rounding *guarantees* to be at most the
bound, independently of every other record.  Rounding the sum instead gives
``R(s + x)`` against ``R(s)``: the rounding noise then depends on the fractional
parts of the whole sum, the two outputs differ by up to one unit in every
coordinate on top of ``x`` (L2 up to ‖x‖ + √D), and the conditional check would
bound the norm of the sum, not one record's share of it.  So records are rounded
one by one: one record's L2 sensitivity is the rounding bound ``Δ2`` and, the
difference being an integer vector (|v_j| ≤ v_j²), ``Δ1 ≤ min(√D Δ2, Δ2²)``
(:func:`record_sensitivity`).  The price is rounding variance ≤ 1/4 per
coordinate *per record* rather than per department, small next to μ.
"""

from __future__ import annotations

import math

import numpy as np

from .csprng import NoiseStream

# Kairouz et al.'s choice of β (probability an unconditioned rounding breaks the bound).
DEFAULT_BETA = math.exp(-0.5)
DEFAULT_MAX_TRIES = 1000


def padded_dim(d: int) -> int:
    """The power of two that the Hadamard transform of a length-``d`` vector needs."""
    if d < 1:
        raise ValueError(f"dimension must be >= 1, got {d}")
    return 1 << (int(d) - 1).bit_length()


def flatten(x: np.ndarray, seed: int) -> np.ndarray:
    """Randomized Hadamard rotation of the last axis of ``x``: ``H · diag(signs) · pad(x) / √D``.

    The signs come from ``seed``, which is **public** (every department and the
    coordinator use the same one; it should be fresh each round) — the rotation
    only spreads the vector across coordinates, it hides nothing.  Orthonormal,
    so the L2 norm is kept exactly (up to float rounding); inverted by
    :func:`unflatten`.
    """
    x = np.asarray(x, dtype=np.float64)
    dim = padded_dim(x.shape[-1])
    padded = np.zeros(x.shape[:-1] + (dim,))
    padded[..., : x.shape[-1]] = x
    return _hadamard(padded * _signs(seed, dim)) / math.sqrt(dim)


def unflatten(y: np.ndarray, seed: int, d: int) -> np.ndarray:
    """The inverse of :func:`flatten` for original length ``d`` (H is symmetric and H·H = D·I)."""
    y = np.asarray(y, dtype=np.float64)
    dim = y.shape[-1]
    if dim != padded_dim(d):
        raise ValueError(f"a rotated vector of length {d} has length {padded_dim(d)}, not {dim}")
    return (_hadamard(y) / math.sqrt(dim) * _signs(seed, dim))[..., :d]


def _signs(seed: int, dim: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=dim)


def _hadamard(x: np.ndarray) -> np.ndarray:
    """Unnormalized fast Walsh–Hadamard transform of the last axis (length a power of two)."""
    dim = x.shape[-1]
    lead = x.shape[:-1]
    out = x.reshape(-1, dim).copy()
    half = 1
    while half < dim:  # log2(D) butterfly passes, each over the whole array
        blocks = out.reshape(out.shape[0], -1, 2, half)
        a, b = blocks[:, :, 0, :].copy(), blocks[:, :, 1, :]
        blocks[:, :, 0, :] += b
        blocks[:, :, 1, :] = a - b
        half *= 2
    return out.reshape(lead + (dim,))


def rounded_bound(c_scaled: float, d: int, beta: float = DEFAULT_BETA) -> float:
    """L2 bound that conditional randomized rounding enforces on a vector of norm ≤ ``c_scaled``.

    Kairouz, Liu & Steinke, "The Distributed Discrete Gaussian Mechanism for
    Federated Learning with Secure Aggregation", ICML 2021 (arXiv:2102.06387,
    conditional randomized rounding, their Theorem 1 as TFF's implementation
    cites it): unconditioned randomized rounding of ``x`` ∈ R^d with ‖x‖ ≤ c
    gives, with probability at least 1 − β,

        ‖R(x)‖² ≤ c² + d/4 + √(2 log(1/β)) · (c + √d / 2),

    and always ‖R(x)‖ ≤ c + √d.  The smaller of the two is the bound; β is then
    the chance that one rounding attempt is rejected.
    """
    if not (c_scaled > 0 and math.isfinite(c_scaled)):
        raise ValueError(f"c_scaled must be positive and finite, got {c_scaled}")
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    always = c_scaled + math.sqrt(d)
    if beta == 0:
        return always
    squared = c_scaled**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c_scaled + math.sqrt(d) / 2)
    return min(always, math.sqrt(squared))


def conditional_round(
    x: np.ndarray, bound: float, stream: NoiseStream | None = None, max_tries: int = DEFAULT_MAX_TRIES
) -> np.ndarray:
    """Round each row of ``x`` to integers at random, redrawing until ‖row‖₂ ≤ ``bound``.

    Each coordinate becomes ``floor(v)`` or ``floor(v) + 1``, the latter with
    probability ``v − floor(v)`` (unbiased); a row whose rounded norm exceeds
    ``bound`` is redrawn (Kairouz et al. 2021's conditional randomized rounding;
    the conditioning adds a small bias they bound).  Rows are independent.  The
    norm check is exact integer arithmetic.  Raises ``RuntimeError`` when a row
    still exceeds the bound after ``max_tries`` draws (with the default bound
    and β, that has probability below β^max_tries).

    ``bound`` must come from the clip norm, ``rounded_bound(γ·C, D, β)``, never
    from the data being rounded: it is the sensitivity the accounting uses.
    """
    stream = stream or NoiseStream()
    values = np.asarray(x, dtype=np.float64)
    rows = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
    floor = np.floor(rows)
    frac = rows - floor
    base = floor.astype(np.int64)
    limit = bound * bound
    out = np.empty_like(base)
    pending = np.arange(rows.shape[0])
    for _ in range(max_tries):
        draw = base[pending] + (stream.uniform(frac[pending].shape) < frac[pending])
        fits = np.einsum("ij,ij->i", draw, draw) <= limit
        out[pending[fits]] = draw[fits]
        pending = pending[~fits]
        if not pending.size:
            return out.reshape(values.shape)
    raise RuntimeError(
        f"{pending.size} row(s) still exceed the norm bound {bound:g} after {max_tries} rounding attempts"
    )


def record_sensitivity(c_scaled: float, d: int, beta: float = DEFAULT_BETA) -> tuple[float, float]:
    """``(Δ1, Δ2)`` of one record's rounded contribution to the integer sum.

    ``c_scaled`` = γ · clip norm, ``d`` the rotated (padded) dimension.  Δ2 is the
    rounding bound; the contribution is an integer vector, so Δ1 ≤ √d Δ2 and
    Δ1 ≤ Δ2² (every nonzero |v_j| ≥ 1, hence |v_j| ≤ v_j²).
    """
    l2 = rounded_bound(c_scaled, d, beta)
    return min(math.sqrt(d) * l2, l2 * l2), l2


def skellam_tail_threshold(mu: float, d: int, tail: float) -> int:
    """Smallest integer t with P(some |Sk(μ)_j| ≥ t, j = 1..d) ≤ ``tail``.

    Chernoff bound from the Skellam moment generating function
    E e^{λX} = exp(μ (cosh λ − 1)) at the optimal λ = asinh(t/μ):
    P(X ≥ t) ≤ exp(−[t·asinh(t/μ) − μ(√(1 + (t/μ)²) − 1)]) (a Bennett-type
    bound: the exponent is ≥ t²/(2(μ + t/3))), doubled for both signs and
    multiplied by d (union bound).
    """
    if mu <= 0:
        return 1
    target = math.log(tail / (2 * d))

    def log_tail(t: float) -> float:
        r = t / mu
        return -(t * math.asinh(r) - mu * (math.sqrt(1 + r * r) - 1))

    hi = 1
    while log_tail(hi) > target:
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:  # log_tail falls in t: bisect for the smallest t that meets the tail
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if log_tail(mid) <= target else (mid, hi)
    return hi


def bits_for(n: int, bound: float, mu: float, d: int, tail: float = 1e-9) -> int:
    """Modulus bits k so that ``n`` rounded records plus Sk(μ) wrap with probability ≤ ``tail``.

    Each record's rounded vector has ‖·‖₂ ≤ ``bound``, so every coordinate of the
    signal sum lies in [−n·bound, n·bound] whatever the data; the noise exceeds
    t = :func:`skellam_tail_threshold` in some coordinate with probability at
    most ``tail``.  Signed values up to n·bound + t then need k bits with
    2^(k−1) > n·bound + t.  ``mu`` here is the total variance actually added
    (all departments' shares, which is more than the privacy μ when shares are
    sized for dropouts and colluders).  A wrap is post-processing: it harms
    accuracy, never privacy.
    """
    if n < 0 or d < 1 or bound < 0 or mu < 0 or not 0 < tail < 1:
        raise ValueError("bits_for needs n >= 0, d >= 1, bound >= 0, mu >= 0 and tail in (0, 1)")
    largest = int(n * math.floor(bound)) + skellam_tail_threshold(mu, d, tail)
    return largest.bit_length() + 1


def skellam_noise(mu: float, size, stream: NoiseStream | None = None) -> np.ndarray:
    """Skellam noise of variance ``mu``: Poisson(μ/2) − Poisson(μ/2), as int64.

    DP noise must be unpredictable to the coordinator: it comes only from a
    :class:`~fedsilo.shared.csprng.NoiseStream` (a fresh one when none is given).
    """
    if stream is not None and not isinstance(stream, NoiseStream):
        raise TypeError("skellam_noise draws only from a NoiseStream (a ChaCha20 keystream)")
    if not (mu >= 0 and math.isfinite(mu)):
        raise ValueError(f"mu must be >= 0 and finite, got {mu}")
    return (stream or NoiseStream()).skellam(mu, size)
