"""ε of ledger entries re-derived without fedsilo's code: what the tests compare against."""

from __future__ import annotations

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant


def pld_epsilon(entries: list[dict], delta: float) -> float:
    """dp-accounting's PLD (fedsilo's default accountant), composed entry by entry as recorded."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for e in entries:
        gaussian = dp_accounting.GaussianDpEvent(e["noise_multiplier"])
        event = gaussian if e["sample_rate"] == 1.0 else dp_accounting.PoissonSampledDpEvent(e["sample_rate"], gaussian)
        acc.compose(event, e["steps"])
    return float(acc.get_epsilon(delta))
