"""Robust aggregation: ``--aggregation fedavg | trimmed-mean | median | krum``.

Each rule is Flower's own Message-API strategy (``flwr.serverapp.strategy``)
under :class:`~fedsilo.server.strategy.DepartmentFedAvg`: the replies are first
sorted (trained / refused / rejected / failed / ...) and, with
``max-update-norm``, bounded; only the accepted updates reach Flower's rule.

What Flower 1.41's rules do with the model (read from their source):

* ``trimmed-mean`` — :class:`~flwr.serverapp.strategy.FedTrimmedAvg`: per
  coordinate, sort the n values, drop ``int(β·n)`` at each end (β =
  ``trim-fraction``), average the rest, *unweighted*.  With ``int(β·n) = 0``
  it silently trims nothing; fedsilo refuses that.
* ``median`` — :class:`~flwr.serverapp.strategy.FedMedian`: the coordinate-wise
  median (``np.median``), *unweighted*.
* ``krum`` — :class:`~flwr.serverapp.strategy.Krum` (MultiKrum selecting one):
  score each update by the sum of squared L2 distances to its ``n − f − 2``
  nearest others (f = ``byzantine``) and return the lowest-scoring update
  itself; weighting one selected update changes nothing.  Flower clamps
  ``n − f − 2`` to at least 1 and so runs below Krum's condition ``n > 2f + 2``;
  fedsilo refuses that.
* ``fedavg`` — the num-examples-weighted mean (:class:`DepartmentFedAvg`).

So no robust rule weights the *model* by the ``num-examples`` a department
reports about itself: a liar cannot buy weight.  (Flower still averages the
train MetricRecord weighted by it; fedsilo's ServerApp does not use that
record.)  FedAvg does weight by it, with or without the norm bound.

The threat model is ``byzantine`` = f departments sending arbitrary updates.
Each rule needs enough accepted updates n to tolerate them: Krum n ≥ 2f + 3,
the median n ≥ 2f + 1, the trimmed mean ``int(β·n) ≥ max(f, 1)`` at each end.
The constructor checks this against ``min_train_nodes`` (fedsilo's
``min-departments``: the fewest a round is sent to); a round where refusals or
failures leave fewer accepted updates raises :class:`TooFewUpdates` (with the
numbers) instead of aggregating without the guarantee.  The ServerApp keeps
that round under the summary's ``failed_rounds`` (who was rejected and why, who
was charged), checkpoints the rounds before it and ends the run as
``too-few-updates``, which ``--resume`` may continue.

What reaches a rule was read by :mod:`fedsilo.server.replies` (one parser for
every rule and for ``--central-dp``): each accepted update has the global
model's layers, dtypes and shapes, finite values within the magnitude bound,
and the same records and keys as every other, so a malformed reply is
``rejected`` with its reason and can neither raise out of the round nor make
Flower's consistency check skip it.

``max-update-norm`` B (any rule): an accepted update whose delta from the
round's global model has L2 norm above B is scaled down to exactly B before
the rule sees it (``RoundReport.clipped``: name -> norm before scaling).  It
bounds how far one department moves a FedAvg round, not who steers it.

Differential privacy:

* **record-level DP at the departments (DP-SGD)** is unaffected by any rule
  here: whatever the coordinator computes from DP updates is post-processing,
  and each department's ε is what its own ledger says.
* **client-level DP at the coordinator (``--central-dp``)** clips each update
  to C and adds Gaussian noise of std σ·C to the *sum* of the clipped updates:
  its ε assumes the released quantity is that noisy sum (one department moves
  it by at most C).  The median, trimmed mean and Krum are not sums; their
  sensitivity is different (Krum releases one department's update outright)
  and the wrapper never calls them anyway — it combines the classified updates
  itself.  :func:`department_strategy` therefore refuses a robust rule with
  ``--central-dp``.  The norm bound *is* allowed with it: it is applied while
  classifying, before the wrapper's own clip to C, so every update's norm is at
  most ``min(B, C)`` and the noise calibrated to C still covers it (with B < C
  the noise is larger than needed).
"""

from __future__ import annotations

import logging
import math
from logging import INFO, WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

from fedsilo.shared.config import AGGREGATIONS, RunSettings

from .strategy import DepartmentFedAvg

__all__ = [
    "DepartmentKrum", "DepartmentMedian", "DepartmentTrimmedMean", "TooFewUpdates", "check_aggregation",
    "department_strategy", "least_updates",
]


class TooFewUpdates(ValueError):
    """A round left fewer accepted updates than the robust rule needs to tolerate ``byzantine`` attackers."""


def least_updates(rule: str, byzantine: int, trim_fraction: float = 0.2) -> int:
    """The fewest accepted updates with which ``rule`` tolerates ``byzantine`` arbitrary ones."""
    f = int(byzantine)
    if rule == "fedavg":
        return 1
    if rule == "median":
        return 2 * f + 1
    if rule == "krum":
        return 2 * f + 3
    if rule == "trimmed-mean":
        if not trim_fraction > 0:
            raise ValueError("trimmed-mean with trim-fraction 0 cuts nothing: no number of updates makes it robust")
        cut = max(f, 1)
        # The least n with int(β·n) ≥ cut (Flower cuts int(β·n) at each end), exact in floating point.
        n = max(1, math.ceil(cut / trim_fraction))
        while n > 1 and int(trim_fraction * (n - 1)) >= cut:
            n -= 1
        while int(trim_fraction * n) < cut:
            n += 1
        return n
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {rule!r}")


def _check_byzantine(byzantine) -> int:
    if isinstance(byzantine, bool) or not isinstance(byzantine, int) or byzantine < 0:
        raise ValueError(f"byzantine (the number of malicious departments assumed) must be an integer >= 0, got {byzantine!r}")
    return byzantine


class _Robust(DepartmentFedAvg):
    """A Flower rule behind fedsilo's classification, with its minimum number of updates enforced."""

    rule = ""

    def __init__(self, *, byzantine: int = 1, **kwargs) -> None:
        self.byzantine = _check_byzantine(byzantine)
        super().__init__(**kwargs)
        least = self.least_updates
        if self.min_train_nodes < least:
            raise ValueError(
                f"{self.rule} with {self._requirement()} needs at least {least} updates a round, but a round may be "
                f"sent to as few as min-departments = {self.min_train_nodes} (min_train_nodes): raise "
                f"--min-departments to {least}" + (" or lower --byzantine" if self.byzantine else "")
            )

    @property
    def least_updates(self) -> int:
        return least_updates(self.rule, self.byzantine, getattr(self, "beta", 0.2))

    def _requirement(self) -> str:
        return f"byzantine = {self.byzantine}"

    def combine(self, server_round: int, accepted: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if len(accepted) < self.least_updates:
            report = self.last_report
            left_out = len(report.refused) + len(report.rejected) + len(report.failed) + len(report.declined) \
                + len(report.incompatible) + len(report.rolled_back)
            reason = (
                f"round {server_round}: {self.rule} with {self._requirement()} needs at least {self.least_updates} "
                f"accepted updates, got {len(accepted)} ({left_out} department(s) refused, failed or were left out); "
                "not aggregating without the guarantee: lower --byzantine, or run with more departments"
            )
            log(WARNING, "%s", reason)
            raise TooFewUpdates(reason)
        return super().combine(server_round, accepted)  # Flower's rule, next in the MRO

    def summary(self) -> None:
        log(INFO, "\t├──> fedsilo %s: byzantine %d, max-update-norm %g (0 = none)", self.rule, self.byzantine,
            self.max_update_norm)
        super().summary()


class DepartmentTrimmedMean(_Robust, FedTrimmedAvg):
    """Flower's :class:`FedTrimmedAvg` (coordinate-wise, unweighted) over the accepted, bounded updates.

    ``trim_fraction`` β: the share cut at each end, in (0, 0.5).
    """

    rule = "trimmed-mean"

    def __init__(self, *, trim_fraction: float = 0.2, **kwargs) -> None:
        if not (isinstance(trim_fraction, (int, float)) and 0 <= trim_fraction < 0.5):
            raise ValueError(f"trim-fraction must be in [0, 0.5) (the share cut at each end), got {trim_fraction!r}")
        if trim_fraction == 0:
            raise ValueError(
                "trimmed-mean with trim-fraction 0 cuts nothing: it is an unweighted mean, not robust; "
                "set --trim-fraction above 0 (e.g. 0.2) or use --aggregation fedavg"
            )
        super().__init__(beta=float(trim_fraction), **kwargs)

    def _requirement(self) -> str:
        cut = max(self.byzantine, 1)
        return f"trim-fraction = {self.beta:g} and byzantine = {self.byzantine} (int(β·n) ≥ {cut} cut at each end)"


class DepartmentMedian(_Robust, FedMedian):
    """Flower's :class:`FedMedian` (coordinate-wise, unweighted) over the accepted, bounded updates."""

    rule = "median"

    def _requirement(self) -> str:
        return f"byzantine = {self.byzantine} (n ≥ 2f + 1)"


class DepartmentKrum(_Robust, Krum):
    """Flower's :class:`Krum`: the one accepted, bounded update closest to its n − f − 2 nearest others."""

    rule = "krum"

    def __init__(self, *, byzantine: int = 1, **kwargs) -> None:
        super().__init__(byzantine=byzantine, num_malicious_nodes=_check_byzantine(byzantine), **kwargs)

    def _requirement(self) -> str:
        return f"byzantine = {self.byzantine} (n > 2f + 2)"


def department_strategy(settings: RunSettings, **fedavg_kwargs) -> DepartmentFedAvg:
    """The strategy for settings.aggregation, with settings.max_update_norm applied.

    ``fedavg_kwargs`` are :class:`~flwr.serverapp.strategy.FedAvg`'s
    (``fraction_train``, ``min_train_nodes``, ``min_available_nodes``, ...).
    Raises :class:`ValueError` naming the setting for a combination that makes
    no sense: a robust rule with ``--central-dp``, too small a
    ``min-departments`` for the rule and ``byzantine``, a trim-fraction of 0.
    """
    from .secure_aggregation import check_settings  # what --secure-aggregation cannot be combined with

    check_settings(settings)
    rule = settings.aggregation
    if rule not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {rule!r}")
    bound = settings.max_update_norm
    if rule == "fedavg":
        return DepartmentFedAvg(max_update_norm=bound, **fedavg_kwargs)
    if settings.central_dp:
        raise ValueError(
            f"--aggregation {rule} cannot be combined with --central-dp: client-level DP calibrates its noise to a "
            f"sum of updates clipped to central-clip-norm, and a {rule} of updates is no such sum (its sensitivity "
            "differs, so the recorded ε would not cover it). Use --aggregation fedavg with --central-dp "
            "(--max-update-norm still applies), or drop --central-dp"
        )
    if rule == "trimmed-mean":
        return DepartmentTrimmedMean(trim_fraction=settings.trim_fraction, byzantine=settings.byzantine,
                                     max_update_norm=bound, **fedavg_kwargs)
    if rule == "median":
        return DepartmentMedian(byzantine=settings.byzantine, max_update_norm=bound, **fedavg_kwargs)
    return DepartmentKrum(byzantine=settings.byzantine, max_update_norm=bound, **fedavg_kwargs)


def check_aggregation(settings: RunSettings, min_departments: int) -> None:
    """Raise the :class:`ValueError` :func:`department_strategy` would, before anything starts (quietly)."""
    flower = logging.getLogger("flwr")
    level = flower.level
    flower.setLevel(logging.ERROR)  # building a strategy logs Flower's notes on its settings
    try:
        department_strategy(settings, min_train_nodes=min_departments, min_available_nodes=min_departments)
    finally:
        flower.setLevel(level)
