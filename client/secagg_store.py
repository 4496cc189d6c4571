"""A department's durable secure-aggregation state: one file per (identity, run key).

The file holds the department's current session (``DepartmentSession.to_state()``)
and every round of the run it masked in any session, so that a restarted
department — or a new session the coordinator opens after a resume — never
masks a round twice.  It lives beside the ledger, in ``<ledger_dir>/.secagg/``
(folder 0700, file 0600: it holds the session's secrets), and is written
atomically before any reply that depends on it leaves.  Reading is strict: a
file that does not parse is a :class:`StoreError` naming it, never a silent reset.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedsilo.secagg.encoding import decode, encode
from fedsilo.secagg.errors import MalformedMessage

LABEL = "fedsilo-secagg/department-store"
VERSION = 1
FOLDER = ".secagg"
MAX_STORE_BYTES = 1 << 31  # a session's state grows with the window and the vector length


class StoreError(ValueError):
    """The state file exists but cannot be read back; the message names the file."""


@dataclass(frozen=True)
class StoredRun:
    """What the file holds: the current session's state (None before any) and the masked rounds."""

    session: bytes | None
    masked_rounds: frozenset[int]


def store_path(ledger_dir: Path, fingerprint: str, run_key: str) -> Path:
    """``<ledger_dir>/.secagg/<sha256(fingerprint + NUL + run key)[:32]>.state``."""
    digest = hashlib.sha256(f"{fingerprint}\0{run_key}".encode()).hexdigest()[:32]
    return Path(ledger_dir) / FOLDER / f"{digest}.state"


class SecAggStore:
    """The state file of one identity (its key ``fingerprint``) for one run key."""

    def __init__(self, ledger_dir: Path, fingerprint: str, run_key: str) -> None:
        self.fingerprint, self.run_key = fingerprint, run_key
        self.path = store_path(ledger_dir, fingerprint, run_key)

    def load(self) -> StoredRun:
        """The stored run; an absent file is an empty one."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return StoredRun(None, frozenset())
        except OSError as err:
            raise StoreError(f"cannot read the secure-aggregation state {self.path}: {err.strerror}") from None
        try:
            items = decode(data, MAX_STORE_BYTES)
        except (MalformedMessage, ValueError) as err:
            raise StoreError(f"the secure-aggregation state {self.path} does not parse ({err})") from None
        if (len(items) != 6 or items[0] != LABEL or items[1] != VERSION or not isinstance(items[4], bytes)
                or not isinstance(items[5], list) or not all(isinstance(r, int) for r in items[5])):
            raise StoreError(f"the secure-aggregation state {self.path} is not a version-{VERSION} fedsilo state file")
        _, _, run_key, fingerprint, session, rounds = items
        if (run_key, fingerprint) != (self.run_key, self.fingerprint):
            raise StoreError(f"the secure-aggregation state {self.path} belongs to another run or identity")
        if rounds != sorted(set(rounds)):
            raise StoreError(f"the secure-aggregation state {self.path}: its masked rounds are not sorted and unique")
        return StoredRun(session or None, frozenset(rounds))

    def save(self, stored: StoredRun) -> None:
        """Write ``stored`` atomically and durably: a temp file, fsync, rename, fsync of the folder."""
        data = encode(LABEL, VERSION, self.run_key, self.fingerprint, stored.session or b"",
                      sorted(stored.masked_rounds))
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        fd, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".state")  # created 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
