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
import logging
import math
import os
import stat
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

from . import safe_read
from .accounting import Mechanism
from .safe_read import UnreadableFile
from .signing import Signer

log = logging.getLogger(__name__)

FOLDER_MODE, FILE_MODE = 0o700, 0o600  # a department's ledger folder and files at rest

# The format (entries, chain, verification) is a module of its own; its names still import from here.
from .ledger_format import (  # noqa: E402,F401
    COORDINATOR, LEDGER_VERSION, MAX_COUNT, MAX_STEPS, MAX_TEXT, MAX_TOKEN, LedgerEntry, LedgerError, Verification,
    SKELLAM_VERSION, genesis_hash, read_lines, verify_ledger,
)


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
        setup=None,
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
            if private and getattr(mechanism, "mu", None) is not None:  # a distributed-DP (Skellam) round
                if setup is None:
                    raise ValueError("a Skellam round is recorded with its SkellamSetup (setup=...)")
                unsigned = replace(
                    unsigned, version=SKELLAM_VERSION, kind="skellam",
                    mu=float(mechanism.mu), l1=float(mechanism.l1), l2=float(mechanism.l2),
                    granularity=float(setup.granularity), dimension=int(setup.dimension), beta=float(setup.beta),
                    participants=int(setup.participants), threshold=int(setup.threshold),
                    colluders=int(setup.colluders))
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
