"""Skellam accounting against independent re-derivations.

The bounds in shared/skellam.py are checked against what they bound, computed
another way:

- the exact Rényi divergence between Sk(μ) and Sk(μ) + Δ, summed from scipy's
  Skellam pmf over a wide support (the theorem must lie above it);
- the exact RDP of the Poisson-subsampled mixture, both directions (the
  subsampling bound applied to the exact unsubsampled curve must lie above it),
  on Skellam pairs and on adversarially searched discrete pairs, and the
  pointwise inequality behind the removal direction;
- Mironov, Talwar & Zhang's subsampled-Gaussian RDP (Opacus), which the
  subsampling bound must reproduce on the Gaussian's exact curve;
- the subsampled Gaussian of dp-accounting, which Skellam approaches as μ grows.

Factors seen (Agarwal et al.'s bound / exact divergence, 1-D, Δ ∈ {1, 3},
α ∈ {2, 8, 32, 128}): μ = 1: 2.9–46; μ = 5: 1.4–13; μ = 20: 1.08–4.8;
μ = 100: 1.01–1.9; μ = 1000: 1.001–1.04.  The looseness is at high orders and
small μ, where the min(…, 3Δ1/2μ) term dominates; DP-SGD runs at μ ≫ Δ².
"""

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from fedsilo.shared import skellam
from fedsilo.shared.skellam import SkellamMechanism

DELTA = 1e-5


def skellam_logpmf(mu: float, k: np.ndarray) -> np.ndarray:
    """scipy's Skellam: difference of two Poisson(μ/2), variance μ."""
    return stats.skellam.logpmf(k, mu / 2, mu / 2)


def renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: int) -> float:
    """D_α(P‖Q) = log Σ p^α q^(1−α) / (α − 1), checking the support was wide enough."""
    finite = np.isfinite(log_p) & np.isfinite(log_q)  # scipy's pmf underflows far out
    terms = alpha * log_p[finite] + (1 - alpha) * log_q[finite]
    total = logsumexp(terms)
    # The sum must have converged inside the support: its edge terms are negligible.
    assert max(terms[0], terms[-1]) < total - 30, "support too narrow for this (μ, Δ, α)"
    return float(total / (alpha - 1))


def support(mu: float, shift: int, alpha: int) -> np.ndarray:
    width = shift + int(30 * math.sqrt(mu)) + 3 * alpha * shift + 50
    return np.arange(-width, width + 1)


# --- the unsubsampled theorem -------------------------------------------------------------


def test_formula_is_the_theorem():
    """ε(α) = αΔ2²/(2μ) + min(((2α−1)Δ2² + 6Δ1)/(4μ²), 3Δ1/(2μ)), at both sides of the min."""
    mu, l1, l2 = 50.0, 7.0, 3.0
    for alpha in (2, 10):
        expected = alpha * 9 / 100 + min(((2 * alpha - 1) * 9 + 42) / 10000, 21 / 100)
        assert skellam.skellam_rdp(mu, l1, l2, [alpha])[0] == pytest.approx(expected, rel=1e-12)
    # Small μ: the 3Δ1/(2μ) side of the min is the smaller one.
    assert skellam.skellam_rdp(1.0, 1.0, 1.0, [64])[0] == pytest.approx(64 / 2 + 1.5)


@pytest.mark.parametrize("mu", [1.0, 5.0, 20.0, 100.0, 1000.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_theorem_bounds_the_exact_1d_divergence(mu, shift):
    for alpha in (2, 8, 32, 128):
        k = support(mu, shift, alpha)
        exact = renyi(skellam_logpmf(mu, k - shift), skellam_logpmf(mu, k), alpha)
        bound = skellam.skellam_rdp(mu, shift, shift, [alpha])[0]
        assert bound >= exact * (1 - 1e-9), (mu, shift, alpha, bound, exact)
        # Within a reasonable factor (see the module docstring), near-tight at large μ.
        limit = 1.05 if mu >= 1000 else 2.0 if mu >= 100 else 50.0
        assert bound <= limit * exact, (mu, shift, alpha, bound / exact)


def test_theorem_bounds_an_exact_multidimensional_divergence():
    """Coordinates are independent, so D_α adds over them; Δ1 = 4, Δ2 = √6 for the shift (2, −1, 1)."""
    mu, shift = 10.0, (2, -1, 1)
    for alpha in (2, 8, 32):
        exact = 0.0
        for s in shift:
            k = support(mu, abs(s), alpha)
            exact += renyi(skellam_logpmf(mu, k - s), skellam_logpmf(mu, k), alpha)
        bound = skellam.skellam_rdp(mu, 4.0, math.sqrt(6.0), [alpha])[0]
        assert exact <= bound * (1 + 1e-9), (alpha, exact, bound)


@pytest.mark.parametrize("value", [np.float64(1e4), np.int64(10_000), 10_000])
def test_numpy_and_python_numbers_are_accepted(value):
    assert SkellamMechanism(value, 3e3, 100.0, 0.01, 10).mu == value


# --- Poisson subsampling -------------------------------------------------------------------


@pytest.mark.parametrize("mu,shift", [(4.0, 1), (30.0, 2)])
@pytest.mark.parametrize("q", [0.01, 0.2, 0.7])
def test_subsampling_bound_holds_on_the_exact_subsampled_mixture(mu, shift, q):
    """(1−q)·Sk(μ) + q·(Sk(μ)+Δ) against Sk(μ), both directions, ≤ the bound on the exact curve."""
    alphas = (2, 3, 5, 12, 24)
    k = support(mu, shift, max(alphas))
    log_p = skellam_logpmf(mu, k)
    log_shifted = skellam_logpmf(mu, k - shift)
    log_mix = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_shifted)

    def exact_base(orders):  # the unsubsampled mechanism's exact RDP (Skellam is symmetric)
        return np.array([renyi(log_shifted, log_p, int(a)) for a in orders])

    bounds = skellam.poisson_subsampled_rdp(exact_base, q, alphas)
    for alpha, bound in zip(alphas, bounds):
        added = renyi(log_mix, log_p, alpha)
        removed = renyi(log_p, log_mix, alpha)
        assert max(added, removed) <= bound * (1 + 1e-9), (mu, shift, q, alpha, added, removed, bound)


@pytest.mark.parametrize("sigma", [0.7, 2.0, 8.0])
@pytest.mark.parametrize("q", [0.001, 0.09, 0.6])
def test_on_the_gaussian_curve_the_bound_is_the_subsampled_gaussian(sigma, q):
    """ε(l) = l/(2σ²) turns the sum into Mironov, Talwar & Zhang's exact integer-order formula."""
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = [2, 3, 8, 32, 128, 256]
    ours = skellam.poisson_subsampled_rdp(lambda a: a / (2 * sigma**2), q, orders)
    theirs = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    assert ours == pytest.approx(np.asarray(theirs), rel=1e-9)


def removal_slack(alpha: int, q: float, weight: float, u: np.ndarray) -> np.ndarray:
    """a·F(u) + (1−a)·G(u) + c(u − 1) − h(u), scaled; c makes the three agree to first order at u = 1.

    With L = Q/P: removal is E_P[h(L)], h = (1−q+qL)^(1−α); adding is E_P[G(L)],
    G = (1−q+qL)^α; adding for the swapped pair is E_P[F(L)], F = L(1−q+q/L)^α.
    E_P[L − 1] = 0, so a slack ≥ 0 everywhere makes removal ≤ max(the two adding
    directions) ≤ the bound, for every pair (P, Q).
    """
    log_h = (1 - alpha) * np.log1p(q * (u - 1))
    log_g = alpha * np.log1p(q * (u - 1))
    log_f = (1 - alpha) * np.log(u) + alpha * np.log((1 - q) * u + q)
    c = q - 2 * alpha * q + 2 * weight * alpha * q - weight
    scale = np.maximum.reduce([np.ones_like(u), np.exp(log_h), np.abs(c * (u - 1))])
    return (weight * np.exp(log_f) + (1 - weight) * np.exp(log_g) + c * (u - 1) - np.exp(log_h)) / scale


@pytest.mark.parametrize("alpha", [2, 3, 7, 32, 128])
@pytest.mark.parametrize("q", [1e-4, 0.01, 0.09, 0.5, 0.9])
def test_removal_lies_below_a_mix_of_the_adding_directions(alpha, q):
    from scipy.optimize import minimize_scalar

    reach = min(math.log(1e9), 600 / alpha)  # beyond it u^α overflows, and G's growth dominates anyway
    u = np.exp(np.linspace(-reach, reach, 20_001))
    best = minimize_scalar(lambda a: -float(np.min(removal_slack(alpha, q, a, u))), bounds=(0, 1),
                           method="bounded", options={"xatol": 1e-12})
    assert -best.fun >= -1e-10, (alpha, q, best.x, -best.fun)
    # The slack is not vacuous: a wrong weight breaks it.
    assert np.min(removal_slack(alpha, q, min(1.0, best.x + 0.3) if best.x < 0.5 else best.x - 0.3, u)) < -1e-6


def test_removal_and_adding_stay_below_the_bound_on_adversarial_pairs():
    """Random discrete pairs, pushed by Nelder–Mead towards violating the bound, in both directions."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(7)

    def renyi_np(p, r, alpha):
        return float(np.log(np.sum(p**alpha * r ** (1 - alpha))) / (alpha - 1))

    def excess(x, n, alpha, q):
        p, r = np.exp(x[:n] - x[:n].max()), np.exp(x[n:] - x[n:].max())
        p, r = p / p.sum(), r / r.sum()
        eps_l = lambda ls: np.array([max(renyi_np(p, r, int(l)), renyi_np(r, p, int(l))) for l in ls])
        bound = skellam.poisson_subsampled_rdp(eps_l, q, [alpha])[0]
        mix = (1 - q) * p + q * r
        return max(renyi_np(p, mix, alpha), renyi_np(mix, p, alpha)) - bound

    worst = -math.inf
    for _ in range(40):
        n, alpha = int(rng.integers(2, 5)), int(rng.integers(2, 7))
        q = float(rng.choice([0.05, 0.3, 0.7]))
        start = rng.normal(size=2 * n) * float(rng.choice([0.5, 2.0]))
        found = minimize(lambda x: -excess(x, n, alpha, q), start, method="Nelder-Mead", options={"maxiter": 150})
        worst = max(worst, -found.fun)
    assert worst <= 1e-12, worst


def test_subsampling_numerics_to_order_256_and_q_1():
    def tiny_mu(orders):
        return skellam.skellam_rdp(0.5, 50.0, 10.0, orders)  # ε(l) in the thousands

    orders = [2, 3, 64, 128, 256]
    for q in (1e-6, 0.01, 0.5, 0.999999, 1.0):
        curve = skellam.poisson_subsampled_rdp(tiny_mu, q, orders)
        assert np.all(np.isfinite(curve)) and np.all(curve >= 0)
        assert np.all(curve <= tiny_mu(np.array(orders)) + 1e-9)
    assert np.array_equal(skellam.poisson_subsampled_rdp(tiny_mu, 1.0, orders), tiny_mu(np.array(orders)))
    assert np.array_equal(skellam.poisson_subsampled_rdp(tiny_mu, 0.0, orders), np.zeros(len(orders)))
    small = skellam.poisson_subsampled_rdp(lambda a: skellam.skellam_rdp(1e4, 300.0, 100.0, a), 0.01, orders)
    larger = skellam.poisson_subsampled_rdp(lambda a: skellam.skellam_rdp(1e4, 300.0, 100.0, a), 0.02, orders)
    assert np.all(small < larger)
    with pytest.raises(ValueError, match="integer orders"):
        skellam.skellam_rdp(1.0, 1.0, 1.0, [1.5])


# --- against the Gaussian ----------------------------------------------------------------


def gaussian_epsilon(sigma: float, q: float, steps: int) -> float:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(list(skellam.ORDERS))
    event = dp_accounting.GaussianDpEvent(sigma)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(DELTA)


def skellam_at_sigma(sigma: float, q: float, steps: int, l2: float = 1000.0) -> float:
    dim = 2**17
    return skellam.epsilon([SkellamMechanism((sigma * l2) ** 2, math.sqrt(dim) * l2, l2, q, steps)], DELTA)


# At μ = (1000 σ)², Δ1 = √(2^17) Δ2, δ = 1e-5 the Skellam ε equals dp-accounting's
# subsampled Gaussian to 4 decimals at every (σ, q, steps) below: the discreteness
# costs nothing there, and the subsampling bound is the Gaussian's own.
@pytest.mark.parametrize(
    "sigma,q,steps",
    [(1.0, 0.001, 10_000), (0.8, 0.001, 10_000), (1.0, 1.0, 10), (1.0, 0.01, 1000), (2.0, 0.01, 1000),
     (5.0, 0.01, 1000), (2.805, 0.0909, 55)],
)
def test_large_mu_is_never_below_the_subsampled_gaussian(sigma, q, steps):
    gaussian = gaussian_epsilon(sigma, q, steps)
    ours = skellam_at_sigma(sigma, q, steps)
    assert ours >= gaussian * (1 - 1e-9)
    assert ours <= gaussian * (1 + 1e-3), (ours, gaussian)


def test_unsubsampled_curve_approaches_the_gaussian_from_above():
    orders = np.array(skellam.ORDERS, dtype=float)
    gaps = []
    for mu in (1e2, 1e4, 1e6):
        l2 = math.sqrt(mu)  # σ = 1
        curve = skellam.skellam_rdp(mu, 10 * l2, l2, orders)
        gaussian = orders / 2
        assert np.all(curve >= gaussian)
        gaps.append(float(np.max(curve / gaussian - 1)))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


# --- monotonicity, composition, calibration ---------------------------------------------------


def eps(mu=1e4, l1=3e3, l2=100.0, q=0.01, steps=500):
    return skellam.epsilon([SkellamMechanism(mu, l1, l2, q, steps)], DELTA)


def test_monotone_in_every_parameter():
    assert eps(mu=5e3) > eps(mu=1e4) > eps(mu=2e4)
    assert eps(q=0.005) < eps(q=0.01) < eps(q=0.05)
    assert eps(steps=100) < eps(steps=500) < eps(steps=2000)
    assert eps(l2=50.0) < eps(l2=100.0) < eps(l2=150.0)
    assert eps(mu=50.0, l2=5.0, l1=5.0) < eps(mu=50.0, l2=5.0, l1=50.0)  # l1 matters at small μ


def test_history_composes_by_adding_rdp_in_any_order():
    a, b = SkellamMechanism(1e4, 3e3, 100.0, 0.01, 200), SkellamMechanism(2e4, 3e3, 100.0, 0.02, 100)
    assert skellam.epsilon([], DELTA) == 0.0
    assert skellam.epsilon([a, b], DELTA) == pytest.approx(skellam.epsilon([b, a], DELTA), rel=1e-12)
    assert skellam.epsilon([a, a], DELTA) == pytest.approx(
        skellam.epsilon([SkellamMechanism(1e4, 3e3, 100.0, 0.01, 400)], DELTA), rel=1e-12
    )
    assert skellam.epsilon([a], DELTA) < skellam.epsilon([a, b], DELTA)
    assert np.allclose(skellam.rdp([a, b]), a.rdp() + b.rdp())


def test_conversion_is_dp_accountings():
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    m = SkellamMechanism(1e4, 3e3, 100.0, 0.01, 500)
    assert skellam.epsilon([m], DELTA) == compute_epsilon(list(skellam.ORDERS), list(m.rdp()), DELTA)[0]


def test_mu_for_target_meets_the_target_tightly():
    args = dict(delta=DELTA, l1=3e3, l2=100.0, q=0.01, steps=500)
    for target in (1.0, 3.0, 8.0):
        mu = skellam.mu_for_target(target, **args)
        assert eps(mu=mu, steps=500) <= target
        assert eps(mu=mu * (1 - 3 * skellam.MU_REL_TOL), steps=500) > target
    assert skellam.mu_for_target(1.0, **args) > skellam.mu_for_target(8.0, **args)


def test_mu_for_target_refuses_what_it_cannot_reach(monkeypatch):
    monkeypatch.setattr(skellam, "MU_MAX", 1e5)
    with pytest.raises(ValueError, match="unreachable"):
        skellam.mu_for_target(0.01, DELTA, 3e3, 100.0, 0.5, 10_000)
    with pytest.raises(ValueError, match="epsilon"):
        skellam.mu_for_target(0.0, DELTA, 3e3, 100.0, 0.5, 10)
    with pytest.raises(ValueError, match="delta"):
        skellam.mu_for_target(1.0, 1.0, 3e3, 100.0, 0.5, 10)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(mu=0.0), "mu"), (dict(mu=math.inf), "mu"), (dict(l1=-1.0), "l1"), (dict(l2=0.0), "l2"),
     (dict(sample_rate=0.0), "sample_rate"), (dict(sample_rate=1.5), "sample_rate"),
     (dict(steps=-1), "steps"), (dict(steps=2.5), "steps"), (dict(mu=True), "mu"), (dict(l2="1"), "l2")],
)
def test_bad_mechanisms_raise(kwargs, match):
    fields = dict(mu=1e4, l1=3e3, l2=100.0, sample_rate=0.01, steps=10) | kwargs
    with pytest.raises(ValueError, match=match):
        SkellamMechanism(**fields)
    with pytest.raises(ValueError, match="delta"):
        skellam.epsilon([SkellamMechanism(1e4, 3e3, 100.0, 0.01, 10)], 0.0)


def test_share_mu_leaves_the_honest_survivors_carrying_mu():
    assert skellam.share_mu(900.0, departments=10, dropouts=2, colluders=1) == pytest.approx(900.0 / 7)
    assert skellam.share_mu(900.0, 10, 0, 0) == pytest.approx(90.0)
    with pytest.raises(ValueError, match="honest"):
        skellam.share_mu(900.0, 3, 2, 1)
    with pytest.raises(ValueError, match=">= 0"):
        skellam.share_mu(900.0, 3, -1, 0)
