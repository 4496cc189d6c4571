"""ε from a mechanism history: the maths, apart from the ledger's bookkeeping.

A department's whole privacy history is a list of Poisson-subsampled Gaussian
mechanisms ``(noise_multiplier, sample_rate, steps)``.  Composition is
order-independent, so the ε of a history is the ε of one accountant that has seen
all of it; restoring an Opacus accountant's ``history`` from the ledger therefore
composes exactly as one long run.
"""

from __future__ import annotations

import dataclasses
import functools

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import numpy as np

# The default (dp-accounting's PLD, the tightest measured) first.
ACCOUNTANTS = ("pld", "prv", "rdp")
# dp-accounting's PLD discretization (its pessimistic estimate is an upper bound).
PLD_INTERVAL = 1e-3
# Below this σ the PLD grid grows too large for memory (privacy loss ~ 1/σ²).
PLD_MIN_SIGMA = 0.05


@dataclass(frozen=True)
class Mechanism:
    """One round of DP-SGD: ``steps`` noisy steps at ``sample_rate``, σ = ``noise_multiplier``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be positive, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


def plan_mechanism(
    num_examples: int, batch_size: int, epochs: int, noise_multiplier: float
) -> Mechanism:
    """The mechanism one round of local DP-SGD runs.

    Poisson sampling at ``q = 1 / ceil(N / B)`` (an expected batch of about ``B``)
    for ``epochs * ceil(N / B)`` steps — the same convention as Opacus'
    ``make_private``, so the plan and the executed run agree step for step.
    A department plans from the size it reports (its policy's public size or
    size bucket), so q, the steps and ε reveal nothing finer about N.
    """
    if num_examples < 1:
        raise ValueError("a department needs at least one training example")
    batches = math.ceil(num_examples / batch_size)
    return Mechanism(noise_multiplier, 1.0 / batches, epochs * batches)


def merge_history(history: Iterable[Mechanism]) -> list[tuple[float, float, int]]:
    """Group identical Gaussian mechanisms (composition commutes) into Opacus history tuples.

    A Skellam round is not a Gaussian one (its ``noise_multiplier`` is shown only): ``TypeError``;
    :func:`merge_mechanisms` groups histories of any kind.
    """
    merged: "OrderedDict[tuple[float, float], int]" = OrderedDict()
    for m in history:
        if not isinstance(m, Mechanism):
            raise TypeError(f"merge_history groups Gaussian rounds only, not {type(m).__name__}: use merge_mechanisms")
        if m.steps:
            key = (float(m.noise_multiplier), float(m.sample_rate))
            merged[key] = merged.get(key, 0) + int(m.steps)
    return [(nm, q, steps) for (nm, q), steps in merged.items()]


def merge_mechanisms(history) -> tuple:
    """Identical mechanisms of any kind (Gaussian or Skellam) grouped, their steps summed, in first-seen order."""
    steps: dict = {}
    for m in history:
        if m.steps:
            key = dataclasses.replace(m, steps=1)
            steps[key] = steps.get(key, 0) + int(m.steps)
    return tuple(dataclasses.replace(m, steps=n) for m, n in steps.items())


# The accountant recorded for a history holding a distributed-DP (Skellam) round: only RDP composes across
# kinds; a name of its own, so the ledger's "ε never shrinks" rule compares it only with itself (not with Opacus' RDP).
MIXED_ACCOUNTANT = "rdp-skellam"


def is_gaussian(history) -> bool:
    return all(isinstance(m, Mechanism) for m in history)


def accountant_for(history, accountant: str) -> str:
    """The accountant that measures ``history``: ``accountant`` for Gaussian rounds only, else RDP."""
    return accountant if is_gaussian(history) else MIXED_ACCOUNTANT


def mixed_epsilon(history, delta: float) -> float:
    """ε of a history of Gaussian and Skellam rounds: RDP curves added at integer orders, then converted.

    Gaussian rounds: the exact integer-order RDP of the Poisson-subsampled Gaussian
    (Mironov, Talwar & Zhang 2019, as Opacus' ``compute_rdp``); Skellam rounds:
    :mod:`fedsilo.shared.skellam`.  PLD and PRV have no Skellam curve, so they cannot
    compose with it.
    """
    from opacus.accountants.analysis.rdp import compute_rdp

    from . import skellam

    orders = skellam.ORDERS
    curve = np.zeros(len(orders))
    for m in history:
        if not m.steps:
            continue
        if isinstance(m, Mechanism):
            curve = curve + np.asarray(compute_rdp(q=m.sample_rate, noise_multiplier=m.noise_multiplier,
                                                   steps=m.steps, orders=list(orders)), dtype=float)
        else:
            curve = curve + m.rdp(orders)
    if not curve.any():
        return 0.0
    return skellam.rdp_to_epsilon(orders, curve, delta)


def epsilon(history: Iterable[Mechanism], delta: float, accountant: str = "pld") -> float:
    """Whole-history ε at ``delta`` (0.0 for an empty history).

    A history holding a Skellam round (distributed DP) is measured by
    :func:`mixed_epsilon` whatever ``accountant`` says.

    PRV returns its certified upper bound (Opacus' ``eps_upper``), never the
    estimate; RDP returns the usual RDP-to-(ε, δ) conversion; PLD is Google's
    dp-accounting privacy-loss-distribution accountant (pessimistic
    discretization), independent of Opacus.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    history = list(history)
    if not is_gaussian(history):
        return mixed_epsilon(history, delta)
    tuples = merge_history(history)
    if not tuples:
        return 0.0
    if accountant == "pld":
        try:
            return pld_epsilon(tuples, delta)
        except (ValueError, MemoryError, OverflowError):
            # Tiny σ: the PLD grid would not fit in memory.  RDP is looser but
            # sound, so fall back to it rather than report nothing.
            accountant = "rdp"
    acc = make_accountant(accountant)
    acc.history = tuples
    with np.errstate(divide="ignore"):  # Opacus' PRV takes log(1 - q) = log(0) at q = 1
        return float(acc.get_epsilon(delta=delta))


def pld_epsilon(tuples: Iterable[tuple[float, float, int]], delta: float) -> float:
    """ε of ``(noise_multiplier, sample_rate, steps)`` tuples with dp-accounting's PLD."""
    tuples = list(tuples)
    if all(0 < q < 1 and sigma > 0 for sigma, q, _ in tuples):
        # What PLDAccountant composes for these events, with each mechanism's one-step PLD built
        # once: ε is re-derived for every prefix of a ledger, and building is most of the cost.
        from dp_accounting.pld import privacy_loss_distribution

        pld = privacy_loss_distribution.identity(value_discretization_interval=PLD_INTERVAL)
        for sigma, q, steps in tuples:
            pld = pld.compose(_subsampled_gaussian_pld(sigma, q).self_compose(int(steps)))
        return float(pld.get_epsilon_for_delta(delta))
    acc = _pld_accountant()
    for sigma, q, steps in tuples:
        acc.compose(_pld_event(sigma, q, int(steps)))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def _subsampled_gaussian_pld(sigma: float, sample_rate: float):
    """One step of the Poisson-subsampled Gaussian, as dp-accounting's PLDAccountant builds it."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=PLD_INTERVAL, sampling_prob=sample_rate)


def _pld_accountant():
    from dp_accounting.pld import pld_privacy_accountant

    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_INTERVAL)


def _pld_event(sigma: float, sample_rate: float, steps: int):
    import dp_accounting

    event = dp_accounting.GaussianDpEvent(sigma)
    if sample_rate != 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, steps)


def make_accountant(name: str):
    """An empty Opacus accountant by name (``prv`` or ``rdp``; PLD is not Opacus')."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ValueError(f"unknown Opacus accountant '{name}'; use 'prv' or 'rdp'")


def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "pld"
) -> float:
    """Smallest σ whose ``steps`` steps at ``sample_rate`` stay ≤ ``target_epsilon``.

    PRV and RDP use Opacus' search (to 0.01 in ε); PLD uses dp-accounting's
    calibration (Brent's method, to 0.1% in σ), always on the feasible side.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")

    def opacus_sigma(name: str) -> float:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=name,
            )
        )

    if accountant != "pld":
        return opacus_sigma(accountant)
    # RDP's bound is looser than PLD's, so RDP's σ already meets the target under
    # PLD: the upper end of the bracket.  The lower end must miss it.
    upper = opacus_sigma("rdp")
    lower = upper / 2
    try:
        while lower > PLD_MIN_SIGMA and pld_epsilon([(lower, sample_rate, steps)], delta) <= target_epsilon:
            upper, lower = lower, lower / 2
        if lower <= PLD_MIN_SIGMA:
            return upper  # noise this small is outside PLD's grid; RDP's σ is sound
        return _calibrate_pld(target_epsilon, delta, sample_rate, steps, lower, upper)
    except (ValueError, MemoryError, OverflowError):
        return upper


def _calibrate_pld(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, lower: float, upper: float
) -> float:
    from dp_accounting import mechanism_calibration as calibration

    sigma = float(
        calibration.calibrate_dp_mechanism(
            _pld_accountant,
            lambda s: _pld_event(s, sample_rate, steps),
            target_epsilon,
            delta,
            bracket_interval=calibration.ExplicitBracketInterval(lower, upper),
            tol=upper * 1e-3,
        )
    )
    # calibrate_dp_mechanism returns the feasible end of its final bracket; check
    # anyway, since a σ that overshoots the target would break the plan's promise.
    if pld_epsilon([(sigma, sample_rate, steps)], delta) > target_epsilon:
        return upper
    return sigma


def noise_for_target_after(
    history: Iterable[Mechanism],
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    rel_tol: float = 1e-3,
) -> float:
    """Smallest σ such that ``history`` plus ``steps`` steps at ``sample_rate`` stays ≤ ``target_epsilon``.

    The whole history counts: a department that already spent part of its
    budget plans the rest of it, not a fresh one.  Raises ``ValueError`` when
    the history alone is already at the target (no σ can help).  Bisection on
    σ to ``rel_tol``, always returning the feasible end.
    """
    history = [m for m in history if m.steps]
    if not history:
        return noise_for_target(target_epsilon, delta, sample_rate, steps, accountant)
    before = epsilon(history, delta, accountant)
    if before >= target_epsilon:
        raise ValueError(
            f"the history already holds ε={before:.4f} at δ={delta:g}, not below the target {target_epsilon:g}"
        )

    def fits(sigma: float) -> bool:
        return epsilon([*history, Mechanism(sigma, sample_rate, steps)], delta, accountant) <= target_epsilon

    # What the new steps may spend on their own is at most the target: start there.
    upper = noise_for_target(target_epsilon, delta, sample_rate, steps, accountant)
    while not fits(upper):
        upper *= 2
        if upper > 1e6:
            raise ValueError(f"no σ up to 1e6 keeps the history within ε={target_epsilon:g}")
    lower = upper / 2
    while fits(lower) and lower > PLD_MIN_SIGMA:
        upper, lower = lower, lower / 2
    while upper - lower > rel_tol * upper:
        middle = (upper + lower) / 2
        upper, lower = (middle, lower) if fits(middle) else (upper, middle)
    return upper
