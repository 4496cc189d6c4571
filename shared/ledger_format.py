"""A ledger's format: its entries, their chain and signatures, and verifying a ledger file.

:class:`LedgerEntry` is one signed round; :func:`verify_ledger` checks a file's
chain, order, identity and signatures and never raises on bad content.  The
ledger itself — appending, locking, files at rest — is :mod:`fedsilo.shared.ledger`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from . import safe_read
from .accounting import Mechanism
from .safe_read import UnreadableFile
from .signing import fingerprint, verify

LEDGER_VERSION = 3
# Fields a version-2 entry (fedsilo 0.1) does not have: left out of its hash and
# signature, so 0.1 ledgers still verify and continue.
V3_FIELDS = ("budget", "private", "reported_size", "software")
# A distributed-DP (Skellam) round is written as version 4, with its mechanism and set-up; a Gaussian
# round stays version 3, byte for byte as before, so its hash and signature do not change.
SKELLAM_VERSION = 4
V4_FIELDS = ("kind", "mu", "l1", "l2", "granularity", "dimension", "beta", "participants", "threshold", "colluders")
KINDS = ("gaussian", "skellam")
# The name the coordinator keeps its client-level DP ledger under.
COORDINATOR = "coordinator"
# Bounds on an entry's numbers: far past any honest round, small enough that
# the accountants re-deriving ε stay bounded in memory and time.
MAX_STEPS = 10**7  # PLD re-derives 10^7 steps in ~2 s, 10^9 in ~45 s
MAX_COUNT = 10**12  # records, rounds, entries
MAX_TEXT = 1024  # department, run id, accountant, software
MAX_TOKEN = 512  # hashes, fingerprints, signatures
_INTS = {"seq": MAX_COUNT, "round": MAX_COUNT, "steps": MAX_STEPS, "num_examples": MAX_COUNT,
         "dimension": 1 << 40, "participants": MAX_COUNT, "threshold": MAX_COUNT, "colluders": MAX_COUNT,
         "reported_size": MAX_COUNT}
_FLOATS = ("noise_multiplier", "sample_rate", "max_grad_norm", "delta", "epsilon", "budget", "timestamp",
           "mu", "l1", "l2", "granularity", "beta")
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
    kind: str = "gaussian"  # v4: "skellam" for a distributed-DP round (shared/skellam.py)
    mu: float = 0.0  # v4, skellam: the Skellam variance of the noise in the sum
    l1: float = 0.0  # v4, skellam: one record's L1 / L2 sensitivity after rounding
    l2: float = 0.0
    granularity: float = 0.0  # v4, skellam: γ; with dimension and beta the audit re-derives l1, l2
    dimension: int = 0
    beta: float = 0.0
    participants: int = 0  # v4, skellam: n, t and c of the trust assumption (share = mu / (t - c))
    threshold: int = 0
    colluders: int = 0

    @property
    def mechanism(self):
        """The round's mechanism: a :class:`Mechanism`, or a ``SkellamMechanism`` for distributed DP."""
        if self.kind == "skellam":
            from .skellam import SkellamMechanism

            return SkellamMechanism(self.mu, self.l1, self.l2, self.sample_rate, self.steps)
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def setup(self):
        """A Skellam round's ``SkellamSetup`` (None for a Gaussian round)."""
        if self.kind != "skellam":
            return None
        from .skellam import SkellamSetup

        return SkellamSetup(self.granularity, self.dimension, self.beta, self.participants, self.threshold,
                            self.colluders)

    def _body(self) -> dict:
        body = asdict(self)
        for name in (V3_FIELDS if self.version < 3 else ()) + (V4_FIELDS if self.version < 4 else ()):
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
        if type(version) is not int or version not in (2, 3, 4):
            raise ValueError(f"field 'version' must be 2, 3 or 4, got {_shown(version)}")
        optional = {"version", *(V3_FIELDS if version < 3 else ()), *(V4_FIELDS if version < 4 else ())}
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
        if "kind" in values and values["kind"] not in KINDS:
            raise ValueError(f"field 'kind' must be one of {', '.join(KINDS)}, got {_shown(values['kind'])}")
        entry = cls(**values)
        if entry.private:
            entry.mechanism  # validates ranges: σ > 0 (μ, Δ1, Δ2 > 0), q in (0, 1]
            entry.setup  # a Skellam round's set-up: γ > 0, D a power of two, 0 <= c < t <= n
        return entry


def _shown(value) -> str:
    """A value for an error message, never longer than a line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def genesis_hash(identity: str, version: int = 3) -> str:
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
