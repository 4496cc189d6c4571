"""The privacy ledger: one append-only JSON-lines file per department.

Each line records one round of DP-SGD the department ran — the mechanism
(noise multiplier, sample rate, steps, clipping norm), δ, the accountant, and ε of
the department's *whole history* at that δ.  The ledger is the source of truth for
the budget: a department that restarts re-reads it and continues from there.

Writes are atomic: the new file is written beside the old one, flushed to disk
and renamed over it, under an exclusive lock, so a crash leaves either the old or
the new ledger, never a torn line, and two processes cannot interleave appends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

from .accounting import Mechanism

LEDGER_VERSION = 1


class LedgerError(RuntimeError):
    """The ledger on disk is unreadable or inconsistent; nothing was written."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round's record.  ``epsilon`` covers every entry up to and including this one."""

    seq: int
    department: str
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon: float
    num_examples: int
    timestamp: float
    version: int = LEDGER_VERSION

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, raw: dict) -> "LedgerEntry":
        names = {f.name for f in fields(cls)}
        missing = names - set(raw) - {"version"}
        if missing:
            raise ValueError(f"missing field(s) {', '.join(sorted(missing))}")
        entry = cls(**{k: raw[k] for k in names if k in raw})
        for name in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta", "epsilon"):
            value = getattr(entry, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"field '{name}' is not a finite number: {value!r}")
        entry.mechanism  # validates ranges
        return entry


class PrivacyLedger:
    """A department's ledger file.

    Parameters
    ----------
    path : Path
        The ``.jsonl`` file; created (with its folder) on first append.
    department : str
        The department this ledger belongs to; a file holding another
        department's entries is refused.
    """

    def __init__(self, path: Path | str, department: str) -> None:
        if not department:
            raise ValueError("department must be a non-empty name")
        self.path = Path(path)
        self.department = department
        self._entries: list[LedgerEntry] = self._read()

    # ------------------------------------------------------------------ reading
    @property
    def entries(self) -> list[LedgerEntry]:
        return list(self._entries)

    @property
    def history(self) -> list[Mechanism]:
        return [e.mechanism for e in self._entries]

    @property
    def epsilon(self) -> float:
        """ε recorded for the whole history so far (0 for an empty ledger)."""
        return self._entries[-1].epsilon if self._entries else 0.0

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self._entries)

    def reload(self) -> None:
        self._entries = self._read()

    def _read(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        entries: list[LedgerEntry] = []
        with open(self.path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    entry = LedgerEntry.from_dict(json.loads(line))
                except (ValueError, TypeError) as err:
                    raise LedgerError(
                        f"ledger '{self.path}' line {lineno} is not a valid entry ({err}); "
                        "the budget cannot be known, so nothing will train against it. "
                        "Restore the ledger from backup or audit it with `fedsilo audit`"
                    ) from err
                self._check_next(entry, entries, lineno)
                entries.append(entry)
        return entries

    def _check_next(self, entry: LedgerEntry, before: list[LedgerEntry], lineno: int) -> None:
        where = f"ledger '{self.path}' line {lineno}"
        if entry.department != self.department:
            raise LedgerError(
                f"{where} belongs to department '{entry.department}', not "
                f"'{self.department}'; point this department at its own ledger"
            )
        if entry.seq != len(before):
            raise LedgerError(
                f"{where} has seq {entry.seq}, expected {len(before)}: entries are "
                "missing or out of order; audit it with `fedsilo audit`"
            )
        if before and entry.epsilon < before[-1].epsilon and entry.delta == before[-1].delta:
            raise LedgerError(
                f"{where} records ε={entry.epsilon:.4f}, lower than the previous "
                f"ε={before[-1].epsilon:.4f}: ε of a growing history cannot shrink"
            )

    # ------------------------------------------------------------------ writing
    def append(
        self,
        *,
        run_id: str,
        round: int,
        mechanism: Mechanism,
        max_grad_norm: float,
        delta: float,
        accountant: str,
        epsilon: float,
        num_examples: int,
        expected_seq: int | None = None,
    ) -> LedgerEntry:
        """Append one round atomically and return the entry written.

        ``expected_seq`` is the number of entries the caller's ε was computed
        from.  If the file holds a different number by the time the lock is
        taken — another process appended, or the file was replaced — nothing is
        written: an ε computed from another history would be wrong.
        """
        with self._locked():
            current = self._read()
            if expected_seq is not None and len(current) != expected_seq:
                raise LedgerError(
                    f"ledger '{self.path}' changed while this round ran: it held "
                    f"{expected_seq} entries, now {len(current)}; the round is not recorded "
                    "and its update must not be released. Is another process using this ledger?"
                )
            self._entries = current
            entry = LedgerEntry(
                seq=len(self._entries),
                department=self.department,
                run_id=str(run_id),
                round=int(round),
                noise_multiplier=float(mechanism.noise_multiplier),
                sample_rate=float(mechanism.sample_rate),
                steps=int(mechanism.steps),
                max_grad_norm=float(max_grad_norm),
                delta=float(delta),
                accountant=accountant,
                epsilon=float(epsilon),
                num_examples=int(num_examples),
                timestamp=time.time(),
            )
            self._check_next(entry, self._entries, len(self._entries) + 1)
            lines = [e.to_json() for e in [*self._entries, entry]]
            _atomic_write(self.path, "".join(line + "\n" for line in lines))
            self._entries.append(entry)
            return entry

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"department": self.department, "entries": [asdict(e) for e in self._entries]}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def ledger_path(ledger_dir: Path | str, department: str) -> Path:
    """Where a department's ledger lives inside a ledger folder."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in department)
    return Path(ledger_dir) / f"{safe}.jsonl"


def read_ledgers(folder: Path | str) -> dict[str, PrivacyLedger]:
    """Every ledger in a folder, by department (read-only use)."""
    out: dict[str, PrivacyLedger] = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
        try:
            department = json.loads(first)["department"] if first.strip() else path.stem
        except (ValueError, KeyError, TypeError) as err:
            raise LedgerError(f"ledger '{path}' line 1 is not a valid entry ({err})") from err
        out[department] = PrivacyLedger(path, department)
    return out
