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
entries off the end leaves a valid chain: that is caught by the coordinator's
signed record of the heads it acknowledged (``shared/record.py``), at the next
round and by ``fedsilo audit``.

A ledger belongs to an **identity** — the fingerprint of the key that signs it
— not to a display name or a file name (version 3): the chain starts from a
genesis hash of that fingerprint, :func:`find_identity_ledger` finds the
identity's file in a folder whatever it is called, and a department started
under another name continues the same history.  Each entry also records the
budget in force, whether the round was private, the size the department
reported, and the fedsilo version that wrote it.

A ledger is read with :mod:`fedsilo.shared.safe_read` (a regular file, bounded,
strict UTF-8, bounded JSON) and every field of every entry is typed and
range-checked, so a crafted file is a named problem, never a crash or a
verified ledger.  At rest a department's ledger is private to its host's user:
its folder is 0700 and its files 0600 (a looser folder is tightened when the
department opens it), since an entry holds the exact ``num_examples``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import stat
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator

from cryptography.hazmat.primitives.asymmetric import ec

from . import safe_read
from .accounting import Mechanism
from .safe_read import UnreadableFile
from .signing import Signer, fingerprint, verify

log = logging.getLogger(__name__)

LEDGER_VERSION = 3
# Fields a version-2 entry (fedsilo 0.1) does not have: left out of its hash and
# signature, so 0.1 ledgers still verify and continue.
V3_FIELDS = ("budget", "private", "reported_size", "software")
# The name the coordinator keeps its client-level DP ledger under.
COORDINATOR = "coordinator"
# Bounds on an entry's numbers: far past any honest round, small enough that
# the accountants re-deriving ε stay bounded in memory and time.
MAX_STEPS = 10**7  # PLD re-derives 10^7 steps in ~2 s, 10^9 in ~45 s
MAX_COUNT = 10**12  # records, rounds, entries
MAX_TEXT = 1024  # department, run id, accountant, software
MAX_TOKEN = 512  # hashes, fingerprints, signatures
FOLDER_MODE, FILE_MODE = 0o700, 0o600
_INTS = {"seq": MAX_COUNT, "round": MAX_COUNT, "steps": MAX_STEPS, "num_examples": MAX_COUNT,
         "reported_size": MAX_COUNT}
_FLOATS = ("noise_multiplier", "sample_rate", "max_grad_norm", "delta", "epsilon", "budget", "timestamp")
_TEXTS = {"department": MAX_TEXT, "run_id": MAX_TEXT, "accountant": MAX_TEXT, "software": MAX_TEXT,
          "prev_hash": MAX_TOKEN, "signer": MAX_TOKEN, "signature": MAX_TOKEN}


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
    signer: str = ""  # fingerprint of the signing key: the ledger's identity
    signature: str = ""
    version: int = LEDGER_VERSION
    budget: float = 0.0  # the department's max-epsilon when this round ran (0: not recorded, v2)
    private: bool = True  # False: trained without DP (the policy allowed it); ε is unbounded from here
    reported_size: int = 0  # the size the department reported for itself (0: not recorded, v2)
    software: str = ""  # the fedsilo version that wrote the entry

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)

    def _body(self) -> dict:
        body = asdict(self)
        if self.version < 3:
            for name in V3_FIELDS:
                body.pop(name)
        return body

    def to_json(self) -> str:
        return json.dumps(self._body(), sort_keys=True, allow_nan=False)

    def payload(self) -> bytes:
        """What the signature covers: every field but the signature, canonically."""
        body = {k: v for k, v in self._body().items() if k != "signature"}
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, raw: dict) -> "LedgerEntry":
        """An entry from its JSON object, every field typed and in range.

        Raises
        ------
        ValueError
            A field is missing, unknown, of the wrong type or out of range
            (a count past :data:`MAX_COUNT`, steps past :data:`MAX_STEPS`, a
            non-finite or negative number, a sample rate outside (0, 1]).
        """
        if not isinstance(raw, dict):
            raise ValueError(f"an entry is a JSON object, not {type(raw).__name__}")
        names = {f.name for f in fields(cls)}
        version = raw.get("version", 2)
        if type(version) is not int or version not in (2, 3):
            raise ValueError(f"field 'version' must be 2 or 3, got {_shown(version)}")
        optional = {"version", *(V3_FIELDS if version < 3 else ())}
        missing = names - set(raw) - optional
        if missing:
            raise ValueError(f"missing field(s) {', '.join(sorted(missing))}")
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))[:200]} (written by a newer fedsilo?)")
        values = {k: raw[k] for k in names if k in raw}
        for name, limit in _INTS.items():
            if name in values:
                value = values[name]
                if type(value) is not int or not 0 <= value <= limit:
                    raise ValueError(f"field '{name}' must be a whole number in [0, {limit}], got {_shown(value)}")
        for name in _FLOATS:
            if name in values:
                value = values[name]
                if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                    raise ValueError(f"field '{name}' must be a finite number >= 0, got {_shown(value)}")
                values[name] = float(value)
        for name, limit in _TEXTS.items():
            if name in values and (type(values[name]) is not str or len(values[name]) > limit):
                raise ValueError(f"field '{name}' must be text of at most {limit} characters, got {_shown(values[name])}")
        if "private" in values and type(values["private"]) is not bool:
            raise ValueError(f"field 'private' must be true or false, got {_shown(values['private'])}")
        if values["sample_rate"] > 1 or values["delta"] >= 1:
            raise ValueError(f"sample_rate must be in (0, 1] and delta in [0, 1), got "
                             f"{values['sample_rate']!r} and {values['delta']!r}")
        entry = cls(**values)
        if entry.private:
            entry.mechanism  # validates ranges: σ > 0, q in (0, 1]
        return entry


def _shown(value) -> str:
    """A value for an error message, never longer than a line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def genesis_hash(identity: str, version: int = LEDGER_VERSION) -> str:
    """``prev_hash`` of a ledger's first entry: from its identity (v3) or its department name (v2)."""
    return hashlib.sha256(f"fedsilo-ledger-v{version}:{identity}".encode()).hexdigest()


def _genesis_of(entry: LedgerEntry) -> str:
    return genesis_hash(entry.signer) if entry.version >= 3 else genesis_hash(entry.department, 2)


@dataclass
class Verification:
    """What reading a ledger line by line found: the entries and every problem.

    ``unreadable`` holds the problems that mean the file could not be read as
    a ledger at all (not a regular file, not UTF-8, a line that is not an entry)
    rather than a ledger that was read and does not verify; each is also in
    ``problems``.
    """

    entries: list[LedgerEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    signatures_checked: bool = False
    unreadable: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_lines(path: Path, problems: list[str], label: str = "line") -> list[str]:
    """The lines of a JSON-lines file; a missing final newline (a torn write) goes into ``problems``.

    Read with :func:`fedsilo.shared.safe_read.read_lines`: raises
    :class:`~fedsilo.shared.safe_read.UnreadableFile` for a file that is not a
    regular, bounded, UTF-8 file, or with a line nested past the depth limit.
    """
    lines, complete = safe_read.read_lines(path, "ledger" if label == "line" else label.split()[0])
    if not complete:
        problems.append(f"{label} {len(lines)}: no final newline (torn write or truncated?)")
    return lines


def verify_ledger(
    path: Path | str, public_key: ec.EllipticCurvePublicKey | None = None, identity: str | None = None
) -> Verification:
    """Check a ledger's chain, order, identity and (with ``public_key``) signatures.

    The ledger's identity is the key fingerprint its first entry is signed by;
    every entry must be signed by that same identity, and by ``public_key``
    (or ``identity``) when given.  Never raises on bad content: every problem
    is named with its line and the likely tampering (edited, deleted,
    reordered, forged).  Entries after the first problem are still read so
    that all problems are reported.
    """
    path = Path(path)
    result = Verification(signatures_checked=public_key is not None)
    if not os.path.lexists(path):
        return result  # a ledger not started yet (an audit refuses a missing one itself)
    expected_signer = fingerprint(public_key) if public_key is not None else identity
    try:
        lines = read_lines(path, result.problems)
    except UnreadableFile as err:
        result.problems.append(err.reason + (f" (line {err.line})" if err.line else "") + (f"; {err.hint}" if err.hint else ""))
        result.unreadable.append(result.problems[-1])
        return result
    if result.problems:  # a torn last line: it cannot be read as an entry either
        result.unreadable.append(result.problems[-1])
    prev_hash, expected_seq, owner = None, 0, None
    last_eps: dict[tuple[float, str], float] = {}  # (δ, accountant) -> ε: same measure never shrinks
    for lineno, line in enumerate(lines, start=1):
        where = f"line {lineno}"
        try:
            raw = safe_read.parse_json(line, path, lineno, "ledger line", dict)
            entry = LedgerEntry.from_dict(raw)
        except UnreadableFile as err:
            result.problems.append(f"{where}: not a valid entry ({err.reason}) (edited or torn?)")
            result.unreadable.append(result.problems[-1])
            continue
        except (ValueError, TypeError) as err:
            result.problems.append(f"{where}: not a valid entry ({err}) (edited or torn?)")
            result.unreadable.append(result.problems[-1])
            continue
        if owner is None:
            owner = entry.signer
            prev_hash = _genesis_of(entry) if entry.seq == 0 else None
        if entry.signer != owner:
            result.problems.append(
                f"{where}: signed by key {entry.signer or 'none'}, but the ledger belongs to {owner} "
                "(entries of another identity: forged, or two ledgers merged?)"
            )
        elif expected_signer is not None and entry.signer != expected_signer:
            result.problems.append(
                f"{where}: signed by key {entry.signer or 'none'}, not the department's {expected_signer} (forged?)"
            )
        elif public_key is not None and not verify(public_key, entry.payload(), entry.signature):
            result.problems.append(f"{where}: signature does not match the content (edited?)")
        if entry.seq != expected_seq:
            kind = "missing before it (deleted?)" if entry.seq > expected_seq else "out of order (reordered or duplicated?)"
            result.problems.append(f"{where}: seq {entry.seq} where {expected_seq} was expected: entries {kind}")
        if prev_hash is not None and entry.prev_hash != prev_hash:
            result.problems.append(
                f"{where}: prev_hash does not match the entry before it (an entry before it was edited, deleted or reordered)"
            )
        measure = (entry.delta, entry.accountant)
        if entry.private and measure in last_eps and entry.epsilon < last_eps[measure] - 1e-12:
            result.problems.append(
                f"{where}: ε={entry.epsilon:.4f} is lower than the earlier {last_eps[measure]:.4f} "
                f"at the same δ and accountant ({entry.accountant})"
            )
        if entry.private:
            last_eps[measure] = entry.epsilon
        result.entries.append(entry)
        prev_hash, expected_seq = entry.hash, entry.seq + 1
    return result


class PrivacyLedger:
    """A department's ledger file.

    Parameters
    ----------
    path : Path
        The ``.jsonl`` file; created (with its folder) on first append.
    department : str
        The department's display name, written on new entries (it may change:
        the ledger belongs to the key, not the name).
    signer : Signer, optional
        The department's key: its identity.  Needed to append, and used to
        verify every signature when the ledger is read; a file holding another
        identity's history is refused.
    """

    def __init__(self, path: Path | str, department: str, signer: Signer | None = None) -> None:
        if not department:
            raise ValueError("department must be a non-empty name")
        self.path = Path(path)
        self.department = department
        self.signer = signer
        if signer is not None:  # the department's own ledger (not a copy read for an audit)
            secure_at_rest(self.path)
        self._stamp: tuple | None = None
        self._entries: list[LedgerEntry] = self._read()

    def refresh(self) -> "PrivacyLedger":
        """Read the file again if it changed since this object last read or wrote it.

        A department's guard keeps its ledger open across rounds: an unchanged
        file (same inode, size and modification time) is not verified again,
        any other is, exactly as on opening.
        """
        if _stamp(self.path) != self._stamp:
            self._entries = self._read()
        return self

    # ------------------------------------------------------------------ reading
    @property
    def entries(self) -> list[LedgerEntry]:
        return list(self._entries)

    @property
    def history(self) -> list[Mechanism]:
        return [e.mechanism for e in self._entries if e.private]

    @property
    def private(self) -> bool:
        """False once any round ran without DP: no finite ε covers the history any more."""
        return all(e.private for e in self._entries)

    @property
    def epsilon(self) -> float:
        """ε recorded for the whole history so far (0 for an empty ledger, ∞ after a non-private round)."""
        if not self.private:
            return math.inf
        return self._entries[-1].epsilon if self._entries else 0.0

    @property
    def head(self) -> tuple[int, str]:
        """(number of entries, hash of the last one): what the department attests to the coordinator."""
        return len(self._entries), (self._entries[-1].hash if self._entries else "")

    def continues(self, seq: int, head: str) -> str:
        """Empty when this ledger holds entry ``seq`` with hash ``head`` (what the coordinator
        acknowledged), else why not: an older copy, a deleted ledger, a new folder, or a fork."""
        if seq <= 0:
            return ""
        held = len(self._entries)
        # The reason goes to the coordinator: it names the ledger by its identity,
        # never by its path on this host; the path goes to this host's log.
        name = f"the ledger of identity {self.signer.fingerprint}" if self.signer else "this identity's ledger"
        if held < seq:
            what = "is empty" if held == 0 else f"holds only {held}"
            reason = (
                f"the coordinator acknowledged {seq} entries of this identity's ledger, but {name} "
                f"{what}: it was restored from an older copy, deleted, or a new folder was given; the "
                "department's operator finds its path in the department's log and must point --ledger "
                "at the department's current ledger"
            )
        elif self._entries[seq - 1].hash != head:
            reason = (
                f"entry {seq - 1} of {name} differs from the one the coordinator acknowledged: the "
                "ledger forked (an older copy that trained elsewhere?); the department's operator must "
                "audit it with `fedsilo audit` (its path is in the department's log) before it trains again"
            )
        else:
            return ""
        log.warning("ledger %s refused: %s", self.path, reason)
        return reason

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self._entries)

    def reload(self) -> None:
        self._entries = self._read()

    def _read(self) -> list[LedgerEntry]:
        stamp = _stamp(self.path)  # taken first: a write while reading shows as a change next time
        found = verify_ledger(self.path, self.signer.public_key if self.signer else None)
        if not found.ok:
            raise LedgerError(
                f"ledger '{self.path}': {found.problems[0]}; the budget cannot be known, so "
                "nothing will train against it. Restore the ledger from backup and audit it "
                "with `fedsilo audit`"
            )
        self._stamp = stamp
        return found.entries

    # ------------------------------------------------------------------ writing
    def append(
        self,
        *,
        run_id: str,
        round: int,
        mechanism: Mechanism | None,
        max_grad_norm: float,
        delta: float,
        accountant: str,
        epsilon: float,
        num_examples: int,
        expected_seq: int | None = None,
        budget: float = 0.0,
        private: bool = True,
        reported_size: int = 0,
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
            current = list(self._entries) if _stamp(self.path) == self._stamp else self._read()
            if expected_seq is not None and len(current) != expected_seq:
                raise LedgerError(
                    f"ledger '{self.path}' changed while this round ran: it held "
                    f"{expected_seq} entries, now {len(current)}; the round is not recorded "
                    "and its update must not be released. Is another process using this ledger?"
                )
            self._entries = current
            last = current[-1] if current else None
            # Only the same measure must grow: another accountant (PLD after RDP)
            # bounds the same history more tightly, and that is no shrinking.
            same = [e for e in current if e.private and e.delta == delta and e.accountant == accountant]
            if private and same and epsilon < same[-1].epsilon:
                raise LedgerError(
                    f"ledger '{self.path}': new ε={epsilon:.4f} is lower than the recorded "
                    f"ε={same[-1].epsilon:.4f} at the same δ and accountant: ε of a growing history cannot shrink"
                )
            unsigned = LedgerEntry(
                seq=len(current),
                department=self.department,
                run_id=str(run_id),
                round=int(round),
                noise_multiplier=float(mechanism.noise_multiplier) if private else 0.0,
                sample_rate=float(mechanism.sample_rate) if private else 0.0,
                steps=int(mechanism.steps) if private else 0,
                max_grad_norm=float(max_grad_norm),
                delta=float(delta),
                accountant=accountant,
                epsilon=float(epsilon),
                num_examples=int(num_examples),
                timestamp=time.time(),
                prev_hash=last.hash if last else genesis_hash(self.signer.fingerprint),
                signer=self.signer.fingerprint,
                budget=float(budget),
                private=bool(private),
                reported_size=int(reported_size),
                software=_software(),
            )
            entry = replace(unsigned, signature=self.signer.sign(unsigned.payload()))
            lines = [e.to_json() for e in [*current, entry]]
            atomic_write(self.path, "".join(line + "\n" for line in lines))
            self._entries = [*current, entry]
            self._stamp = _stamp(self.path)  # under the lock: this object's own write
            return entry

    def _locked(self):
        return file_lock(self.path)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"department": self.department, "entries": [asdict(e) for e in self._entries]}


def _stamp(path: Path) -> tuple | None:
    """What changes whenever a file is written or replaced (None: no file yet)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def make_private_folder(folder: Path) -> None:
    """Create ``folder`` (and missing parents) readable by this user only (0700)."""
    folder = Path(folder)
    if not folder.is_dir():
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        for created in missing:  # mkdir's mode is masked by the umask
            with contextlib.suppress(OSError):
                os.chmod(created, FOLDER_MODE)


def secure_at_rest(path: Path) -> None:
    """Tighten a department's ledger folder to 0700 and its ledger to 0600 (logged).

    Only a folder this user owns, and never a shared one (sticky bit, as
    ``/tmp``): a ledger kept directly in a shared folder keeps its own 0600.
    """
    folder = Path(path).parent
    with contextlib.suppress(OSError):
        info = folder.stat()
        if (info.st_uid == os.geteuid() and not info.st_mode & stat.S_ISVTX
                and stat.S_IMODE(info.st_mode) & ~FOLDER_MODE):
            os.chmod(folder, stat.S_IMODE(info.st_mode) & FOLDER_MODE)
            log.warning("ledger folder %s was %o, readable by other local users; tightened to %o",
                        folder, stat.S_IMODE(info.st_mode), stat.S_IMODE(info.st_mode) & FOLDER_MODE)
    for name in (Path(path), Path(path).with_name(Path(path).name + ".lock")):
        with contextlib.suppress(OSError):
            info = os.lstat(name)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & ~FILE_MODE:
                os.chmod(name, FILE_MODE)
                log.warning("ledger file %s was %o; tightened to 600", name, stat.S_IMODE(info.st_mode))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path`` (``PATH.lock``, 0600) for read-modify-write."""
    make_private_folder(path.parent)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    with os.fdopen(fd, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically; the file is 0600 from the moment it exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), FILE_MODE)  # a stale tmp file keeps its old mode otherwise
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _software() -> str:
    from fedsilo import __version__

    return f"fedsilo {__version__}"


def ledger_path(ledger_dir: Path | str, department: str) -> Path:
    """``DIR/NAME.jsonl``: where a ledger kept by name lives (the coordinator's own)."""
    return Path(ledger_dir) / f"{_safe(department)}.jsonl"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def signer_of(path: Path) -> str:
    """The identity (key fingerprint) a ledger file's first entry is signed by ("" if none)."""
    first = first_entry(path)
    signer = first.get("signer", "") if first else ""
    return signer if isinstance(signer, str) and len(signer) <= MAX_TOKEN else ""


def first_entry(path: Path) -> dict | None:
    """The first line of a ledger file as a JSON object, read safely; None if it is not one."""
    try:
        head = safe_read.read_bytes(path, 64 << 10, "ledger", head=True)
        first = head.split(b"\n", 1)[0]
        if not first.strip():
            return None
        return safe_read.parse_json(safe_read.decode_utf8(first, path, "ledger"), path, 1, "ledger line", dict)
    except UnreadableFile:
        return None


def find_identity_ledger(ledger_dir: Path | str, identity: str, name: str) -> Path:
    """The ledger of ``identity`` in ``ledger_dir``, whatever its file is called.

    A department renamed, a key file renamed, a fedsilo 0.1 ledger kept under
    the old name: the same key finds the same history.  A new identity gets
    ``NAME-<fingerprint prefix>.jsonl``.  Two files of one identity in one
    folder is a fork: refused, naming both.
    """
    folder = Path(ledger_dir)
    found = [p for p in sorted(folder.glob("*.jsonl")) if signer_of(p) == identity] if folder.is_dir() else []
    if len(found) > 1:
        raise LedgerError(
            f"{len(found)} ledgers in {folder} belong to this department's key {identity}: "
            f"{', '.join(p.name for p in found)}; a history must not fork. Audit them with "
            "`fedsilo audit`, keep the one the coordinator's record confirms and move the other away"
        )
    if found:
        return found[0]
    tag = identity.split(":", 1)[-1][:10].replace("/", "_").replace("+", "-")
    return folder / f"{_safe(name)}-{tag}.jsonl"


def read_ledgers(folder: Path | str) -> dict[str, PrivacyLedger]:
    """Every ledger in a folder, by the department name on its latest entry (read-only use)."""
    out: dict[str, PrivacyLedger] = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        ledger = PrivacyLedger(path, path.stem)
        name = ledger.entries[-1].department if ledger.entries else path.stem
        ledger.department = name
        out[name] = ledger
    return out
