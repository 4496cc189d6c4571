"""The budget guard: may one more mechanism run within an (ε, δ) budget?

A dry run in the style of dp-accounting's ``would exceed`` check: nothing is
composed or recorded; the caller records the mechanism (in its ledger) only
after it ran.  Departments guard their record-level budget with it, the
coordinator its client-level one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable

from . import accounting
from .accounting import Mechanism


class BudgetExhaustedError(RuntimeError):
    """Raised by :meth:`BudgetGuard.spend` when a mechanism would pass the budget."""


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    epsilon_before: float
    epsilon_after: float
    max_epsilon: float
    delta: float
    who: str = "the department"

    @property
    def reason(self) -> str:
        if self.allowed:
            return ""
        return (
            f"budget: this round would take ε from {self.epsilon_before:.3f} to "
            f"{self.epsilon_after:.3f} at δ={self.delta:g}, past max-epsilon "
            f"{self.max_epsilon:g}; {self.who} sits out"
        )


class BudgetGuard:
    """Decides whether one more mechanism fits in an (ε, δ) budget.

    The same guard serves a department (record-level DP-SGD rounds) and the
    coordinator (client-level releases of the aggregate).

    Parameters
    ----------
    max_epsilon : float
        The budget for the whole history.
    delta : float
        δ at which ε is measured.
    accountant : str
        ``pld`` (dp-accounting, default), ``prv`` or ``rdp`` (Opacus).
    who : str
        Who sits out when the budget says no, for the refusal message.
    """

    def __init__(
        self, max_epsilon: float, delta: float, accountant: str = "pld", who: str = "the department"
    ) -> None:
        if not (max_epsilon > 0 and math.isfinite(max_epsilon)):
            raise ValueError(f"max_epsilon must be a positive finite number, got {max_epsilon}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if accountant not in accounting.ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {accounting.ACCOUNTANTS}, got {accountant!r}")
        self.max_epsilon = max_epsilon
        self.delta = delta
        self.accountant = accountant
        self.who = who

    def would_exceed(
        self, history: list[Mechanism], mechanism: Mechanism, epsilon_before: float | None = None
    ) -> BudgetDecision:
        """Dry run: ε before and after adding ``mechanism``; nothing is recorded.

        ``epsilon_before`` may pass the history's known ε (same δ and accountant)
        to save one accountant call.
        """
        before = (
            history_epsilon(history, self.delta, self.accountant)
            if epsilon_before is None
            else epsilon_before
        )
        after = history_epsilon([*history, mechanism], self.delta, self.accountant)
        return BudgetDecision(after <= self.max_epsilon, before, after, self.max_epsilon, self.delta, self.who)

    def spend(self, history: list[Mechanism], mechanism: Mechanism) -> BudgetDecision:
        """Like :meth:`would_exceed`, but raises :class:`BudgetExhaustedError` on refusal."""
        decision = self.would_exceed(history, mechanism)
        if not decision.allowed:
            raise BudgetExhaustedError(decision.reason)
        return decision


def history_epsilon(history: Iterable[Mechanism], delta: float, accountant: str) -> float:
    """:func:`accounting.epsilon`, remembered per merged history in this process.

    ε is a pure function of the merged history, δ and the accountant.  In a
    simulation many departments share a sample rate and σ (the rate is
    ``1/ceil(N/B)``), so they ask the same question each round: one PLD call
    (~20 ms) answers all of them instead of one each.
    """
    history = list(history)
    if any(not isinstance(m, Mechanism) for m in history):  # distributed DP's Skellam rounds: RDP across kinds
        return _mixed_epsilon(accounting.merge_mechanisms(history), delta)
    return _merged_epsilon(tuple(accounting.merge_history(history)), delta, accountant)


@functools.lru_cache(maxsize=1024)
def _mixed_epsilon(history: tuple, delta: float) -> float:
    return accounting.epsilon(list(history), delta)


@functools.lru_cache(maxsize=4096)
def _merged_epsilon(merged: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    return accounting.epsilon([Mechanism(*term) for term in merged], delta, accountant)
