"""The privacy audit: verify ledgers and re-derive every ε independently.

For each department ledger the audit

1. verifies the hash chain, the order and every signature (public key given
   with ``--keys``, or the ``NAME.pub`` kept beside a simulated ledger);
2. re-derives ε after every entry from the recorded mechanisms with accountants
   independent of the one that wrote it — Opacus' PRV and RDP, and Google's
   dp-accounting PLD — and flags any recorded ε below the re-derived PLD or PRV
   value (a budget under-reported);
3. cross-checks the coordinator's record (``summary.json``): every round in
   which the coordinator saw a department train must be in its ledger with the
   same ε — this is what catches entries truncated off the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

from . import accounting
from .ledger import COORDINATOR, LedgerEntry, verify_ledger
from .signing import SigningKeyError, load_public_key

# Relative slack when comparing a recorded ε with a re-derived one.
TOLERANCE = 1e-6


@dataclass
class DepartmentAudit:
    id: str
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
    problems: list[str] = field(default_factory=list)
    entries: list[LedgerEntry] = field(default_factory=list, repr=False)  # as verified

    @property
    def left(self) -> float | None:
        """What is left of the budget (``None`` when the budget is not known)."""
        return None if self.budget is None else max(self.budget - self.epsilon, 0.0)

    def to_json(self) -> dict:
        return {
            "id": self.id, "epsilon": self.epsilon, "delta": self.delta, "rounds": self.rounds,
            "steps": self.steps, "verified": self.verified, "signatures": self.signatures,
            "epsilon_prv": self.epsilon_prv, "epsilon_rdp": self.epsilon_rdp, "epsilon_pld": self.epsilon_pld,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "budget": self.budget, "left": self.left,
            "ledger": self.path, "problems": self.problems,
        }


@dataclass
class AuditResult:
    departments: list[DepartmentAudit]
    problems: list[str] = field(default_factory=list)  # not tied to one ledger
    # The coordinator's client-level DP ledger, when the run had one.
    central: DepartmentAudit | None = None

    @property
    def rows(self) -> list[DepartmentAudit]:
        """Every audited ledger: the departments', then the coordinator's."""
        return self.departments + ([self.central] if self.central else [])

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and all(d.verified for d in self.departments)
            and (self.central is None or self.central.verified)
        )

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "departments": [d.to_json() for d in self.departments],
            "central": None if self.central is None else {**self.central.to_json(), "level": "client"},
            "problems": self.problems,
        }


# ----------------------------------------------------------------------------- ε


def _history(entries: list[LedgerEntry]) -> list[tuple[float, float, int]]:
    # Identical mechanisms grouped (composition commutes): PRV's cost grows with
    # the number of distinct terms, and a long ledger repeats one mechanism.
    return accounting.merge_history(e.mechanism for e in entries)


def _opacus_epsilon(entries: list[LedgerEntry], accountant_cls, delta: float) -> float:
    acc = accountant_cls()
    acc.history = _history(entries)
    if not acc.history:
        return 0.0
    with np.errstate(divide="ignore"):  # PRV at q = 1 takes log(0) on the way
        return float(acc.get_epsilon(delta=delta))


def pld_epsilon(entries: list[LedgerEntry], delta: float) -> float:
    """ε of the history with dp-accounting's PLD accountant (independent of Opacus)."""
    return accounting.pld_epsilon(_history(entries), delta)


# ----------------------------------------------------------------------------- ledgers


def audit_ledger(path: Path, keys: Path | None = None, rederive_every_entry: bool = True) -> DepartmentAudit:
    """Verify one ledger file and re-derive its ε."""
    department = _department_of(path)
    row = DepartmentAudit(id=department, path=str(path))
    public_key = None
    if keys:
        # Only the keys the auditor trusts: a .pub beside the ledger could have
        # been written by whoever re-signed it.
        candidates = [keys / f"{department}.pub"]
        if department == COORDINATOR:
            candidates.append(keys / "coordinator.crt")  # the coordinator signs with its TLS key
    else:
        candidates = [path.with_name(f"{department}.pub")]
    for candidate in candidates:
        if candidate.exists():
            try:
                public_key = _certificate_key(candidate) if candidate.suffix == ".crt" else load_public_key(candidate)
            except SigningKeyError as err:
                row.problems.append(str(err))
            break
    found = verify_ledger(path, department, public_key)
    row.problems += found.problems
    if public_key is None:
        row.problems.append(
            f"no public key for '{department}' in {keys or path.parent}"
            + (" (--keys is the only place looked; keys beside the ledger are not trusted)" if keys else "")
            + ": signatures cannot be verified"
        )
    row.entries = found.entries
    row.signatures = "not checked" if public_key is None else ("INVALID" if any("sign" in p for p in found.problems) else "valid")
    entries = found.entries
    if entries:
        last = entries[-1]
        row.epsilon, row.delta = last.epsilon, last.delta
        row.rounds, row.steps = len(entries), sum(e.steps for e in entries)
        row.noise_multiplier, row.sample_rate = last.noise_multiplier, last.sample_rate
        checkpoints = range(1, len(entries) + 1) if rederive_every_entry else [len(entries)]
        for i in checkpoints:
            prefix, recorded = entries[:i], entries[i - 1]
            # Both PRV (its certified upper bound) and PLD (pessimistic) are sound:
            # a recorded ε below the lower of the two is an under-report.  PLD
            # first; PRV only when PLD finds the record too low (it is the slower).
            pld = pld_epsilon(prefix, recorded.delta)
            if recorded.epsilon >= pld * (1 - TOLERANCE) - 1e-9:
                continue
            prv = _opacus_epsilon(prefix, PRVAccountant, recorded.delta)
            if recorded.epsilon < min(prv, pld) * (1 - TOLERANCE) - 1e-9:
                row.problems.append(
                    f"entry seq {recorded.seq}: recorded ε={recorded.epsilon:.4f} is below the re-derived "
                    f"ε (PRV {prv:.4f}, PLD {pld:.4f}) at δ={recorded.delta:g}: budget under-reported"
                )
        row.epsilon_prv = _opacus_epsilon(entries, PRVAccountant, last.delta)
        row.epsilon_rdp = _opacus_epsilon(entries, RDPAccountant, last.delta)
        row.epsilon_pld = pld_epsilon(entries, last.delta)
    row.verified = not row.problems
    return row


def _certificate_key(path: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = x509.load_pem_x509_certificate(path.read_bytes()).public_key()
    except (OSError, ValueError) as err:
        raise SigningKeyError(f"cannot read the certificate '{path}': {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SigningKeyError(f"the certificate '{path}' does not hold an EC key")
    return key


def _department_of(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
        return str(json.loads(first)["department"]) if first.strip() else path.stem
    except (ValueError, KeyError, TypeError, OSError):
        return path.stem


# ----------------------------------------------------------------------------- runs


def cross_check_central(summary: dict, row: DepartmentAudit) -> None:
    """Every client-level release the summary records must be in the coordinator's ledger."""
    run_id = str(summary.get("run_id", ""))
    for rnd in summary.get("rounds", []):
        release = rnd.get("central")
        if release is None:
            continue
        entry = next((e for e in row.entries if e.run_id == run_id and e.round == rnd["round"]), None)
        if entry is None:
            row.problems.append(
                f"the run released a client-level DP model in round {rnd['round']} of run {run_id}, "
                "but the coordinator's ledger has no entry for it (truncated or deleted?)"
            )
        elif abs(release["epsilon"] - entry.epsilon) > 1e-9 * max(1.0, abs(entry.epsilon)):
            row.problems.append(
                f"round {rnd['round']}: the run recorded client-level ε={release['epsilon']:.4f}, "
                f"the coordinator's ledger says ε={entry.epsilon:.4f} (edited?)"
            )
    row.budget = summary.get("central", {}).get("max_epsilon")
    row.verified = not row.problems


def cross_check(summary: dict, rows: dict[str, DepartmentAudit]) -> None:
    """Compare the coordinator's record of a run with the department ledgers."""
    run_id = str(summary.get("run_id", ""))
    for rnd in summary.get("rounds", []):
        for name in rnd.get("trained", []):
            if name not in rows:
                continue
            entry = next((e for e in rows[name].entries if e.run_id == run_id and e.round == rnd["round"]), None)
            if entry is None:
                rows[name].problems.append(
                    f"the coordinator saw '{name}' train round {rnd['round']} of run {run_id}, "
                    "but its ledger has no entry for it (truncated or deleted?)"
                )
                continue
            reported = rnd.get("epsilon", {}).get(name)
            if reported is not None and abs(reported - entry.epsilon) > 1e-9 * max(1.0, abs(reported)):
                rows[name].problems.append(
                    f"round {rnd['round']}: the coordinator recorded ε={reported:.4f}, the ledger "
                    f"says ε={entry.epsilon:.4f} (edited?)"
                )
    for name, row in rows.items():
        if name == COORDINATOR:
            continue
        budget = summary.get("departments", {}).get(name, {}).get("max_epsilon") or summary.get("max_epsilon")
        row.budget = float(budget) if budget is not None else None
        row.verified = not row.problems


def audit_path(path: Path | str, keys: Path | str | None = None) -> AuditResult:
    """Audit a run directory, a ledger directory, or one ledger file."""
    path = Path(path)
    keys = Path(keys) if keys else None
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist; give a run directory, a ledger directory or a .jsonl ledger")
    summary = None
    central_file = None
    if path.is_file():
        files = [path]
    else:
        folder = path / "ledgers" if (path / "ledgers").is_dir() else path
        files = sorted(folder.glob("*.jsonl"))
        if (path / "summary.json").exists():
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        if summary is not None and summary.get("central"):
            central_file = Path(summary["central"]["ledger"])
            if not central_file.is_absolute():
                central_file = path / central_file
        elif (path / "central" / f"{COORDINATOR}.jsonl").exists():
            central_file = path / "central" / f"{COORDINATOR}.jsonl"
    audited = [audit_ledger(f, keys) for f in files]
    if central_file is not None and central_file not in files:
        audited.append(audit_ledger(central_file, keys))
    central = next((row for row in audited if row.id == COORDINATOR), None)
    result = AuditResult([row for row in audited if row is not central], central=central)
    if not files and central is None:
        result.problems.append(f"no ledgers (*.jsonl) found in '{path}'")
    if central_file is not None and not central_file.exists():
        result.problems.append(f"the run used client-level DP but its coordinator ledger '{central_file}' is missing")
    if summary is not None and central is not None:
        cross_check_central(summary, central)
    if summary is not None:
        rows = {row.id: row for row in result.departments}
        cross_check(summary, rows)
        missing = {n for r in summary.get("rounds", []) for n in r.get("trained", [])} - set(rows)
        for name in sorted(missing):
            result.problems.append(f"the coordinator saw '{name}' train, but there is no ledger for it here")
    return result
