"""ε of the distributed Skellam mechanism: the maths, apart from the ledger's bookkeeping.

A round of distributed DP is one DP-SGD step over the federation: every
department Poisson-samples its records at rate ``q``, rounds each sampled
record's scaled, rotated, clipped gradient to integers (:mod:`.quantize`), sums
them, adds its share of Skellam noise, and the secure sum releases
``Σ rounded records + Sk(μ)`` (Skellam is closed under summation).  The history
of a run is a list of :class:`SkellamMechanism` ``(mu, l1, l2, sample_rate, steps)``.

The analysis, in Rényi DP at integer orders, composed by addition:

1. **Skellam** (Agarwal, Kairouz & Liu, "The Skellam Mechanism for Differentially
   Private Federated Learning", NeurIPS 2021, arXiv:2110.04995, Theorem 3.5: the
   RDP of the multi-dimensional Skellam mechanism): adding ``Sk(μ)`` independently to each coordinate of an
   integer query with L1 / L2 sensitivity ``Δ1`` / ``Δ2`` is (α, ε(α))-RDP for
   every integer α > 1 with::

       ε(α) = α Δ2² / (2μ) + min( ((2α − 1) Δ2² + 6 Δ1) / (4μ²),  3 Δ1 / (2μ) )

   Their ``Sk(μ)`` has probability mass ``e^(−μ) I_k(μ)``: the difference of two
   Poisson(μ/2), variance ``μ`` — the same μ as here and as
   :func:`.quantize.skellam_noise`.  The first term is the Gaussian mechanism's
   RDP at variance μ; the second is the price of discreteness, O(1/μ²).
2. **Poisson subsampling** under add/remove, at integer orders α ≥ 2, for any
   mechanism with an RDP curve ε(·) that holds in both directions (Steinke,
   "Composition of Differential Privacy & Privacy Amplification by Subsampling",
   arXiv:2210.00597, 2022, §6: Rényi DP amplification by Poisson subsampling)::

       (α−1) ε_q(α) ≤ log[ (1−q)^(α−1) (1 + (α−1) q)
                           + Σ_{l=2..α} C(α,l) q^l (1−q)^(α−l) e^((l−1) ε(l)) ]

   Adding a record is the binomial expansion of E_P[(1 − q + q·Q/P)^α], term by
   term bounded by e^((l−1) ε(l)).  Removing it is bounded by the same sum: the
   mixture's divergence from the other side lies below a convex combination of
   the two adding-directions, for (P, Q) and for (Q, P) (``tests/test_skellam.py``
   checks this pointwise and on exact Skellam mixtures).  On the Gaussian's exact
   curve the sum is Mironov, Talwar & Zhang's (2019) subsampled-Gaussian RDP, and
   it replaces the general bound of Zhu & Wang (ICML 2019), whose factor 3 on the
   l ≥ 3 terms keeps ε_q(α) above log(1 + 2·P[Bin(α, q) ≥ 3])/(α − 1) however
   large μ is.  Evaluated in log space (exact binomials through ``lgamma``,
   ``logsumexp``); the minimum with ε(α) is taken as well: subsampling never
   costs privacy (a Poisson-subsampled mechanism is a mixture of the mechanism's
   outputs, and Rényi divergence is jointly quasi-convex).
3. **Composition** adds RDP curves; **(ε, δ)** comes from dp-accounting's
   ``compute_epsilon`` (Canonne, Kamath & Steinke 2020, Proposition 12; Asoodeh
   et al. 2020), the conversion its RDP accountant uses.

The neighbouring relation is add/remove one record, as for Opacus' DP-SGD.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy.special import gammaln, logsumexp

# Integer orders: every one to 128 (the optimum for practical ε sits well below),
# then a sparse tail to 256 for very small ε.
ORDERS: tuple[int, ...] = tuple(range(2, 129)) + (144, 160, 192, 224, 256)
# mu_for_target's bisection stops when the bracket is this narrow, relatively.
MU_REL_TOL = 1e-4
# Beyond this μ calibration gives up: no secure-aggregation modulus holds such noise.
MU_MAX = 1e30


@dataclass(frozen=True)
class SkellamMechanism:
    """``steps`` rounds of Poisson-subsampled Skellam noise of total variance ``mu``.

    Parameters
    ----------
    mu
        Skellam variance parameter of the noise in the *sum* (integer units), the
        part that the privacy argument relies on (see :func:`share_mu`).
    l1, l2
        L1 and L2 sensitivity of one record's contribution to the sum, after
        scaling and rounding (:func:`.quantize.record_sensitivity`).
    sample_rate
        Poisson sampling rate of records, in (0, 1].
    steps
        Number of rounds (each one noisy DP-SGD step).
    """

    mu: float
    l1: float
    l2: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        for name in ("mu", "l1", "l2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                value > 0 and math.isfinite(value)
            ):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")

    @property
    def noise_multiplier(self) -> float:
        """The Gaussian-equivalent σ = √μ / Δ2 (shown and checked against policies; ε uses μ, Δ1, Δ2)."""
        return math.sqrt(self.mu) / self.l2

    def rdp(self, orders: Sequence[int] = ORDERS) -> np.ndarray:
        """RDP of all ``steps`` rounds at ``orders``."""
        if not self.steps:
            return np.zeros(len(orders))

        def base(alphas: np.ndarray) -> np.ndarray:
            return skellam_rdp(self.mu, self.l1, self.l2, alphas)

        return self.steps * poisson_subsampled_rdp(base, self.sample_rate, orders)


def skellam_rdp(mu: float, l1: float, l2: float, orders) -> np.ndarray:
    """RDP of the unsubsampled d-dimensional Skellam mechanism (Agarwal et al. 2021, Theorem 3.5).

    Valid at integer orders > 1; ``mu`` is the variance of each coordinate's noise.
    """
    alphas = _integer_orders(orders)
    gaussian = alphas * l2**2 / (2 * mu)
    discreteness = np.minimum(((2 * alphas - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
    return gaussian + discreteness


def poisson_subsampled_rdp(
    base: Callable[[np.ndarray], np.ndarray], q: float, orders: Sequence[int] = ORDERS
) -> np.ndarray:
    """Upper bound on the RDP of ``base`` under Poisson sampling at ``q`` (Steinke 2022; module docstring).

    ``base`` maps an array of integer orders (≥ 2) to the mechanism's RDP at
    those orders.  Log-space throughout, so orders to 256 and ``q`` up to 1 do not
    overflow; the result is also capped by ``base`` itself.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    alphas = _integer_orders(orders)
    unsampled = np.asarray(base(alphas), dtype=float)
    if q == 0:
        return np.zeros(len(alphas))
    if q == 1:
        return unsampled
    top = int(alphas.max())
    ls = np.arange(2, top + 1)
    eps_l = np.asarray(base(ls), dtype=float)  # ε(l), l = 2..top
    log_q, log_1mq = math.log(q), math.log1p(-q)
    result = np.empty(len(alphas))
    for i, alpha in enumerate(alphas.astype(int)):
        l = ls[: alpha - 1]  # 2..alpha
        log_binom = gammaln(alpha + 1) - gammaln(l + 1) - gammaln(alpha - l + 1)
        log_terms = log_binom + l * log_q + (alpha - l) * log_1mq + (l - 1) * eps_l[: alpha - 1]
        first = (alpha - 1) * log_1mq + math.log1p((alpha - 1) * q)  # (1-q)^(α-1) (αq - q + 1)
        bound = logsumexp(np.append(log_terms, first)) / (alpha - 1)
        result[i] = min(bound, unsampled[i])
    return result


def rdp(history: Iterable[SkellamMechanism], orders: Sequence[int] = ORDERS) -> np.ndarray:
    """RDP curve of a whole history (composition adds)."""
    total = np.zeros(len(orders))
    for mechanism in history:
        total = total + mechanism.rdp(orders)
    return total


def epsilon(history: Iterable[SkellamMechanism], delta: float, orders: Sequence[int] = ORDERS) -> float:
    """Whole-history ε at ``delta`` (0.0 for an empty history)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    history = [m for m in history if m.steps]
    if not history:
        return 0.0
    return rdp_to_epsilon(orders, rdp(history, orders), delta)


def rdp_to_epsilon(orders: Sequence[int], curve: Sequence[float], delta: float) -> float:
    """dp-accounting's RDP → (ε, δ) conversion (Canonne, Kamath & Steinke 2020, Prop. 12)."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    eps, _ = compute_epsilon(list(orders), list(curve), delta)
    return float(eps)


def mu_for_target(
    epsilon: float, delta: float, l1: float, l2: float, q: float, steps: int,
    orders: Sequence[int] = ORDERS,
) -> float:
    """Smallest Skellam variance μ whose ``steps`` rounds stay ≤ ``epsilon`` at ``delta``.

    ε falls monotonically as μ grows (every RDP term does, and so does the
    conversion), so bisection on log μ works.  The bracket is narrowed to a
    relative width of :data:`MU_REL_TOL` and its upper, feasible end returned: the
    result always meets the target, and is at most 0.01 % larger than needed.
    Raises ``ValueError`` when no μ up to :data:`MU_MAX` reaches the target.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be positive and finite, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")

    def eps_at(mu: float) -> float:
        return rdp_to_epsilon(orders, SkellamMechanism(mu, l1, l2, q, steps).rdp(orders), delta)

    if not steps:
        return 0.0
    SkellamMechanism(1.0, l1, l2, q, steps)  # validates the other arguments
    # Start near the Gaussian answer's scale (μ = σ² Δ2²) and double or halve.
    upper = max(float(l2) ** 2, 1.0)
    while eps_at(upper) > epsilon:
        upper *= 4
        if upper > MU_MAX:
            raise ValueError(
                f"ε={epsilon:g} at δ={delta:g} is unreachable: even μ={MU_MAX:g} gives more"
            )
    lower = upper / 4
    while eps_at(lower) <= epsilon:
        upper, lower = lower, lower / 4
    while upper - lower > MU_REL_TOL * upper:
        middle = math.sqrt(upper * lower)
        upper, lower = (middle, lower) if eps_at(middle) <= epsilon else (upper, middle)
    return upper


def share_mu(mu: float, departments: int, dropouts: int, colluders: int) -> float:
    """Skellam variance each department adds so that the honest survivors alone carry ``mu``.

    Up to ``dropouts`` departments may send nothing and up to ``colluders`` may
    reveal their own shares to the coordinator; the remaining
    ``departments − dropouts − colluders`` shares must sum to μ, so each is
    ``μ / (departments − dropouts − colluders)``.  Raises when none would remain.
    """
    honest = departments - dropouts - colluders
    if dropouts < 0 or colluders < 0:
        raise ValueError("dropouts and colluders must be >= 0")
    if honest < 1:
        raise ValueError(
            f"{departments} departments with {dropouts} dropouts and {colluders} colluders "
            "leave no honest survivor to carry the noise"
        )
    return mu / honest


def _integer_orders(orders) -> np.ndarray:
    alphas = np.atleast_1d(np.asarray(orders, dtype=float))
    if np.any(alphas < 2) or np.any(alphas != np.round(alphas)):
        raise ValueError("the Skellam and subsampling bounds hold at integer orders >= 2 only")
    return alphas


@dataclass(frozen=True)
class SkellamSetup:
    """How a distributed-DP round was set up: what the audit needs to re-derive its sensitivity and trust.

    Parameters
    ----------
    granularity
        γ, integer units per gradient unit (the scaled clip norm is γ·C).
    dimension
        D, the rotated (padded) dimension, a power of two.
    beta
        The conditional rounding's β (Kairouz et al. 2021), in [0, 1).
    participants, threshold, colluders
        n, t and c: a released sum holds at least t contributions, at most c of them
        from departments colluding with the coordinator, so each share is μ / (t − c).
    """

    granularity: float
    dimension: int
    beta: float
    participants: int
    threshold: int
    colluders: int

    def __post_init__(self) -> None:
        if not (isinstance(self.granularity, numbers.Real) and math.isfinite(self.granularity) and self.granularity > 0):
            raise ValueError(f"granularity must be a positive finite number, got {self.granularity!r}")
        d = self.dimension
        if isinstance(d, bool) or int(d) != d or d < 1 or int(d) & (int(d) - 1):
            raise ValueError(f"dimension must be a power of two >= 1, got {d!r}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
        for name in ("participants", "threshold", "colluders"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value:
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if not 0 <= self.colluders < self.threshold <= self.participants:
            raise ValueError(f"need 0 <= colluders < threshold <= participants, got c={self.colluders}, "
                             f"t={self.threshold}, n={self.participants}")

    def sensitivity(self, max_grad_norm: float) -> tuple[float, float]:
        """(Δ1, Δ2) of one record's rounded contribution at clip norm ``max_grad_norm``."""
        from .quantize import record_sensitivity

        return record_sensitivity(self.granularity * max_grad_norm, self.dimension, self.beta)

    def share(self, mu: float) -> float:
        """The Skellam variance each department adds: μ / (t − c)."""
        return mu / (self.threshold - self.colluders)


def mu_for_target_after(history, target_epsilon: float, delta: float, l1: float, l2: float, q: float, steps: int,
                        orders: Sequence[int] = ORDERS) -> float:
    """Smallest μ such that ``history`` plus ``steps`` Skellam rounds stays ≤ ``target_epsilon`` at ``delta``.

    ``history`` may hold Gaussian and Skellam mechanisms (composed in RDP by
    :func:`fedsilo.shared.accounting.epsilon`).  Raises ``ValueError`` when the
    history alone reaches the target, or no μ up to :data:`MU_MAX` does.
    """
    from . import accounting

    history = [m for m in history if m.steps]
    if not history:
        return mu_for_target(target_epsilon, delta, l1, l2, q, steps, orders)
    before = accounting.epsilon(history, delta)
    if before >= target_epsilon:
        raise ValueError(f"the history already holds ε={before:.4f} at δ={delta:g}, not below the target "
                         f"{target_epsilon:g}")

    def fits(mu: float) -> bool:
        return accounting.epsilon([*history, SkellamMechanism(mu, l1, l2, q, steps)], delta) <= target_epsilon

    upper = mu_for_target(target_epsilon, delta, l1, l2, q, steps, orders)
    while not fits(upper):
        upper *= 4
        if upper > MU_MAX:
            raise ValueError(f"ε={target_epsilon:g} at δ={delta:g} is unreachable after this history")
    lower = upper / 4
    while upper - lower > MU_REL_TOL * upper:
        middle = math.sqrt(upper * lower)
        upper, lower = (middle, lower) if fits(middle) else (upper, middle)
    return upper
