"""The privacy audit: verify ledgers and re-derive every ε independently.

For each ledger the audit

1. verifies the hash chain, the order, the identity (one key signs a whole
   ledger) and every signature — against the public keys given with ``--keys``
   (matched by fingerprint; nothing beside the ledger is trusted then), or the
   ``.pub`` files kept beside a simulated ledger (self-consistency only);
2. re-derives ε after every entry from the recorded mechanisms with accountants
   independent of the one that wrote it — Opacus' PRV and RDP, and Google's
   dp-accounting PLD — and flags any recorded ε below the re-derived PLD or PRV
   value (a budget under-reported);
3. checks each entry against the budget it records, δ against 1/records, and
   names every budget change, δ change and non-private round (findings: shown,
   never hidden under "verified");
4. cross-checks the coordinator's signed record of the ledger heads it
   acknowledged (``shared/record.py``): every acknowledged head must be in the
   ledger of that identity with the same ε — this is what catches entries
   truncated off the end, a ledger restored from an older copy, and forks.

:attr:`AuditResult.checked` and :attr:`AuditResult.unavailable` say exactly
what was and was not verified.  A ledger that is missing, empty, a symlink
loop, not a regular file, or not readable as ledger entries never verifies: it
is named in :attr:`AuditResult.unreadable` (``fedsilo audit`` exits 2 for it).
Every file is read through :mod:`fedsilo.shared.safe_read`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

from . import accounting, safe_read
from .ledger import COORDINATOR, LedgerEntry, first_entry, signer_of, verify_ledger
from .model_card import CARD_FILE, CardError, card_problems, read_card
from .record import RECORD_FILE, RecordVerification, verify_record
from .runs import SIMULATION, resolve_run_dir
from .safe_read import UnreadableFile
from .signing import SigningKeyError, fingerprint, load_public_key

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


# ----------------------------------------------------------------------------- ε


def _history(entries: list[LedgerEntry]) -> list[tuple[float, float, int]]:
    # Identical mechanisms grouped (composition commutes): PRV's cost grows with
    # the number of distinct terms, and a long ledger repeats one mechanism.
    return accounting.merge_history(e.mechanism for e in entries)


def prv_feasible(entries: list[LedgerEntry]) -> bool:
    """Whether Opacus' PRV can re-derive this history in bounded memory and time."""
    return all(steps <= PRV_MAX_STEPS for _, _, steps in _history(entries))


def _opacus_epsilon(entries: list[LedgerEntry], accountant_cls, delta: float) -> float | None:
    acc = accountant_cls()
    acc.history = _history(entries)
    if not acc.history:
        return 0.0
    if accountant_cls is PRVAccountant and not prv_feasible(entries):
        return None
    with np.errstate(divide="ignore"):  # PRV at q = 1 takes log(0) on the way
        return float(acc.get_epsilon(delta=delta))


def pld_epsilon(entries: list[LedgerEntry], delta: float) -> float:
    """ε of the history with dp-accounting's PLD accountant (independent of Opacus)."""
    return accounting.pld_epsilon(_history(entries), delta)


# ----------------------------------------------------------------------------- ledgers


def key_index(folder: Path) -> tuple[dict[str, tuple[str, object]], list[str]]:
    """Fingerprint -> (file name, public key) of every ``*.pub`` and ``coordinator.crt`` in ``folder``."""
    index: dict[str, tuple[str, object]] = {}
    problems: list[str] = []
    if not folder.is_dir():
        return index, [f"the key folder '{folder}' does not exist"]
    for candidate in sorted(folder.glob("*.pub")) + sorted(folder.glob("coordinator.crt")):
        try:
            key = _certificate_key(candidate) if candidate.suffix == ".crt" else load_public_key(candidate)
        except SigningKeyError as err:
            problems.append(str(err))
            continue
        index.setdefault(fingerprint(key), (candidate.name, key))
    return index, problems


def audit_ledger(path: Path, keys: Path | None = None, rederive_every_entry: bool = True) -> DepartmentAudit:
    """Verify one ledger file and re-derive its ε."""
    row = DepartmentAudit(id=_department_of(path), path=str(path))
    if not os.path.lexists(path):
        row.problems.append("the ledger does not exist: a missing ledger proves nothing")
        row.unreadable = True
        return row
    # Only the keys the auditor trusts: with --keys, a .pub beside the ledger
    # could have been written by whoever re-signed it.
    folder = keys if keys else path.parent
    index, key_problems = key_index(folder)
    row.problems += key_problems if keys else []
    signer = signer_of(path)
    row.identity = signer
    match = index.get(signer)
    public_key = match[1] if match else None
    if match:
        row.key = f"{match[0]} in {folder}" + ("" if keys else " (beside the ledger: consistency only, not proof)")
    found = verify_ledger(path, public_key)
    row.problems += found.problems
    row.unreadable = bool(found.unreadable)
    if not found.entries and not found.problems:
        row.problems.append("the ledger is empty: it holds no entry, so it proves nothing (truncated, or never written?)")
        row.unreadable = True
    if public_key is None and found.entries:
        row.problems.append(
            f"no public key with fingerprint {signer or '(none)'} in {folder}"
            + (" (--keys is the only place looked; keys beside the ledger are not trusted)" if keys else "")
            + ": signatures cannot be verified"
        )
    row.entries = found.entries
    row.signatures = "not checked" if public_key is None else ("INVALID" if any("sign" in p for p in found.problems) else "valid")
    if found.entries:
        _describe(row, found.entries)
        _check_epsilon(row, found.entries, rederive_every_entry)
        _check_terms(row, found.entries)
    row.verified = not row.problems
    return row


def _describe(row: DepartmentAudit, entries: list[LedgerEntry]) -> None:
    last = entries[-1]
    row.id = last.department
    row.names = list(dict.fromkeys(e.department for e in entries))
    row.records, row.first, row.last = last.num_examples, entries[0].timestamp, last.timestamp
    row.software = list(dict.fromkeys(e.software or "fedsilo 0.1 (ledger v2)" for e in entries))
    row.delta, row.rounds = last.delta, len(entries)
    row.steps = sum(e.steps for e in entries)
    row.noise_multiplier, row.sample_rate = last.noise_multiplier, last.sample_rate
    row.epsilon = last.epsilon if all(e.private for e in entries) else float("inf")
    if last.budget:
        row.budget = last.budget
    if len(row.names) > 1:
        row.findings.append(f"one identity under {len(row.names)} names: {', '.join(row.names)}")


def _check_epsilon(row: DepartmentAudit, entries: list[LedgerEntry], every_entry: bool) -> None:
    private = [e for e in entries if e.private]
    if not private:
        return
    checkpoints = range(1, len(entries) + 1) if every_entry else [len(entries)]
    for i in checkpoints:
        recorded = entries[i - 1]
        if not recorded.private:
            continue
        prefix = [e for e in entries[:i] if e.private]
        # RDP is a sound upper bound and cheap: a record at or above it is no
        # under-report.  Past EXACT_MAX_EPSILON only RDP is affordable.
        rdp = _opacus_epsilon(prefix, RDPAccountant, recorded.delta)
        if recorded.epsilon >= rdp:
            continue
        if rdp > EXACT_MAX_EPSILON:
            if recorded.epsilon < rdp / 2:
                row.problems.append(
                    f"entry seq {recorded.seq}: recorded ε={recorded.epsilon:.4f} is below half the re-derived "
                    f"RDP ε={rdp:.1f} at δ={recorded.delta:g}: budget under-reported"
                )
            continue
        # Both PRV (its certified upper bound) and PLD (pessimistic) are sound:
        # a recorded ε below the lower of the two is an under-report.  PLD
        # first; PRV only when PLD finds the record too low (it is the slower).
        pld = pld_epsilon(prefix, recorded.delta)
        if recorded.epsilon >= pld * (1 - TOLERANCE) - 1e-9:
            continue
        prv = _opacus_epsilon(prefix, PRVAccountant, recorded.delta)
        floor = min(prv, pld) if prv is not None else pld * (1 - PLD_ONLY_SLACK)
        if recorded.epsilon < floor * (1 - TOLERANCE) - 1e-9:
            shown = f"PRV {prv:.4f}, " if prv is not None else "PRV not run: too many steps; "
            row.problems.append(
                f"entry seq {recorded.seq}: recorded ε={recorded.epsilon:.4f} is below the re-derived "
                f"ε ({shown}PLD {pld:.4f}) at δ={recorded.delta:g}: budget under-reported"
            )
    delta = entries[-1].delta
    row.epsilon_rdp = _opacus_epsilon(private, RDPAccountant, delta)
    if row.epsilon_rdp > EXACT_MAX_EPSILON:
        row.findings.append(
            f"ε ≈ {row.epsilon_rdp:.0f} by RDP, past {EXACT_MAX_EPSILON:g}: such a history protects nothing, and "
            "PLD and PRV (whose cost grows with ε) were not re-derived"
        )
        return
    row.epsilon_prv = _opacus_epsilon(private, PRVAccountant, delta)
    if row.epsilon_prv is None:
        row.findings.append(
            f"Opacus PRV not re-derived: one mechanism ran more than {PRV_MAX_STEPS} steps, past what PRV "
            "evaluates in bounded memory; PLD and RDP re-derived ε"
        )
    row.epsilon_pld = pld_epsilon(private, delta)


def _check_terms(row: DepartmentAudit, entries: list[LedgerEntry]) -> None:
    """Budgets, δ and privacy over the history: failures and findings, each named."""
    for prev, entry in zip([None, *entries], entries):
        when = f"entry seq {entry.seq} ({format_date(entry.timestamp)})"
        if entry.num_examples and not entry.delta < 1.0 / entry.num_examples:
            row.problems.append(f"{when}: δ={entry.delta:g} is not below 1/{entry.num_examples} records")
        if entry.private and entry.budget and entry.epsilon > entry.budget * (1 + TOLERANCE):
            row.problems.append(f"{when}: ε={entry.epsilon:.4f} is past the budget {entry.budget:g} in force then")
        if not entry.private:
            row.findings.append(f"{when}: trained WITHOUT differential privacy (the department's policy allowed it): no finite ε covers this ledger")
        if prev is None:
            continue
        if prev.delta != entry.delta:
            row.findings.append(f"{when}: δ changed from {prev.delta:g} to {entry.delta:g}; ε before and after are at different δ")
        if prev.accountant != entry.accountant:
            row.findings.append(f"{when}: accountant changed from {prev.accountant} to {entry.accountant} (same history, re-measured)")
        if prev.budget and entry.budget and prev.budget != entry.budget:
            change = "raised" if entry.budget > prev.budget else "lowered"
            row.findings.append(f"{when}: budget {change} from {prev.budget:g} to {entry.budget:g}")
    budgets = [e.budget for e in entries if e.budget]
    if budgets and np.isfinite(row.epsilon) and row.epsilon > min(budgets) * (1 + TOLERANCE):
        row.findings.append(
            f"ε={row.epsilon:.4f} is past the earliest budget {min(budgets):g}: spent only because the budget was raised"
        )


def format_date(timestamp: float | None) -> str:
    """A ledger timestamp as the audit shows it (UTC), "–" when unknown."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp)) if timestamp else "–"


def _certificate_key(path: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = x509.load_pem_x509_certificate(safe_read.read_bytes(path, safe_read.MAX_KEY_BYTES, "certificate")).public_key()
    except UnreadableFile as err:
        raise SigningKeyError(str(err)) from None
    except ValueError as err:
        raise SigningKeyError(f"cannot read the certificate '{path}': {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SigningKeyError(f"the certificate '{path}' does not hold an EC key")
    return key


def _department_of(path: Path) -> str:
    first = first_entry(path)  # read safely: the file may be a FIFO, a directory, binary
    name = first.get("department") if first else None
    return name if isinstance(name, str) and 0 < len(name) <= 1024 else path.stem


# ----------------------------------------------------------------------------- runs


def cross_check_central(summary: dict, row: DepartmentAudit) -> None:
    """Every client-level release the summary records must be in the coordinator's ledger."""
    run_id = str(summary.get("run_id", ""))
    for rnd in summary.get("rounds", []):
        release = rnd.get("central")
        if release is None:
            continue
        # The last: a release charged just before the coordinator died stays in the ledger, before the re-run's.
        entry = next((e for e in reversed(row.entries) if e.run_id == run_id and e.round == rnd["round"]), None)
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


def cross_check_record(record: RecordVerification, rows: list[DepartmentAudit], result: "AuditResult",
                       expect_all: bool) -> None:
    """Every head the coordinator acknowledged must be in that identity's ledger, with the same ε.

    ``expect_all``: the audited folder should hold every department's ledger
    (a simulated run); otherwise heads of identities not audited are skipped.
    """
    by_identity = {row.identity: row for row in rows if row.identity}
    for ack in record.entries:
        row = by_identity.get(ack.identity)
        if row is None:
            if expect_all:
                result.problems.append(
                    f"the coordinator acknowledged {ack.ledger_seq} entries of '{ack.department}' "
                    f"({ack.identity}) in run {ack.run_id}, but there is no ledger of that identity here"
                )
            continue
        row.acknowledged += 1
        held = len(row.entries)
        if held < ack.ledger_seq:
            row.problems.append(
                f"the coordinator acknowledged {ack.ledger_seq} entries (run {ack.run_id}, round {ack.round}, "
                f"{format_date(ack.timestamp)}), but this ledger holds {held}: truncated, restored from an older copy, "
                "or replaced (rolled back)"
            )
            continue
        if ack.ledger_seq == 0:
            continue
        entry = row.entries[ack.ledger_seq - 1]
        if entry.hash != ack.ledger_head:
            row.problems.append(
                f"entry seq {entry.seq} differs from the one the coordinator acknowledged in run {ack.run_id}, "
                f"round {ack.round}: the ledger forked or was edited"
            )
        elif entry.private and ack.epsilon >= 0 and abs(entry.epsilon - ack.epsilon) > 1e-9 * max(1.0, ack.epsilon):
            row.problems.append(
                f"entry seq {entry.seq}: the department stated ε={ack.epsilon:.4f} to the coordinator, "
                f"the ledger says {entry.epsilon:.4f} (edited?)"
            )
    for row in rows:
        row.verified = not row.problems


def cross_check(summary: dict, rows: dict[str, DepartmentAudit]) -> None:
    """A run without a coordinator record (fedsilo 0.1): compare its summary with the ledgers, by name."""
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
        if row.budget is None:
            budget = summary.get("departments", {}).get(name, {}).get("max_epsilon") or summary.get("max_epsilon")
            row.budget = float(budget) if isinstance(budget, (int, float)) else None
        row.verified = not row.problems


def _record_key(record_path: Path, keys: Path | None) -> tuple[object | None, str]:
    """The coordinator's public key for its record: from --keys (coordinator.crt/.pub), else beside it."""
    folder = keys if keys else record_path.parent
    for name in ("coordinator.crt", "coordinator.pub"):
        candidate = folder / name
        if candidate.exists():
            try:
                key = _certificate_key(candidate) if candidate.suffix == ".crt" else load_public_key(candidate)
            except SigningKeyError:
                continue
            return key, f"{candidate}" + ("" if keys else " (beside the record: consistency only)")
    return None, ""


def _ledger_files(places) -> list[Path]:
    """The ``*.jsonl`` ledgers in each given folder, or each given file (any other kind: read, and refused, as a ledger)."""
    files = []
    for place in map(Path, places):
        if not os.path.lexists(place):
            raise FileNotFoundError(f"--ledgers '{place}' does not exist; give a folder of collected ledgers or a .jsonl ledger")
        found = sorted(place.glob("*.jsonl")) if _is_folder(place) and place.suffix != ".jsonl" else [place]
        if not found:
            raise FileNotFoundError(f"--ledgers '{place}' holds no ledger (*.jsonl)")
        files += found
    return files


def audit_path(path: Path | str, keys: Path | str | None = None, record: Path | str | None = None,
               ledgers=()) -> AuditResult:
    """Audit a run directory (or an output folder's latest run), a ledger directory, or one ledger file.

    ``record`` is the coordinator's record of acknowledged heads; a run
    directory names its own in ``summary.json``.  ``ledgers``: more ledger
    folders or files to audit with it — a deployment's run folder holds none,
    since each department's ledger stays on its host; an auditor collects them.
    """
    path = resolve_run_dir(path)  # an output folder stands for its latest run
    keys = Path(keys) if keys else None
    if not os.path.lexists(path):
        raise FileNotFoundError(f"'{path}' does not exist; give a run directory, a ledger directory or a .jsonl ledger")
    collected = _ledger_files(ledgers)
    summary = None
    central_file = None
    unreadable: list[str] = []
    if not _is_folder(path) or path.suffix == ".jsonl":  # a file, or anything named as one: read (and refused) as a ledger
        files = [path]
    else:
        folder = path / "ledgers" if (path / "ledgers").is_dir() else path
        files = sorted(folder.glob("*.jsonl"))
        if os.path.lexists(path / "summary.json"):
            try:
                summary = read_summary(path / "summary.json")
            except UnreadableFile as err:
                unreadable.append(f"the run's summary: {err}")
        if summary is not None and summary.get("central"):
            central_file = Path(summary["central"]["ledger"])
            if not central_file.is_absolute():
                central_file = path / central_file
        elif os.path.lexists(path / "central" / f"{COORDINATOR}.jsonl"):
            central_file = path / "central" / f"{COORDINATOR}.jsonl"
    if record is None and summary is not None and summary.get("record"):
        record = Path(summary["record"]) if Path(summary["record"]).is_absolute() else path / summary["record"]
    elif record is None and path.is_dir() and os.path.lexists(path / "record" / RECORD_FILE):
        record = path / "record" / RECORD_FILE
    record = Path(record) if record else None
    # A deployment's run folder: the coordinator's files only, no ledgers/ of its own.
    deployment = summary is not None and not (path / "ledgers").exists() and not (path / SIMULATION).exists()
    files = [f for f in dict.fromkeys([*files, *collected]) if f != record]
    audited = [audit_ledger(f, keys) for f in files]
    if central_file is not None and central_file not in files:
        audited.append(audit_ledger(central_file, keys))
    central = next((row for row in audited if row.id == COORDINATOR), None)
    result = AuditResult([row for row in audited if row is not central], central=central, unreadable=unreadable)
    result.problems += unreadable
    if deployment and not collected:
        result.unavailable.append(
            "the departments' ledgers: a deployment's stay on the department hosts, so ε was not re-derived "
            "and no acknowledged head was found in its ledger; collect a copy of each and add --ledgers DIR"
        )
    elif not files and central is None:
        result.unreadable.append(f"no ledgers (*.jsonl) found in '{path}': a missing ledger never verifies")
        result.problems.append(result.unreadable[-1])
    if central_file is not None and not os.path.lexists(central_file):
        result.problems.append(f"the run used client-level DP but its coordinator ledger '{central_file}' is missing")
    if summary is not None and central is not None:
        _guarded(result, "the run summary", cross_check_central, summary, central)
    _say_what_was_checked(result, keys)
    verification = None
    if record is not None and os.path.lexists(record):
        key, where = _record_key(record, keys)
        try:
            verification = verify_record(record, key)
        except UnreadableFile as err:
            result.unreadable.append(f"the coordinator's record: {err}")
            result.problems.append(result.unreadable[-1])
    if verification is not None:
        result.problems += [f"coordinator record: {p}" for p in verification.problems]
        cross_check_record(verification, result.departments, result, expect_all=summary is not None and summary.get("ledgers") is not None and (path / "ledgers").is_dir())
        if deployment and collected:
            given = {row.identity for row in result.departments}
            missing = sorted({ack.department for ack in verification.entries
                              if ack.run_id == summary.get("run_id") and ack.identity not in given})
            if missing:
                result.unavailable.append(
                    f"the ledgers of {', '.join(missing)}: acknowledged in this run's record but not given "
                    "with --ledgers, so their ε and heads were not checked"
                )
        result.checked.append(
            f"the coordinator's record {record}: {len(verification.entries)} acknowledged ledger heads, "
            + (f"signatures checked against {where}" if key is not None else "its own signatures NOT checked (no coordinator key)")
            + "; every head found in its department's ledger (truncation, rollback and forks)"
        )
        if key is None:
            result.unavailable.append(
                "the coordinator's public key (coordinator.crt in --keys): the record's own signatures were not verified"
            )
    else:
        if record is not None and not os.path.lexists(record):
            result.problems.append(f"the coordinator's record '{record}' does not exist")
        result.unavailable.append(
            "the coordinator's record of acknowledged heads (give --record FILE, or audit a run folder): "
            "entries truncated off the end of a ledger, or a ledger restored from an older copy, cannot be detected"
        )
        if summary is not None and result.departments:
            _guarded(result, "the run summary", cross_check, summary, {row.id: row for row in result.departments})
            result.checked.append("the run's summary.json (unsigned, by name) against the ledgers")
    for row in result.departments:
        if row.budget is None and summary is not None:
            budget = summary.get("departments", {}).get(row.id, {}).get("max_epsilon") or summary.get("max_epsilon")
            row.budget = float(budget) if isinstance(budget, (int, float)) else None
    if path.is_dir() and os.path.lexists(path / CARD_FILE):
        key, where = _record_key(record, keys) if record is not None else (None, "")
        _guarded(result, "the model card", cross_check_card, path, verification, result, key, where)
    return result


def _guarded(result: AuditResult, what: str, check, *args) -> None:
    """Run a cross-check over a file a coordinator wrote; a malformed one is unreadable, not a crash."""
    try:
        check(*args)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
        result.unreadable.append(f"{what} is malformed ({type(err).__name__}: {str(err)[:120]}); it is not a file fedsilo wrote")
        result.problems.append(result.unreadable[-1])


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a symlink loop: not a folder, and refused when read as a ledger
        return False


def read_summary(path: Path) -> dict:
    """A run's ``summary.json``, read safely and checked for the shape the audit relies on."""
    summary = safe_read.load_json(path, "run summary")
    shape = {"run_id": (str, int), "rounds": list, "departments": dict, "central": (dict, type(None)),
             "record": (str, type(None)), "ledgers": object, "max_epsilon": (int, float, type(None))}
    for name, kind in shape.items():
        if name in summary and not isinstance(summary[name], kind):
            raise UnreadableFile(path, f"the run summary's '{name}' is of the wrong type", hint="it is not a summary fedsilo wrote")
    if not all(isinstance(r, dict) and type(r.get("round")) is int for r in summary.get("rounds", [])):
        raise UnreadableFile(path, "the run summary's rounds must be objects with a whole 'round'", hint="it is not a summary fedsilo wrote")
    central = summary.get("central")
    if central and not isinstance(central.get("ledger"), str):
        raise UnreadableFile(path, "the run summary's central 'ledger' must be a path", hint="it is not a summary fedsilo wrote")
    if not all(isinstance(v, dict) for v in summary.get("departments", {}).values()):
        raise UnreadableFile(path, "the run summary's departments must be objects", hint="it is not a summary fedsilo wrote")
    return summary


def _same_epsilon(stated: float | None, acknowledged: float) -> bool:
    """The card's ε (None: trained without DP) against an acknowledged head's (-1: without DP)."""
    if stated is None or acknowledged < 0:
        return stated is None and acknowledged < 0
    return abs(stated - acknowledged) <= 1e-9 * max(1.0, acknowledged)


def cross_check_card(run_dir: Path, record: RecordVerification | None, result: "AuditResult",
                     key, where: str) -> None:
    """The run's model card: its signature and weights, and that every ε it states is what was recorded.

    Each department's ε in the card must be a head the coordinator acknowledged
    (same identity, entry count, head hash and ε) and, where that ledger is
    audited here, the ε of that ledger entry; the client-level ε must be the
    coordinator's ledger's at the end of the run.
    """
    try:
        card = read_card(run_dir)
    except CardError as err:
        result.problems.append(f"model card: {err}")
        return
    problems = [f"model card: {p}" for p in card_problems(card, run_dir, key)]
    acks = record.entries if record is not None else []
    by_identity = {row.identity: row for row in result.departments if row.identity}
    for stated in card.get("privacy", {}).get("record_level", []):
        name, identity, seq = stated.get("department"), stated.get("identity"), int(stated.get("ledger_seq", 0))
        epsilon = stated.get("epsilon")
        match = [a for a in acks if a.identity == identity and a.ledger_seq == seq and a.ledger_head == stated.get("ledger_head")]
        if record is not None and not match:
            problems.append(f"model card: {name}'s ε (ledger entry {seq}) is not a head the coordinator acknowledged")
        elif match and not _same_epsilon(epsilon, match[-1].epsilon):
            problems.append(f"model card: {name}: the card states ε={epsilon}, the department stated ε={match[-1].epsilon:.6g}")
        row = by_identity.get(identity)
        if row is not None and 0 < seq <= len(row.entries) and epsilon is not None:
            entry = row.entries[seq - 1]
            if abs(entry.epsilon - epsilon) > 1e-9 * max(1.0, epsilon):
                problems.append(f"model card: {name}: the card states ε={epsilon:.6g}, its ledger entry {seq} says {entry.epsilon:.6g}")
    central = card.get("privacy", {}).get("client_level")
    if central and result.central is not None:
        mine = [e for e in result.central.entries if e.run_id == card.get("run_id")]
        if mine and abs(mine[-1].epsilon - float(central["epsilon"])) > 1e-9 * max(1.0, mine[-1].epsilon):
            problems.append(f"model card: the client-level ε it states ({central['epsilon']:.6g}) is not the coordinator ledger's ({mine[-1].epsilon:.6g})")
    result.problems += problems
    result.checked.append(
        f"the model card {run_dir / CARD_FILE}: its signature ("
        + (f"against {where}" if key is not None else "against the key it names: consistency only")
        + "), the weights' SHA-256, and every ε it states against the coordinator's record and the ledgers"
    )


def _say_what_was_checked(result: AuditResult, keys: Path | None) -> None:
    rows = [row for row in result.rows if not row.unreadable]  # nothing was checked in a file not read
    if not rows:
        return
    result.checked.append(f"{len(rows)} ledger(s): hash chains, order, one identity per ledger")
    signed = [row for row in rows if row.signatures == "valid"]
    if keys:
        result.checked.append(f"signatures of {len(signed)} ledger(s) against the keys in {keys} (matched by fingerprint)")
    elif signed:
        result.checked.append(
            f"signatures of {len(signed)} ledger(s) against the .pub beside each ledger: consistency only"
        )
        result.unavailable.append(
            "independent public keys (--keys DIR): a ledger re-signed with a new key beside it would pass"
        )
    result.checked.append("every recorded ε re-derived with dp-accounting PLD and Opacus PRV/RDP; budgets, δ against 1/records")
