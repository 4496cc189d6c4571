"""The privacy ledger: one append-only JSON-lines file per department.

Each line records one round of DP-SGD the department ran — the mechanism
(noise multiplier, sample rate, steps, clipping norm), δ, the accountant, and ε of
the department's *whole history* at that δ.  The ledger is the source of truth for
the budget: a department that restarts re-reads it and continues from there.

Writes are atomic: the new file is written beside the old one, flushed to disk
and renamed over it, under an exclusive lock, so a crash leaves either the old or
the new ledger, never a torn line, and two processes cannot interleave appends.

Entries are tamper-evident: each carries the hash of the entry before it
(``prev_hash``; the first one the department's genesis hash) and an ECDSA
signature by the department's key over everything else, so an edited, deleted,
reordered or foreign entry breaks the chain or a signature.  Truncating whole
entries off the end leaves a valid chain: that is caught by cross-checking the
coordinator's record (``fedsilo audit``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator

from cryptography.hazmat.primitives.asymmetric import ec

from .accounting import Mechanism
from .signing import Signer, fingerprint, verify

LEDGER_VERSION = 2
# The name the coordinator keeps its client-level DP ledger under.
COORDINATOR = "coordinator"


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
    prev_hash: str = ""
    signer: str = ""  # fingerprint of the signing key
    signature: str = ""
    version: int = LEDGER_VERSION

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    def payload(self) -> bytes:
        """What the signature covers: every field but the signature, canonically."""
        body = {k: v for k, v in asdict(self).items() if k != "signature"}
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

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


def genesis_hash(department: str) -> str:
    """``prev_hash`` of a department's first entry."""
    return hashlib.sha256(f"fedsilo-ledger-v{LEDGER_VERSION}:{department}".encode()).hexdigest()


@dataclass
class Verification:
    """What reading a ledger line by line found: the entries and every problem."""

    entries: list[LedgerEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    signatures_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_ledger(
    path: Path | str, department: str, public_key: ec.EllipticCurvePublicKey | None = None
) -> Verification:
    """Check a ledger's chain, order and (with ``public_key``) signatures.

    Never raises on bad content: every problem is named with its line and the
    likely tampering (edited, deleted, reordered, forged).  Entries after the
    first problem are still read so that all problems are reported.
    """
    path = Path(path)
    result = Verification(signatures_checked=public_key is not None)
    if not path.exists():
        return result
    expected_signer = fingerprint(public_key) if public_key is not None else None
    prev_hash, expected_seq, prev_eps = genesis_hash(department), 0, None
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:
        result.problems.append(f"line {len(lines)}: no final newline (torn write or truncated?)")
    for lineno, line in enumerate(lines, start=1):
        where = f"line {lineno}"
        try:
            entry = LedgerEntry.from_dict(json.loads(line))
        except (ValueError, TypeError) as err:
            result.problems.append(f"{where}: not a valid entry ({err}) (edited or torn?)")
            continue
        if entry.department != department:
            result.problems.append(f"{where}: belongs to department '{entry.department}', not '{department}'")
        if entry.seq != expected_seq:
            kind = "missing before it (deleted?)" if entry.seq > expected_seq else "out of order (reordered or duplicated?)"
            result.problems.append(f"{where}: seq {entry.seq} where {expected_seq} was expected: entries {kind}")
        if entry.prev_hash != prev_hash:
            result.problems.append(
                f"{where}: prev_hash does not match the entry before it (an entry before it was edited, deleted or reordered)"
            )
        if expected_signer is not None:
            if entry.signer != expected_signer:
                result.problems.append(
                    f"{where}: signed by key {entry.signer or 'none'}, not the department's {expected_signer} (forged?)"
                )
            elif not verify(public_key, entry.payload(), entry.signature):  # type: ignore[arg-type]
                result.problems.append(f"{where}: signature does not match the content (edited?)")
        if prev_eps is not None and entry.epsilon < prev_eps - 1e-12 and entry.delta == result.entries[-1].delta:
            result.problems.append(f"{where}: ε={entry.epsilon:.4f} is lower than the previous {prev_eps:.4f}")
        result.entries.append(entry)
        prev_hash, expected_seq, prev_eps = entry.hash, entry.seq + 1, entry.epsilon
    return result


class PrivacyLedger:
    """A department's ledger file.

    Parameters
    ----------
    path : Path
        The ``.jsonl`` file; created (with its folder) on first append.
    department : str
        The department this ledger belongs to; a file holding another
        department's entries is refused.
    signer : Signer, optional
        The department's key: needed to append, and used to verify every
        signature when the ledger is read.
    """

    def __init__(self, path: Path | str, department: str, signer: Signer | None = None) -> None:
        if not department:
            raise ValueError("department must be a non-empty name")
        self.path = Path(path)
        self.department = department
        self.signer = signer
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
        found = verify_ledger(self.path, self.department, self.signer.public_key if self.signer else None)
        if not found.ok:
            raise LedgerError(
                f"ledger '{self.path}' {found.problems[0]}; the budget cannot be known, so "
                "nothing will train against it. Restore the ledger from backup and audit it "
                "with `fedsilo audit`"
            )
        return found.entries

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
        """Append one signed round atomically and return the entry written.

        ``expected_seq`` is the number of entries the caller's ε was computed
        from.  If the file holds a different number by the time the lock is
        taken — another process appended, or the file was replaced — nothing is
        written: an ε computed from another history would be wrong.
        """
        if self.signer is None:
            raise ValueError("appending needs the department's signing key (signer=...)")
        with self._locked():
            current = self._read()
            if expected_seq is not None and len(current) != expected_seq:
                raise LedgerError(
                    f"ledger '{self.path}' changed while this round ran: it held "
                    f"{expected_seq} entries, now {len(current)}; the round is not recorded "
                    "and its update must not be released. Is another process using this ledger?"
                )
            self._entries = current
            last = current[-1] if current else None
            if last is not None and epsilon < last.epsilon and delta == last.delta:
                raise LedgerError(
                    f"ledger '{self.path}': new ε={epsilon:.4f} is lower than the recorded "
                    f"ε={last.epsilon:.4f}: ε of a growing history cannot shrink"
                )
            unsigned = LedgerEntry(
                seq=len(current),
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
                prev_hash=last.hash if last else genesis_hash(self.department),
                signer=self.signer.fingerprint,
            )
            entry = replace(unsigned, signature=self.signer.sign(unsigned.payload()))
            lines = [e.to_json() for e in [*current, entry]]
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
