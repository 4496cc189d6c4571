"""Ledger heads and the coordinator's signed record of the heads it acknowledged.

A department's ledger can go backwards without breaking its chain: restored
from an older copy, deleted, replaced by a new folder.  Only someone who saw a
later head can tell.  So every train reply carries a :class:`LedgerHead` — the
number of entries in the department's ledger, the hash of the last one, and the
ε, δ and budget it states — signed by the department's identity key.  The
coordinator verifies it, keeps the last head per identity in a
:class:`CoordinatorRecord` (append-only, hash-chained, signed with the
coordinator's key), and sends that head back with the next round's task: a
department whose ledger no longer holds it refuses to train, and the
coordinator refuses a head that is behind or forked.  ``fedsilo audit`` checks
every acknowledged head against the ledgers: truncation and rollback show.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import safe_read
from .ledger import atomic_write, file_lock, read_lines
from .signing import Signer, fingerprint, verify

HEAD_KEY = "ledger-head"  # the ConfigRecord in a train reply
# Keys of the train task's config: the head the coordinator last acknowledged for this node.
ACK_SEQ_KEY = "acknowledged-seq"
ACK_HEAD_KEY = "acknowledged-head"
RECORD_FILE = "acknowledged.jsonl"


class RecordError(RuntimeError):
    """The coordinator's record is unreadable or inconsistent; nothing was written."""


class MalformedHead(ValueError):
    """A ledger head with a missing, wrongly typed or non-finite field; nothing was recorded.

    JSON holds no NaN or infinity: a head stating ε = NaN could be signed by its
    department, but not written into the coordinator's record.  It is refused
    here, with the field named, before anyone tries.
    """


# The largest entry count or round number a head may state (a ledger grows by one entry a round).
MAX_COUNT = 2**53


def _check_count(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise MalformedHead(f"malformed ledger head: {what} must be an integer in [0, 2^53], got {value!r:.80}")


def _check_number(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedHead(f"malformed ledger head: {what} must be a finite number, got {value!r:.80}")


def _check_text(what: str, value: Any) -> None:
    if not isinstance(value, str):
        raise MalformedHead(f"malformed ledger head: {what} must be text, got {type(value).__name__}")


def public_key_line(public_key: ec.EllipticCurvePublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def load_any_public_key(blob: bytes | str) -> ec.EllipticCurvePublicKey | None:
    """An EC public key from OpenSSH, PEM or DER bytes (Flower stores registered keys as one of these)."""
    data = blob.encode() if isinstance(blob, str) else bytes(blob)
    loaders = (
        serialization.load_ssh_public_key,
        serialization.load_pem_public_key,
        serialization.load_der_public_key,
    )
    for load in loaders:
        try:
            key = load(data)
        except Exception:  # noqa: BLE001 - not this format; try the next
            continue
        return key if isinstance(key, ec.EllipticCurvePublicKey) else None
    return None


@dataclass(frozen=True)
class LedgerHead:
    """A department's signed statement of where its ledger stands after a round."""

    identity: str  # fingerprint of the department's key
    public_key: str  # its OpenSSH public key line (checked against the registered key)
    seq: int  # entries in the ledger
    head: str  # hash of the last entry ("" for an empty ledger)
    run_id: str
    round: int
    epsilon: float  # whole-history ε it states, at delta (-1: unbounded, trained without DP)
    delta: float
    budget: float
    signature: str = ""

    def __post_init__(self) -> None:
        # Every number finite: what a department signs must be what the record can hold.
        for name in ("identity", "public_key", "head", "run_id", "signature"):
            _check_text(name, getattr(self, name))
        _check_count("seq", self.seq)
        _check_count("round", self.round)
        for name in ("epsilon", "delta", "budget"):
            _check_number(name, getattr(self, name))

    def payload(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if k != "signature"}
        return b"fedsilo-ledger-head-v1:" + json.dumps(body, sort_keys=True, separators=(",", ":"),
                                                       allow_nan=False).encode()

    def signed(self, signer: Signer) -> "LedgerHead":
        return replace(self, signature=signer.sign(self.payload()))

    def problem(self, registered: ec.EllipticCurvePublicKey | None = None) -> str:
        """Empty when the signature holds (by ``registered``, when given), else what is wrong."""
        key = load_any_public_key(self.public_key)
        if key is None or fingerprint(key) != self.identity:
            return "its ledger head names a key that does not match its identity"
        if registered is not None and fingerprint(registered) != self.identity:
            return "its ledger head is signed by a key other than the one registered for it"
        if not verify(key, self.payload(), self.signature):
            return "its ledger head's signature does not verify"
        return ""

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "LedgerHead":
        """The head a reply carries; :class:`MalformedHead` (a ValueError) naming what is wrong."""
        try:
            values = {f.name: record[f.name] for f in fields(cls)}
            return cls(
                identity=str(values["identity"]), public_key=str(values["public_key"]), seq=int(values["seq"]),
                head=str(values["head"]), run_id=str(values["run_id"]), round=int(values["round"]),
                epsilon=float(values["epsilon"]), delta=float(values["delta"]), budget=float(values["budget"]),
                signature=str(values["signature"]),
            )
        except MalformedHead:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise MalformedHead(f"malformed ledger head ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class Acknowledgement:
    """One line of the coordinator's record: a department's head it accepted."""

    seq: int
    department: str  # the name it reported (display only)
    identity: str
    public_key: str
    run_id: str
    round: int
    ledger_seq: int
    ledger_head: str
    epsilon: float
    delta: float
    budget: float
    attestation: str  # the department's signature over its LedgerHead
    timestamp: float
    prev_hash: str
    signer: str  # the coordinator's key fingerprint
    signature: str = ""

    @property
    def head(self) -> LedgerHead:
        return LedgerHead(
            self.identity, self.public_key, self.ledger_seq, self.ledger_head, self.run_id, self.round,
            self.epsilon, self.delta, self.budget, self.attestation,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    def payload(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if k != "signature"}
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


GENESIS = hashlib.sha256(b"fedsilo-coordinator-record-v1").hexdigest()


@dataclass
class RecordVerification:
    entries: list[Acknowledgement] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    signer: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def latest(self) -> dict[str, Acknowledgement]:
        """The last acknowledged head of every identity."""
        out: dict[str, Acknowledgement] = {}
        for ack in self.entries:
            out[ack.identity] = ack
        return out


def verify_record(path: Path | str, public_key: ec.EllipticCurvePublicKey | None = None) -> RecordVerification:
    """Check the record's chain, the coordinator's signatures (with ``public_key``) and every
    department's signature on the head it attested; never raises on bad content."""
    path = Path(path)
    result = RecordVerification()
    if not path.exists():
        return result
    lines = read_lines(path, result.problems, "record line")
    prev, expected = GENESIS, 0
    for lineno, line in enumerate(lines, start=1):
        where = f"record line {lineno}"
        try:
            raw = safe_read.parse_json(line, path, lineno, "record line", dict)
            ack = Acknowledgement(**{f.name: raw[f.name] for f in fields(Acknowledgement)})
            if not all(math.isfinite(float(v)) for v in (ack.epsilon, ack.delta, ack.budget)):
                raise ValueError("non-finite number")
            head = ack.head  # a MalformedHead (ValueError) for wrongly typed fields
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            result.problems.append(f"{where}: not a valid acknowledgement ({err}) (edited or torn?)")
            continue
        result.signer = result.signer or ack.signer
        if ack.seq != expected:
            result.problems.append(f"{where}: seq {ack.seq} where {expected} was expected (deleted or reordered?)")
        if ack.prev_hash != prev:
            result.problems.append(f"{where}: prev_hash does not match the line before it (edited, deleted or reordered?)")
        if ack.signer != result.signer:
            result.problems.append(f"{where}: signed by {ack.signer}, the record by {result.signer} (forged?)")
        elif public_key is not None:
            if ack.signer != fingerprint(public_key):
                result.problems.append(f"{where}: signed by {ack.signer}, not the coordinator's {fingerprint(public_key)} (forged?)")
            elif not verify(public_key, ack.payload(), ack.signature):
                result.problems.append(f"{where}: the coordinator's signature does not match the content (edited?)")
        problem = head.problem()
        if problem:
            result.problems.append(f"{where}: department '{ack.department}': {problem}")
        result.entries.append(ack)
        prev, expected = ack.hash, ack.seq + 1
    return result


class CoordinatorRecord:
    """The coordinator's append-only record of acknowledged ledger heads, per identity.

    Parameters
    ----------
    path : Path
        The ``.jsonl`` file; created with its folder on first append.  Keep it
        across runs: it is what detects a department's ledger going backwards.
    signer : Signer, optional
        The coordinator's key (its TLS key in a deployment); needed to append.
    """

    def __init__(self, path: Path | str, signer: Signer | None = None) -> None:
        self.path = Path(path)
        self.signer = signer
        found = self._read()
        self._entries, self._latest = found.entries, found.latest()
        self._text = self._current_text()

    def _current_text(self) -> str:
        return self.path.read_text(encoding="utf-8") if self.path.exists() else ""

    def _read(self) -> RecordVerification:
        found = verify_record(self.path, self.signer.public_key if self.signer else None)
        if not found.ok:
            raise RecordError(
                f"the coordinator's record '{self.path}' {found.problems[0]}; departments' ledgers "
                "cannot be checked against it, so no run starts. Restore it from backup and audit it"
            )
        return found

    def acknowledged(self, identity: str) -> Acknowledgement | None:
        return self._latest.get(identity)

    def append(self, head: LedgerHead, department: str) -> Acknowledgement:
        """Record ``head`` (already verified) as the latest acknowledged for its identity.

        Raises :class:`MalformedHead` — before anything is written — for a head
        that is not a :class:`LedgerHead` or states a non-finite number, or a
        department name that is not text.
        """
        if self.signer is None:
            raise ValueError("appending needs the coordinator's key (signer=...)")
        if not isinstance(head, LedgerHead):
            raise MalformedHead(f"only a LedgerHead can be recorded, got {type(head).__name__}")
        head.__post_init__()  # again: a head built with object.__setattr__ or __new__ is checked too
        _check_text("department", department)
        with file_lock(self.path):
            # Re-verify every signature only if someone else changed the file since
            # this process last read or wrote it (one ServerApp per record, normally).
            current = self._entries if self._current_text() == self._text else self._read().entries
            last = current[-1] if current else None
            unsigned = Acknowledgement(
                seq=len(current), department=department, identity=head.identity, public_key=head.public_key,
                run_id=head.run_id, round=head.round, ledger_seq=head.seq, ledger_head=head.head,
                epsilon=head.epsilon, delta=head.delta, budget=head.budget, attestation=head.signature,
                timestamp=time.time(), prev_hash=last.hash if last else GENESIS, signer=self.signer.fingerprint,
            )
            ack = replace(unsigned, signature=self.signer.sign(unsigned.payload()))
            text = "".join(e.to_json() + "\n" for e in [*current, ack])
            atomic_write(self.path, text)
        self._entries, self._text = [*current, ack], text
        self._latest = RecordVerification(self._entries).latest()
        return ack
