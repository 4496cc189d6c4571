"""The audit's own re-derivation of distributed-DP (Skellam) rounds, written apart from shared/skellam.py.

A second code path from the papers, scalar and plain, so that a bug in the
department's vectorized accounting does not pass its own check:

* one record's sensitivity after conditional rounding (Kairouz, Liu & Steinke,
  ICML 2021): Δ2 = min(c + √D, √(c² + D/4 + √(2 ln(1/β)) (c + √D/2))) with c = γ·C,
  and Δ1 = min(√D Δ2, Δ2²);
* the Skellam mechanism's RDP (Agarwal, Kairouz & Liu, NeurIPS 2021, Theorem 3.5);
* Poisson subsampling under add/remove (Steinke 2022, arXiv:2210.00597, §6), summed term by term;
* Gaussian rounds by Opacus' ``compute_rdp`` (Mironov, Talwar & Zhang 2019);
* the RDP → (ε, δ) conversion of dp-accounting (Canonne, Kamath & Steinke 2020).
"""

from __future__ import annotations

import math

ORDERS = list(range(2, 129)) + [144, 160, 192, 224, 256]


def rounding_sensitivity(scaled_norm: float, dimension: int, beta: float) -> tuple[float, float]:
    """(Δ1, Δ2) of one record's rounded, scaled, rotated gradient."""
    root = math.sqrt(dimension)
    l2 = scaled_norm + root
    if beta > 0:
        l2 = min(l2, math.sqrt(scaled_norm**2 + dimension / 4
                               + math.sqrt(2 * math.log(1 / beta)) * (scaled_norm + root / 2)))
    return min(root * l2, l2 * l2), l2


def _skellam(alpha: int, mu: float, l1: float, l2: float) -> float:
    return alpha * l2**2 / (2 * mu) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def subsampled_skellam(alpha: int, mu: float, l1: float, l2: float, q: float) -> float:
    """The Poisson-subsampled RDP bound at integer ``alpha``, capped by the unsampled RDP."""
    unsampled = _skellam(alpha, mu, l1, l2)
    if q >= 1:
        return unsampled
    log_q, log_1mq = math.log(q), math.log1p(-q)
    total = (alpha - 1) * log_1mq + math.log1p((alpha - 1) * q)
    for l in range(2, alpha + 1):
        term = (math.lgamma(alpha + 1) - math.lgamma(l + 1) - math.lgamma(alpha - l + 1)
                + l * log_q + (alpha - l) * log_1mq + (l - 1) * _skellam(l, mu, l1, l2))
        total = _log_add(total, term)
    return min(total / (alpha - 1), unsampled)


def history_epsilon(entries, delta: float) -> float:
    """ε of ledger entries of both kinds: RDP added over ``ORDERS``, converted at ``delta``."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
    from opacus.accountants.analysis.rdp import compute_rdp

    curve = [0.0] * len(ORDERS)
    for e in entries:
        if not e.steps:
            continue
        if e.kind == "skellam":
            for i, alpha in enumerate(ORDERS):
                curve[i] += e.steps * subsampled_skellam(alpha, e.mu, e.l1, e.l2, e.sample_rate)
        else:
            gaussian = compute_rdp(q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.steps, orders=ORDERS)
            curve = [c + float(g) for c, g in zip(curve, gaussian)]
    if not any(curve):
        return 0.0
    eps, _ = compute_epsilon(ORDERS, curve, delta)
    return float(eps)


def sensitivity_problem(entry) -> str:
    """Why a Skellam entry's recorded Δ1 or Δ2 is below what its own set-up implies ("" when it is not)."""
    l1, l2 = rounding_sensitivity(entry.granularity * entry.max_grad_norm, entry.dimension, entry.beta)
    if entry.l2 < l2 * (1 - 1e-9) or entry.l1 < l1 * (1 - 1e-9):
        return (f"entry seq {entry.seq}: recorded sensitivity Δ1={entry.l1:.6g}, Δ2={entry.l2:.6g} is below what its "
                f"rounding set-up implies (Δ1={l1:.6g}, Δ2={l2:.6g} for γ·C={entry.granularity * entry.max_grad_norm:g}, "
                f"D={entry.dimension}, β={entry.beta:g}): budget under-reported")
    return ""
