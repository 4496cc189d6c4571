"""The privacy settings planner: σ and the ε curve of a department's DP-SGD, before any run.

A department's rounds are planned exactly as :func:`~fedsilo.client.budget_guard.plan_round`
plans them in a real run — the mechanism of :func:`~fedsilo.client.trainer.plan_mechanism`
and, for a target ε, :func:`~fedsilo.shared.accounting.noise_for_target` over all planned
steps — so the σ planned here is the σ the run will use.  Rounds of one run are identical
mechanisms, so the whole-history ε after ``r`` rounds is the ε of one mechanism with
``r`` times the steps: one accountant call per round shown.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism, plan_mechanism


class PlanError(ValueError):
    """Bad planner input; ``option`` names the setting (as on the command line, without ``--``)."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option} {reason}")
        self.option = option
        self.reason = reason


@dataclass(frozen=True)
class PrivacyPlan:
    """A department's planned DP-SGD and its whole-history ε after each shown round.

    Attributes
    ----------
    noise_multiplier, sample_rate, steps_per_round : float, float, int
        The mechanism every round runs.
    curve : tuple of (int, float)
        ``(round, ε)`` for the rounds shown; always ends with the last planned round.
    exhausted_round : int or None
        With ``max_epsilon``, the first round the budget guard would refuse (its ε
        would pass the budget); ``None`` if the budget lasts all rounds.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    dataset_size: int
    delta: float
    accountant: str
    curve: tuple[tuple[int, float], ...]
    target_epsilon: float | None = None
    max_epsilon: float | None = None
    exhausted_round: int | None = None
    gaussian_noise_multiplier: float | None = None  # distributed DP: σ of Gaussian DP-SGD at the same ε, q, steps

    @property
    def final_epsilon(self) -> float:
        """Whole-history ε after the last planned round."""
        return self.curve[-1][1]

    @property
    def advice(self) -> str:
        """One honest line on what these numbers mean for the run."""
        if self.exhausted_round is not None:
            if self.target_epsilon is not None:
                return (
                    f"target-epsilon {self.target_epsilon:g} is above max-epsilon {self.max_epsilon:g}: "
                    "a run refuses these settings; lower the target or raise the budget."
                )
            return (
                f"The budget runs out: departments train {self.exhausted_round - 1} of {self.rounds} "
                "rounds; plan fewer rounds, more noise, or a larger max-epsilon."
            )
        if self.sample_rate == 1.0:
            return (
                "Batch size ≥ dataset size: every step uses all records, so there is no "
                "privacy amplification by subsampling."
            )
        batch = self.sample_rate * self.dataset_size
        return (
            f"Noise std on each averaged gradient: σ/B ≈ {self.noise_multiplier / batch:.3g} × "
            f"max-grad-norm (expected batch B ≈ {batch:.0f})."
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps_per_round": self.steps_per_round,
            "rounds": self.rounds,
            "delta": self.delta,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
            "max_epsilon": self.max_epsilon,
            "exhausted_round": self.exhausted_round,
            "curve": [{"round": r, "epsilon": eps} for r, eps in self.curve],
            **({"gaussian_noise_multiplier": self.gaussian_noise_multiplier}
               if self.gaussian_noise_multiplier is not None else {}),
        }


def plan_privacy(
    dataset_size: int,
    batch_size: int,
    rounds: int,
    delta: float,
    *,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    local_epochs: int = 1,
    accountant: str = "pld",
    max_epsilon: float | None = None,
) -> PrivacyPlan:
    """Plan one department's DP-SGD for ``rounds`` rounds.

    Parameters
    ----------
    dataset_size : int
        The department's training records ``N``.
    batch_size : int
        Expected Poisson batch ``B``; the sample rate is ``1 / ceil(N / B)``.
    rounds : int
        Planned federated rounds.
    delta : float
        δ at which ε is measured, in (0, 1).
    target_epsilon : float, optional
        Whole-history ε the planned rounds may spend; σ is derived from it.
    noise_multiplier : float, optional
        A given σ instead of a target (exactly one of the two).
    local_epochs : int
        Local epochs per round.
    accountant : str
        ``prv`` (default) or ``rdp``.
    max_epsilon : float, optional
        A budget; the plan then names the first round that would pass it.

    Returns
    -------
    PrivacyPlan

    Raises
    ------
    PlanError
        A :class:`ValueError` naming the bad setting.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise PlanError(
            "target-epsilon",
            "or noise-multiplier: give exactly one (a target ε to plan σ for, or a σ to see its ε)",
        )
    checks = [
        ("target-epsilon", target_epsilon is None or _positive(target_epsilon), "must be a positive number, e.g. 3"),
        ("noise-multiplier", noise_multiplier is None or _positive(noise_multiplier), "must be a positive number, e.g. 1.0"),
        ("max-epsilon", max_epsilon is None or _positive(max_epsilon), "must be a positive number, e.g. 10"),
        ("delta", 0 < delta < 1, "must be in (0, 1); use e.g. 1e-5 (below 1/dataset-size)"),
        ("dataset-size", dataset_size >= 1, "must be at least 1 (the department's training records)"),
        ("batch-size", batch_size >= 1, "must be at least 1 (the expected Poisson batch)"),
        ("rounds", rounds >= 1, "must be at least 1"),
        ("local-epochs", local_epochs >= 1, "must be at least 1"),
        ("accountant", accountant in accounting.ACCOUNTANTS, f"must be one of {', '.join(accounting.ACCOUNTANTS)}"),
    ]
    for option, ok, reason in checks:
        if not ok:
            raise PlanError(option, reason)

    # Exactly budget_guard.plan_round: one round's mechanism, σ for all planned steps.
    per_round = plan_mechanism(dataset_size, batch_size, local_epochs, noise_multiplier or 1.0)
    q, steps = per_round.sample_rate, per_round.steps
    sigma = (
        noise_multiplier
        if target_epsilon is None
        else _quiet(accounting.noise_for_target, target_epsilon, delta, q, steps * rounds, accountant)
    )

    cache: dict[int, float] = {}

    def eps(r: int) -> float:
        if r not in cache:
            cache[r] = _quiet(accounting.epsilon, [Mechanism(sigma, q, steps * r)], delta, accountant)
        return cache[r]

    curve = tuple((r, eps(r)) for r in shown_rounds(rounds))
    exhausted = first_round_past(curve, eps, rounds, max_epsilon)
    return PrivacyPlan(
        float(sigma), q, steps, rounds, dataset_size, delta, accountant, curve,
        target_epsilon, max_epsilon, exhausted,
    )


def first_round_past(curve, eps, rounds: int, max_epsilon: float | None) -> int | None:
    """The first round whose whole-history ε passes ``max_epsilon`` (None: the budget lasts all ``rounds``).

    ε grows with rounds: bisect between the shown rounds of ``curve`` that bracket the budget.
    """
    if max_epsilon is None or eps(rounds) <= max_epsilon:
        return None
    lo = max((r for r, e in curve if e <= max_epsilon), default=0)
    hi = min(r for r, e in curve if e > max_epsilon)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if eps(mid) <= max_epsilon else (lo, mid)
    return hi


def shown_rounds(rounds: int, head: int = 20, tail: int = 20) -> list[int]:
    """Rounds to show: all of the first ``head``, then every k-th (k = 1, 2, 5, 10, …) and the last."""
    if rounds <= head:
        return list(range(1, rounds + 1))
    k = next(s for m in itertools.count() for s in (10**m, 2 * 10**m, 5 * 10**m) if rounds / s <= tail)
    shown = list(range(1, head + 1)) + [r for r in range(k, rounds + 1, k) if r > head]
    return shown if shown[-1] == rounds else [*shown, rounds]


def print_plan(plan: PrivacyPlan, console: Any = None) -> None:
    """Print the plan as a rich table with one line of advice."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    source = (
        f"for target ε={plan.target_epsilon:g}" if plan.target_epsilon is not None else "given"
    )
    console.print(
        f"noise multiplier σ = [bold]{plan.noise_multiplier:.4g}[/bold] ({source})\n"
        f"sample rate q = {plan.sample_rate:.4g}, {plan.steps_per_round} steps per round, "
        f"{plan.rounds} rounds\n"
        f"whole-history ε at δ={plan.delta:g} ({plan.accountant.upper()}) after each round:"
    )
    table = Table()
    table.add_column("round", justify="right")
    table.add_column("ε", justify="right")
    if plan.max_epsilon is not None:
        table.add_column(f"left of {plan.max_epsilon:g}", justify="right")
    for r, eps in plan.curve:
        row = [str(r), f"{eps:.3f}"]
        if plan.max_epsilon is not None:
            left = plan.max_epsilon - eps
            row.append(f"{left:.3f}" if left >= 0 else "[red]refused[/red]")
        table.add_row(*row)
    console.print(table)
    if plan.gaussian_noise_multiplier is not None:
        console.print(
            f"Distributed DP: each round is one DP-SGD step over the pooled records, its noise added in Skellam "
            f"shares. Centralized DP-SGD with Gaussian noise would reach the same ε at the same q and steps with "
            f"σ = {plan.gaussian_noise_multiplier:.4g} (PLD); {plan.noise_multiplier / plan.gaussian_noise_multiplier:.3g}× "
            "that is the cost of the discrete, distributed mechanism's analysis.")
    if plan.max_epsilon is not None:
        console.print(
            f"Budget {plan.max_epsilon:g}: "
            + (
                f"round {plan.exhausted_round} would pass it and be refused."
                if plan.exhausted_round is not None
                else f"lasts all {plan.rounds} rounds (ε={plan.final_epsilon:.3f})."
            )
        )
    console.print(plan.advice)


def _quiet(fn: Any, *args: Any) -> Any:
    """Call an accountant without RDP's note on its alpha range (PRV sizes its domain with RDP)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return fn(*args)


def _positive(x: float) -> bool:
    return x > 0 and math.isfinite(x)


@dataclass(frozen=True)
class Forecast:
    """What one department can still do in a run, from its own ledger, before the run starts.

    ``rounds`` of the run's remaining rounds fit its budget (all of them when it
    trains without DP); ``reason`` says why it trains none.  ``noise_ratio`` is
    the noise's standard deviation on each step's averaged gradient in units of
    the clipping norm, σ / expected batch: above 1 the noise on every step
    exceeds the largest averaged gradient there can be, and a few rounds of
    such steps teach the model next to nothing.
    """

    department: str
    rounds: int
    remaining: int
    noise_multiplier: float | None
    epsilon_before: float
    budget: float
    reason: str = ""
    noise_ratio: float = 0.0

    @property
    def useful(self) -> bool:
        """It can train a round at all, with noise below the largest averaged gradient."""
        return self.rounds > 0 and self.noise_ratio <= 1.0


def forecast_department(name: str, settings, policy, num_records: int, entries, completed: int = 0,
                        run_id: str = "", distributed=None) -> Forecast:
    """Plan the run for one department exactly as its budget guard will, against its ledger.

    ``entries`` is its ledger.  For a resumed run (``run_id``, ``completed``
    rounds) its entries of that run count as spent but not as prior history for
    the target, as in the guard, and a round it already trained is not charged
    again (it sends that update again).  ``distributed``: distributed DP's
    ``(SkellamMechanism of one round, expected pooled batch)``; the run fixes the
    noise, so the department only checks how many of its rounds fit.
    """
    done = max([completed] + [e.round for e in entries if run_id and e.run_id == run_id])
    remaining = max(settings.num_server_rounds - done, 0)
    from .budget_guard import PlanError as GuardPlanError, plan_round
    from .policy import RunRequest

    terms, looser = policy.terms_for(RunRequest.from_settings(settings))
    if terms is None:
        return Forecast(name, 0, remaining, None, 0.0, policy.max_epsilon, "declines: " + "; ".join(looser))
    history = [e.mechanism for e in entries if e.private]
    before = _quiet(accounting.epsilon, history, terms.delta, terms.accountant) if history else 0.0
    if not terms.private:
        return Forecast(name, remaining, remaining, None, before, terms.max_epsilon)
    if any(not e.private for e in entries):
        return Forecast(name, 0, remaining, None, math.inf, terms.max_epsilon, "trained without DP before: no finite ε is left")
    size = policy.reported_size(num_records)
    if distributed is not None:
        return _forecast_fixed(name, distributed, history, before, remaining, terms)
    prior = [e.mechanism for e in entries if e.private and e.run_id != run_id]
    planned = settings.target_epsilon > 0 or settings.noise_multiplier <= 0
    if planned and not history:
        # σ is searched so that every planned round fits: nothing to forecast (the department
        # searches it itself; doing it here too would only delay the start).
        return Forecast(name, remaining, remaining, None, 0.0, terms.max_epsilon)
    from fedsilo.shared.budget import BudgetGuard

    guard = BudgetGuard(terms.max_epsilon, terms.delta, terms.accountant)
    if planned and before < terms.max_epsilon:
        # The least noise worth training with is σ = expected batch (noise equal to the largest
        # averaged gradient): if even that does not fit, skip the σ search — nothing useful is left.
        base = plan_mechanism(size, settings.batch_size, settings.local_epochs, 1.0)
        batch = max(base.sample_rate * size, 1.0)
        least = Mechanism(batch, base.sample_rate, base.steps)
        if not _quiet(guard.would_exceed, history + [least] * (remaining - 1), least, before).allowed:
            return Forecast(name, remaining, remaining, None, before, terms.max_epsilon,
                            f"its budget leaves less than σ = {batch:.3g} (the expected batch) allows", math.inf)
    try:
        mechanism = _quiet(plan_round, settings, terms, size, prior)
    except GuardPlanError as err:
        return Forecast(name, 0, remaining, None, before, terms.max_epsilon, str(err))

    def fits(k: int) -> bool:  # the guard's own check for round k, after k - 1 planned rounds
        return k == 0 or _quiet(guard.would_exceed, history + [mechanism] * (k - 1), mechanism, before).allowed

    lo, hi = 0, remaining
    if not fits(hi):  # ε grows with rounds: bisect for the last round that fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        hi = lo
    reason = "" if hi else (
        f"one more round at σ={mechanism.noise_multiplier:.3g} would pass its budget ε={terms.max_epsilon:g} "
        f"(its history holds ε={before:.3f} at δ={terms.delta:g})"
    )
    ratio = mechanism.noise_multiplier / max(mechanism.sample_rate * size, 1.0)
    return Forecast(name, hi, remaining, mechanism.noise_multiplier, before, terms.max_epsilon, reason, ratio)


def _forecast_fixed(name: str, distributed, history: list, before: float, remaining: int, terms) -> Forecast:
    """A forecast for a mechanism the run fixes (distributed DP): the rounds of it that fit the budget."""
    from fedsilo.shared.budget import BudgetGuard

    mechanism, pooled_batch = distributed
    guard = BudgetGuard(terms.max_epsilon, terms.delta, terms.accountant)
    sigma = math.sqrt(mechanism.mu) / mechanism.l2

    def fits(k: int) -> bool:
        return k == 0 or _quiet(guard.would_exceed, history, replace(mechanism, steps=k), before).allowed

    lo, hi = 0, remaining
    if not fits(hi):
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        hi = lo
    reason = "" if hi else (f"one distributed-DP round at σ={sigma:.3g} would pass its budget ε={terms.max_epsilon:g} "
                            f"(its history holds ε={before:.3f} at δ={terms.delta:g})")
    return Forecast(name, hi, remaining, sigma, before, terms.max_epsilon, reason, sigma / max(pooled_batch, 1.0))
