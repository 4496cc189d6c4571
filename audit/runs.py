"""Auditing a run or a folder of ledgers: every ledger, the coordinator's record, the summary and the model card."""

from __future__ import annotations

import os
from pathlib import Path

from fedsilo.shared.ledger import COORDINATOR
from fedsilo.shared.model_card import CARD_FILE, CardError, card_problems, read_card
from fedsilo.shared.record import RECORD_FILE, RecordVerification, verify_record
from fedsilo.shared.runs import EVENTS, SIMULATION, resolve_run_dir
from fedsilo.shared.safe_read import UnreadableFile
from fedsilo.shared.signing import SigningKeyError, load_public_key
from fedsilo.shared.summary_format import Summary, read_summary

from .ledgers import _certificate_key, audit_ledger, format_date
from .result import AuditResult, DepartmentAudit


# ----------------------------------------------------------------------------- runs


def cross_check_central(summary: Summary, row: DepartmentAudit) -> None:
    """Every client-level release the summary records must be in the coordinator's ledger."""
    run_id = summary.run_id
    for rnd in summary.rounds:
        release = rnd.central
        if release is None:
            continue
        # The last: a release charged just before the coordinator died stays in the ledger, before the re-run's.
        entry = next((e for e in reversed(row.entries) if e.run_id == run_id and e.round == rnd.round), None)
        if entry is None:
            row.problems.append(
                f"the run released a client-level DP model in round {rnd.round} of run {run_id}, "
                "but the coordinator's ledger has no entry for it (truncated or deleted?)"
            )
        elif release.epsilon is None or abs(release.epsilon - entry.epsilon) > 1e-9 * max(1.0, abs(entry.epsilon)):
            stated = "none" if release.epsilon is None else f"ε={release.epsilon:.4f}"
            row.problems.append(
                f"round {rnd.round}: the run recorded client-level {stated}, "
                f"the coordinator's ledger says ε={entry.epsilon:.4f} (edited?)"
            )
    row.budget = summary.central.max_epsilon if summary.central else None
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


def cross_check(summary: Summary, rows: dict[str, DepartmentAudit]) -> None:
    """A run without a coordinator record (fedsilo 0.1): compare its summary with the ledgers, by name."""
    run_id = summary.run_id
    for rnd in summary.rounds:
        for name in rnd.trained:
            if name not in rows:
                continue
            entry = next((e for e in rows[name].entries if e.run_id == run_id and e.round == rnd.round), None)
            if entry is None:
                rows[name].problems.append(
                    f"the coordinator saw '{name}' train round {rnd.round} of run {run_id}, "
                    "but its ledger has no entry for it (truncated or deleted?)"
                )
                continue
            reported = rnd.epsilon.get(name)
            if reported is not None and abs(reported - entry.epsilon) > 1e-9 * max(1.0, abs(reported)):
                rows[name].problems.append(
                    f"round {rnd.round}: the coordinator recorded ε={reported:.4f}, the ledger "
                    f"says ε={entry.epsilon:.4f} (edited?)"
                )
    for name, row in rows.items():
        if row.budget is None:
            row.budget = _budget(summary, name)
        row.verified = not row.problems


def _budget(summary: Summary, name: str) -> float | None:
    """The budget the summary states for department ``name``, else the run's."""
    totals = summary.departments.get(name)
    budget = (totals.max_epsilon if totals else None) or summary.max_epsilon
    return float(budget) if budget is not None else None


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
        files = [f for f in sorted(folder.glob("*.jsonl")) if f.name != EVENTS]  # the run's events are no ledger
        if os.path.lexists(path / "summary.json"):
            try:
                summary = read_summary(path / "summary.json")
            except UnreadableFile as err:
                unreadable.append(f"the run's summary: {err}")
        if summary is not None and summary.central is not None:
            central_file = Path(summary.central.ledger)
            if not central_file.is_absolute():
                central_file = path / central_file
        elif os.path.lexists(path / "central" / f"{COORDINATOR}.jsonl"):
            central_file = path / "central" / f"{COORDINATOR}.jsonl"
    if record is None and summary is not None and summary.record:
        record = Path(summary.record) if Path(summary.record).is_absolute() else path / summary.record
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
        cross_check_record(verification, result.departments, result, expect_all=summary is not None and summary.ledgers is not None and (path / "ledgers").is_dir())
        if deployment and collected:
            given = {row.identity for row in result.departments}
            missing = sorted({ack.department for ack in verification.entries
                              if summary is not None and ack.run_id == summary.run_id and ack.identity not in given})
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
            row.budget = _budget(summary, row.id)
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
