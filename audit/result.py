"""What an audit found: one row per department's ledger, and the verdict on everything audited."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsilo.shared.ledger import LedgerEntry

# Relative slack when comparing a recorded ε with a re-derived one.
TOLERANCE = 1e-6
# Opacus' PRV grows its grid with the steps (0.7 s at 10^4 steps, 7 s at 10^5,
# 36.7 PiB asked at 10^15): past this many steps of one mechanism it is not run.
PRV_MAX_STEPS = 100_000
# Without PRV, PLD alone judges an under-report: it is pessimistic, and agrees
# with PRV to ~1 % on honest histories, so a PRV-recorded ε gets this slack.
PLD_ONLY_SLACK = 0.02
# PLD's and PRV's cost grows with ε (PLD: 2.5 s at ε ≈ 600, 21 s at ε ≈ 5400):
# past this RDP ε (a history that protects nothing) only RDP is re-derived, and
# a recorded ε below half of RDP's is an under-report (RDP is within 30 % of
# PLD there).
EXACT_MAX_EPSILON = 1000.0


@dataclass
class DepartmentAudit:
    id: str  # the department name on its latest entry
    path: str
    epsilon: float = 0.0
    delta: float | None = None
    rounds: int = 0
    steps: int = 0
    verified: bool = False
    signatures: str = "not checked"  # "valid" | "not checked" | "INVALID"
    epsilon_prv: float | None = None
    epsilon_rdp: float | None = None
    epsilon_pld: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    budget: float | None = None
    identity: str = ""  # the key fingerprint the ledger belongs to
    key: str = ""  # which public key verified it, and from where
    names: list[str] = field(default_factory=list)  # every name the department used
    records: int | None = None  # training records at the latest entry (stays with the ledger)
    first: float | None = None  # timestamps of the first and latest entries
    last: float | None = None
    software: list[str] = field(default_factory=list)  # fedsilo versions that wrote it
    acknowledged: int = 0  # heads of this identity in the coordinator's record, all checked
    problems: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # not failures, never hidden
    entries: list[LedgerEntry] = field(default_factory=list, repr=False)  # as verified
    unreadable: bool = False  # missing, empty, not a regular file, or not ledger entries

    @property
    def left(self) -> float | None:
        """What is left of the budget (``None`` when the budget is not known)."""
        if self.budget is None or not np.isfinite(self.epsilon):
            return None
        return max(self.budget - self.epsilon, 0.0)

    def to_json(self) -> dict:
        finite = lambda v: None if v is None or not np.isfinite(v) else v  # noqa: E731 - JSON has no ∞
        return {
            "id": self.id, "epsilon": finite(self.epsilon), "delta": self.delta, "rounds": self.rounds,
            "steps": self.steps, "verified": self.verified, "signatures": self.signatures,
            "epsilon_prv": self.epsilon_prv, "epsilon_rdp": self.epsilon_rdp, "epsilon_pld": self.epsilon_pld,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "budget": self.budget, "left": self.left, "private": bool(np.isfinite(self.epsilon)),
            "identity": self.identity, "key": self.key, "names": self.names, "records": self.records,
            "first": self.first, "last": self.last, "software": self.software,
            "acknowledged": self.acknowledged, "unreadable": self.unreadable,
            "ledger": self.path, "problems": self.problems, "findings": self.findings,
        }


@dataclass
class AuditResult:
    departments: list[DepartmentAudit]
    problems: list[str] = field(default_factory=list)  # not tied to one ledger
    # The coordinator's client-level DP ledger, when the run had one.
    central: DepartmentAudit | None = None
    checked: list[str] = field(default_factory=list)  # what was verified
    unavailable: list[str] = field(default_factory=list)  # what could not be, and why
    unreadable: list[str] = field(default_factory=list)  # files that could not be read (each also a problem)

    @property
    def rows(self) -> list[DepartmentAudit]:
        """Every audited ledger: the departments', then the coordinator's."""
        return self.departments + ([self.central] if self.central else [])

    @property
    def findings(self) -> list[str]:
        return [f"{row.id}: {f}" for row in self.rows for f in row.findings]

    @property
    def readable(self) -> bool:
        """False when a ledger, the record, the summary or the card could not be read at all."""
        return not self.unreadable and not any(row.unreadable for row in self.rows)

    @property
    def ok(self) -> bool:
        return (
            self.readable
            and not self.problems
            and all(d.verified for d in self.departments)
            and (self.central is None or self.central.verified)
        )

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "departments": [d.to_json() for d in self.departments],
            "central": None if self.central is None else {**self.central.to_json(), "level": "client"},
            "problems": self.problems,
            "findings": self.findings,
            "checked": self.checked,
            "unavailable": self.unavailable,
            "unreadable": self.unreadable + [f"{row.path}: {'; '.join(row.problems[:1])}" for row in self.rows if row.unreadable],
        }
