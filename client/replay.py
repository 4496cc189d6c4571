"""The department's last released update, kept so a restarted coordinator cannot charge a round twice.

When the coordinator dies mid-round, a department may already have trained that
round, charged its ledger and sent its update.  The resumed coordinator asks for
the same round again, with the same global model.  Training again would be a
second mechanism on the same records — a second charge for one round.  Instead
the department sends again the very update it released: a released output
costs nothing more to release again, so the ledger gets no new entry.

The update is kept beside the ledger (``<ledger>.last-update.safetensors``,
0600), together with what it answered: the run, the round and a digest of the
global model it was trained from, and the ledger entry that charges it.  Only an exact match whose charge is in the ledger is replayed; anything else
trains, and is charged, as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from fedsilo.shared.ledger import LedgerEntry, PrivacyLedger, make_private_folder

FORMAT = "fedsilo-last-update"


def request_digest(run_key: str, server_round: int, arrays: ArrayRecord) -> str:
    """What a train request asks, as a digest: the run, the round and the exact global model."""
    digest = hashlib.sha256(f"{run_key}\0{server_round}\0".encode())
    for key in sorted(arrays.keys()):
        values = np.ascontiguousarray(arrays[key].numpy())
        digest.update(f"{key}\0{values.dtype.str}\0{values.shape}\0".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Replay:
    """A released update and the ledger entry that charged it."""

    arrays: ArrayRecord
    metrics: dict
    entry: LedgerEntry


class LastUpdate:
    """The one update a department keeps: its latest released one."""

    def __init__(self, ledger_path: Path) -> None:
        self.path = Path(ledger_path).with_suffix(".last-update.safetensors")

    def keep(self, digest: str, run_id: str, server_round: int, position: int, arrays: ArrayRecord,
             metrics: dict) -> None:
        """Write it before its charge is appended as ledger entry number ``position`` (counted from 1).

        Kept first, so a department that dies between the two has either no
        charge (the kept update is never sent: its entry is missing) or both.
        Written atomically, readable by this host's user only (0600, in the ledger's 0700 folder).
        """
        from safetensors.numpy import save_file

        tensors = {key: np.ascontiguousarray(arrays[key].numpy()) for key in arrays.keys()}
        meta = {"format": FORMAT, "digest": digest, "keys": list(arrays.keys()), "position": position,
                "run_id": run_id, "round": server_round, "metrics": metrics}
        staging = self.path.with_name(f".{self.path.name}.tmp")
        make_private_folder(self.path.parent)  # before the first ledger entry creates it
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a stale staging file keeps its old mode otherwise
        os.close(fd)
        save_file(tensors, str(staging), metadata={FORMAT: json.dumps(meta)})
        os.replace(staging, self.path)

    def find(self, digest: str, ledger: PrivacyLedger) -> Replay | None:
        """The kept update if it answers exactly this request and its charge is in the ledger."""
        try:  # a regular file only: a FIFO or device put there must not hang the department
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                return None
        except OSError:
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="numpy") as fh:
                meta = json.loads((fh.metadata() or {})[FORMAT])
                if meta.get("digest") != digest:
                    return None
                arrays = ArrayRecord({key: Array(fh.get_tensor(key)) for key in meta["keys"]})
        except Exception:  # unreadable or foreign: train (and charge) as usual
            return None
        entries, position = ledger.entries, int(meta.get("position", 0))
        entry = entries[position - 1] if 0 < position <= len(entries) else None
        if entry is None or entry.run_id != meta.get("run_id") or entry.round != meta.get("round"):
            return None  # its charge never reached the ledger: it was never sent
        return Replay(arrays, dict(meta["metrics"]), entry)
