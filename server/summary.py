"""The run summary: ``RUN_DIR/summary.json``, rewritten atomically after every round.

A run that dies mid-way still leaves a valid summary of the rounds it finished.
A round that fails (too few usable updates, an error while aggregating) is
kept apart, under ``failed_rounds``: who did what in it, why it failed, and
which departments' ledgers were charged for it (``charged``) — a resume runs
that round again, and the departments that trained it send the same update
again without a new charge.  Every number is written as JSON can hold it:
NaN and ±∞ become ``null``.  The file's format (its fields, their types, its
version) is :mod:`fedsilo.shared.summary_format`.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from fedsilo.shared.accounting import MIXED_ACCOUNTANT
from fedsilo.shared.runs import SUMMARY
from fedsilo.shared.summary_format import (
    RUNNING, Asked, Central, DepartmentTotals, FailedRound, Resume, RoundCentral, RoundRecord, Summary, Traffic,
)

from .events import EventLog, RunEnded
from .strategy import RoundReport

SUMMARY_FILE = SUMMARY  # one name for the file, declared in shared/runs.py


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: ε without DP (∞) is written as null (as are NaN and a missing value)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    """Held-out metrics as JSON can hold them: a diverged model's NaN or ∞ loss is null, never a crash."""
    return {str(key): _finite(value) for key, value in metrics.items()}


def _participation(report: RoundReport) -> dict[str, Any]:
    """Who did what in a round, as the summary's round records say it (the fields of a Participation)."""
    return {
        "trained": sorted(report.trained),
        "refused": dict(sorted(report.refused.items())),
        "rejected": dict(sorted(report.rejected.items())),
        "failed": dict(sorted(report.failed.items())),
        "incompatible": dict(sorted(report.incompatible.items())),
        "declined": dict(sorted(report.declined.items())),
        "rolled_back": dict(sorted(report.rolled_back.items())),
        "replayed": dict(sorted(report.replayed.items())),
        "bounded": {name: _finite(norm) for name, norm in sorted(report.clipped.items())},
        # A rejected update was charged all the same.
        "charged": {name: {**what, "epsilon": _finite(what.get("epsilon"))}
                    for name, what in sorted(report.charged.items())},
        "secagg": report.secagg,
        "upload_bytes": dict(sorted(report.upload_bytes.items())),
    }


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to the run directory when inside its output folder, so the folder can move."""
    path, base = Path(path).resolve(), Path(base).resolve()
    if path.is_relative_to(base.parent):
        return os.path.relpath(path, base)
    return str(path)


class RunSummary:
    """Accumulates rounds and per-department totals in a :class:`Summary`; writes ``summary.json``."""

    def __init__(
        self, out_dir: Path, run_id: str, settings: dict[str, Any], dataset: dict[str, Any], record: Path | None = None
    ):
        self.path = Path(out_dir) / SUMMARY_FILE
        self.started = time.time()
        self.events: EventLog | None = None  # told when the run ends (server/events.py)
        dp = bool(settings["dp"])
        self.summary = Summary(
            run_id=run_id,
            settings=settings,
            dataset=dataset,
            dp=dp,
            # Each department's own δ (see `departments`); this is the largest of them.
            delta=(settings["delta"] or None) if dp else None,
            asked=Asked(delta=settings["delta"] or None, max_epsilon=settings["max-epsilon"] or None,
                        accountant=settings["accountant"] or None, dp=dp),
            accountant=(settings["accountant"] or "each department's") if dp else None,
            max_epsilon=(settings["max-epsilon"] or None) if dp else None,
            ledgers="ledgers",
            record=_relative(record, out_dir) if record is not None else None,
        )
        self._epsilon: dict[str, float | None] = {}

    @classmethod
    def restore(cls, out_dir: Path, data: dict[str, Any]) -> "RunSummary":
        """The summary as a checkpoint left it (its JSON object), to continue a resumed run."""
        summary = cls.__new__(cls)
        summary.path = Path(out_dir) / SUMMARY_FILE
        summary.events = None
        summary.summary = Summary.from_dict(data, f"the checkpoint's copy of {summary.path}")
        summary.started = time.time() - float(summary.summary.wall_time_s)
        rounds, failed = summary.summary.rounds, summary.summary.failed_rounds
        summary._epsilon = dict(rounds[-1].epsilon) if rounds else {}
        if failed and (not rounds or failed[-1].round > rounds[-1].round):
            summary._epsilon.update(failed[-1].epsilon)
        return summary

    def resumed(self, after_round: int, flower_run_id: str) -> None:
        """Say that the run continues after ``after_round`` (a restarted coordinator)."""
        self.summary.status, self.summary.stop_reason = RUNNING, ""
        self.summary.resumes.append(Resume(after_round=after_round, flower_run_id=flower_run_id, at=time.time()))
        self.write()

    def set_initial(self, metrics: dict[str, float], task: str) -> None:
        """The untrained model's held-out metrics (``accuracy`` is None for regression)."""
        metrics = _metrics(metrics)
        self.summary.task = task
        self.summary.initial = {"accuracy": metrics.get("accuracy"), **metrics}
        self.write()

    def set_central(self, central) -> None:
        """Record the coordinator's client-level DP settings (a :class:`ClientLevelDP`)."""
        self.summary.central = Central(
            level="client (each department's whole contribution)",
            noise_multiplier=central.noise_multiplier,
            clip_norm=central.clipping_norm,
            sample_rate=central.sample_rate,
            delta=central.delta,
            max_epsilon=central.guard.max_epsilon,
            accountant=MIXED_ACCOUNTANT if central.distributed is not None else central.guard.accountant,
            ledger=_relative(central.ledger.path, self.path.parent),
            epsilon=central.epsilon,
            distributed=central.distributed is not None,
        )
        self.write()

    def _record_departments(self, report: RoundReport) -> dict[str, DepartmentTotals]:
        """Fold ``report``'s ε, budgets and δ into the per-department totals; the departments dict."""
        for name, eps in report.epsilon.items():
            self._epsilon[name] = _finite(eps)
        departments = self.summary.departments
        for name in {*report.trained, *report.refused, *report.rejected, *report.epsilon, *report.declined,
                     *report.charged, *report.budget, *report.delta}:
            departments.setdefault(name, DepartmentTotals())
        for name, eps in self._epsilon.items():
            if name in departments:
                departments[name].epsilon = eps
        for name, budget in report.budget.items():
            departments[name].max_epsilon = _finite(budget)
        for name, delta in report.delta.items():
            departments[name].delta = _finite(delta)
        deltas = [d.delta for d in departments.values() if d.delta]
        if deltas and self.summary.dp:
            self.summary.delta = max(deltas)
        return departments

    def add_round(
        self, rnd: int, metrics: dict[str, float], report: RoundReport, seconds: float, release=None
    ) -> None:
        metrics = _metrics(metrics)
        accuracy, loss = metrics.get("accuracy"), metrics.get("loss")
        departments = self._record_departments(report)
        for name in report.trained:
            departments[name].rounds_trained += 1
            departments[name].steps += report.steps.get(name, 0)
            departments[name].num_examples = report.trained[name]
        for name in report.refused:
            departments[name].rounds_refused += 1
        record = RoundRecord(
            round=rnd, accuracy=accuracy, loss=loss, metrics=dict(metrics),
            epsilon=dict(sorted(self._epsilon.items())), **_participation(report), seconds=round(seconds, 3),
        )
        self.summary.rounds.append(record)
        resumes = self.summary.resumes
        if resumes and resumes[-1].replayed is None and resumes[-1].after_round == rnd - 1:
            resumes[-1].replayed = sorted(report.replayed)
            resumes[-1].trained = sorted(set(report.trained) - set(report.replayed))
        if release is not None:  # a CentralRelease
            record.central = RoundCentral(epsilon=release.epsilon, sampled=release.sampled,
                                          population=release.population)
            self.summary.central.epsilon = release.epsilon
        self.summary.final_accuracy = accuracy
        self.summary.final_loss = loss
        self.summary.final_metrics = dict(metrics)
        self.write()

    def add_failed_round(self, rnd: int, report: RoundReport | None, reason: str, seconds: float) -> None:
        """Keep a round that produced no model under ``failed_rounds`` (``rounds`` holds completed ones).

        ``report`` is what was known when it failed (None: it failed before any
        reply was read).  The ε its departments reached is kept, since their
        ledgers were charged; their round counts are not, since nothing of the
        round was used.
        """
        report = report if report is not None else RoundReport()
        self._record_departments(report)
        self.summary.failed_rounds.append(FailedRound(
            round=rnd, reason=reason, epsilon=dict(sorted(self._epsilon.items())), **_participation(report),
            seconds=round(seconds, 3),
        ))
        self.write()

    def set_traffic(self, arrays, model) -> None:
        """What each round sends a department (``arrays``, the global model as it travels), against the whole model."""
        self.summary.traffic = Traffic(
            model_bytes=int(sum(len(a.data) for a in arrays.values())),
            whole_model_bytes=int(sum(p.numel() * p.element_size() for p in model.parameters())
                                  + sum(b.numel() * b.element_size() for b in model.buffers())))
        self.write()

    def add_secagg_session(self, setup) -> None:
        """A secure-aggregation session opened (a ``SecAggSetup``): its parameters and setup cost."""
        self.summary.secure_aggregation.append(setup)
        self.write()

    def finish(self, status: str, reason: str = "", model_file: str | None = None, card_file: str | None = None) -> None:
        self.summary.status = status
        self.summary.stop_reason = reason
        self.summary.model = model_file
        self.summary.model_card = card_file
        self.write()
        if self.events is not None:
            self.events.emit(RunEnded(status=status, reason=reason, task=self.summary.task or "multiclass",
                                      metrics=dict(self.summary.final_metrics)))

    def write(self) -> None:
        """Rewrite ``summary.json`` atomically: a reader sees the old file or the new one, never half."""
        self.summary.wall_time_s = round(time.time() - self.started, 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(self.summary.to_json(), encoding="utf-8")
        os.replace(tmp, self.path)
