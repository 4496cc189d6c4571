"""Auditing one ledger: its chain and signatures, and every ε re-derived by independent accountants."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np

from fedsilo.shared import accounting, safe_read
from fedsilo.shared.ledger import LedgerEntry, first_entry, signer_of, verify_ledger
from fedsilo.shared.safe_read import UnreadableFile
from fedsilo.shared.signing import SigningKeyError, fingerprint, load_public_key

from .result import EXACT_MAX_EPSILON, PLD_ONLY_SLACK, PRV_MAX_STEPS, TOLERANCE, DepartmentAudit


# ----------------------------------------------------------------------------- ε


def _history(entries: list[LedgerEntry]) -> list[tuple[float, float, int]]:
    # Identical mechanisms grouped (composition commutes): PRV's cost grows with
    # the number of distinct terms, and a long ledger repeats one mechanism.
    return accounting.merge_history(e.mechanism for e in entries)


def prv_feasible(entries: list[LedgerEntry]) -> bool:
    """Whether Opacus' PRV can re-derive this history in bounded memory and time."""
    return all(steps <= PRV_MAX_STEPS for _, _, steps in _history(entries))


def _opacus_epsilon(entries: list[LedgerEntry], accountant: str, delta: float) -> float | None:
    """ε of ``entries`` by Opacus' ``accountant`` ("rdp" or "prv"), or None where PRV cannot in bounds."""
    history = _history(entries)
    if not history:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    if not prv_feasible(entries):
        return None
    from opacus.accountants import PRVAccountant  # torch: only where a ledger is re-derived

    acc = PRVAccountant()
    acc.history = history
    with np.errstate(divide="ignore"):  # PRV at q = 1 takes log(0) on the way
        return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus' ``RDPAccountant.get_epsilon`` of ``history``, each mechanism's per-step RDP computed once.

    The same sums in the same order as the accountant's (RDP is linear in the steps), so the
    same float; auditing a ledger re-derives every prefix of it, and one mechanism repeats.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum([_rdp_per_step(sigma, q) * steps for sigma, q, steps in history])
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.flags.writeable = False  # shared by every caller
    return rdp


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
    # Entries before the first distributed-DP round hold Gaussian rounds only: PLD, PRV and RDP apply to them.
    first = next((i for i, e in enumerate(entries) if e.private and e.kind == "skellam"), len(entries))
    checkpoints = range(1, len(entries) + 1) if every_entry else [len(entries)]
    for i in checkpoints:
        if i <= first:
            _check_gaussian_prefix(row, entries, i)
    if first < len(entries):
        _check_distributed(row, entries, every_entry, first)
        return
    delta = entries[-1].delta
    row.epsilon_rdp = _opacus_epsilon(private, "rdp", delta)
    if row.epsilon_rdp > EXACT_MAX_EPSILON:
        row.findings.append(
            f"ε ≈ {row.epsilon_rdp:.0f} by RDP, past {EXACT_MAX_EPSILON:g}: such a history protects nothing, and "
            "PLD and PRV (whose cost grows with ε) were not re-derived"
        )
        return
    row.epsilon_prv = _opacus_epsilon(private, "prv", delta)
    if row.epsilon_prv is None:
        row.findings.append(
            f"Opacus PRV not re-derived: one mechanism ran more than {PRV_MAX_STEPS} steps, past what PRV "
            "evaluates in bounded memory; PLD and RDP re-derived ε"
        )
    row.epsilon_pld = pld_epsilon(private, delta)


def _check_gaussian_prefix(row: DepartmentAudit, entries: list[LedgerEntry], i: int) -> None:
    """Entry ``i - 1``'s recorded ε against its history of Gaussian rounds, re-derived (RDP, then PLD and PRV)."""
    recorded = entries[i - 1]
    if not recorded.private:
        return
    prefix = [e for e in entries[:i] if e.private]
    # RDP is a sound upper bound and cheap: a record at or above it is no
    # under-report.  Past EXACT_MAX_EPSILON only RDP is affordable.
    rdp = _opacus_epsilon(prefix, "rdp", recorded.delta)
    if recorded.epsilon >= rdp:
        return
    if rdp > EXACT_MAX_EPSILON:
        if recorded.epsilon < rdp / 2:
            row.problems.append(
                f"entry seq {recorded.seq}: recorded ε={recorded.epsilon:.4f} is below half the re-derived "
                f"RDP ε={rdp:.1f} at δ={recorded.delta:g}: budget under-reported"
            )
        return
    # Both PRV (its certified upper bound) and PLD (pessimistic) are sound:
    # a recorded ε below the lower of the two is an under-report.  PLD
    # first; PRV only when PLD finds the record too low (it is the slower).
    pld = pld_epsilon(prefix, recorded.delta)
    if recorded.epsilon >= pld * (1 - TOLERANCE) - 1e-9:
        return
    prv = _opacus_epsilon(prefix, "prv", recorded.delta)
    floor = min(prv, pld) if prv is not None else pld * (1 - PLD_ONLY_SLACK)
    if recorded.epsilon < floor * (1 - TOLERANCE) - 1e-9:
        shown = f"PRV {prv:.4f}, " if prv is not None else "PRV not run: too many steps; "
        row.problems.append(
            f"entry seq {recorded.seq}: recorded ε={recorded.epsilon:.4f} is below the re-derived "
            f"ε ({shown}PLD {pld:.4f}) at δ={recorded.delta:g}: budget under-reported"
        )


def _check_distributed(row: DepartmentAudit, entries: list[LedgerEntry], every_entry: bool, first: int) -> None:
    """A history with distributed-DP rounds: every Skellam entry's sensitivity and trust assumption, and ε
    re-derived in RDP by the audit's own code (:mod:`.skellam_check`) from ``entries[first]``, the first Skellam
    round, on (PLD and PRV do not apply to such a history)."""
    from . import skellam_check

    for e in entries:
        if e.private and e.kind == "skellam":
            problem = skellam_check.sensitivity_problem(e)
            if problem:
                row.problems.append(problem)
    checkpoints = range(first + 1, len(entries) + 1) if every_entry else [len(entries)]
    seen = None
    for i in checkpoints:
        recorded = entries[i - 1]
        if not recorded.private:
            continue
        prefix = [e for e in entries[:i] if e.private]
        seen = skellam_check.history_epsilon(prefix, recorded.delta)
        if recorded.epsilon < seen * (1 - TOLERANCE) - 1e-9:
            row.problems.append(f"entry seq {recorded.seq}: recorded ε={recorded.epsilon:.4f} is below the "
                                f"re-derived RDP ε={seen:.4f} (Skellam and Gaussian rounds) at δ={recorded.delta:g}: "
                                "budget under-reported")
    private = [e for e in entries if e.private]
    last_checked = checkpoints[-1] == len(entries) and entries[-1].private
    row.epsilon_rdp = seen if last_checked else skellam_check.history_epsilon(private, private[-1].delta)
    last = [e for e in private if e.kind == "skellam"][-1]
    row.findings.append(
        f"distributed DP: {sum(e.steps for e in private if e.kind == 'skellam')} Skellam round(s), re-derived in RDP "
        f"by the audit's own code; the last assumes at most {last.colluders} of {last.participants} departments "
        f"collude and a threshold of {last.threshold} (each share μ/{last.threshold - last.colluders})")


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
