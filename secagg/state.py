"""A department session's canonical byte form, so that it survives between Flower messages.

Flower calls a department's ClientApp afresh for every message (in a simulation
possibly in another worker process); what persists per node is ``context.state``,
kept on the department's side and never sent.  The session is written there as
one versioned value of :mod:`.encoding` and read back strictly: every field is
type- and size-checked, and a state written by another department name or under
another roster is refused.  Error messages name fields, never their values: the
state holds the session's secrets (X25519 private key, pair keys, seeds, shares).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import keys, sharing
from .encoding import decode, encode
from .errors import MalformedMessage
from .messages import (MAX_PARTICIPANTS, MAX_WINDOW, SESSION_ID_BYTES, Advertisement, ConsistencySignature,
                       MaskedInput, Shares, Unmasking, _name, _names)
from .session import SessionParams

STATE_LABEL = "fedsilo-secagg/department-state"
STATE_VERSION = 2  # 2: its messages are protocol version 2
ROSTER_LABEL = "fedsilo-secagg/roster/v1"
# The state is the department's own data, but still bounded: a window of masked vectors of the largest
# length, with room for the keys and shares of the largest session.
MAX_STATE_BYTES = 1 << 31


@dataclass(frozen=True)
class RoundState:
    """One round as the department remembers it (the in-memory ``_Round``, field for field)."""

    participants: tuple[str, ...]
    answer: MaskedInput | None
    committed: tuple[str, ...] | None
    signature: ConsistencySignature | None
    unmasking: Unmasking | None

    def __repr__(self) -> str:
        return f"RoundState(participants={self.participants}, committed={self.committed})"


@dataclass(frozen=True)
class DepartmentState:
    """Everything a :class:`~.department.DepartmentSession` holds, parsed; secrets out of ``repr``."""

    name: str
    params: SessionParams | None
    private_key: bytes            # X25519 raw private key; b"" before advertising
    advertisement: Advertisement | None
    verified: tuple[str, ...]
    pair_keys: dict[str, bytes]
    own_seeds: dict[int, bytes]
    own_shares: dict[int, bytes]
    received: dict[str, dict[int, bytes]]
    shares_answer: Shares | None
    rounds: dict[int, RoundState]

    def __repr__(self) -> str:
        session = self.params and self.params.session_id.hex()
        return f"DepartmentState(name={self.name!r}, session={session}, rounds={sorted(self.rounds)})"

    def private(self) -> X25519PrivateKey | None:
        return X25519PrivateKey.from_private_bytes(self.private_key) if self.private_key else None


def roster_digest(roster) -> bytes:
    """SHA-256 of the roster (names and identity keys): a state is valid under this roster only."""
    entries = [[name, roster[name].public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)]
               for name in sorted(roster)]
    return hashlib.sha256(encode(ROSTER_LABEL, entries)).digest()


def private_bytes(private: X25519PrivateKey | None) -> bytes:
    if private is None:
        return b""
    return private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())


def dump(state: DepartmentState, roster) -> bytes:
    """The canonical bytes of ``state``; maps are written sorted, so equal states give equal bytes."""
    p = state.params
    params = [] if p is None else [p.version, p.run_key, p.session_id, p.threshold, list(p.participants),
                                   p.modulus_bits, p.vector_length, p.first_round, p.window]
    rounds = [[r, list(s.participants), _message_bytes(s.answer), list(s.committed or ()),
               _message_bytes(s.signature), _message_bytes(s.unmasking)]
              for r, s in sorted(state.rounds.items())]
    return encode(STATE_LABEL, STATE_VERSION, state.name, roster_digest(roster), params, state.private_key,
                  _message_bytes(state.advertisement), list(state.verified), _pairs(state.pair_keys),
                  _pairs(state.own_seeds), _pairs(state.own_shares),
                  [[dealer, _pairs(shares)] for dealer, shares in sorted(state.received.items())],
                  _message_bytes(state.shares_answer), rounds)


def load(data: bytes, name: str, roster) -> DepartmentState:
    """The state that :func:`dump` wrote for department ``name`` under ``roster``; strict."""
    items = decode(data, MAX_STATE_BYTES)
    if len(items) != 14:
        raise MalformedMessage(f"a department state has 14 fields, not {len(items)}")
    (label, version, owner, digest, params, private_key, advertisement, verified, pair_keys, own_seeds,
     own_shares, received, shares_answer, rounds) = items
    if label != STATE_LABEL:
        raise MalformedMessage("these bytes are not a secure-aggregation department state")
    if version != STATE_VERSION:
        raise MalformedMessage(f"department state version {version!r:.20} is not supported "
                               f"(this side reads {STATE_VERSION})")
    if owner != name:
        raise MalformedMessage(f"the state belongs to department {owner!r:.80}, not '{name}'")
    if not isinstance(digest, bytes) or digest != roster_digest(roster):
        raise MalformedMessage("the state was written under another roster of identity keys")
    session = _params(params)
    joined = session is not None
    private_key = _secret(private_key, "the X25519 private key", 32 if joined else 0)
    advertisement = _message(advertisement, Advertisement, "the advertisement", joined)
    if advertisement is not None and (advertisement.name != name or advertisement.public_key != keys.public_bytes(
            X25519PrivateKey.from_private_bytes(private_key))):
        raise MalformedMessage("the stored advertisement is not this department's for its key")
    verified = _names(verified, "the verified departments")
    if session is None:
        if verified or pair_keys or own_seeds or own_shares or received or shares_answer or rounds:
            raise MalformedMessage("a state that joined no session holds session data")
        return DepartmentState(name, None, b"", None, (), {}, {}, {}, {}, None, {})
    participants, window = set(session.participants), set(session.rounds)
    if not set(verified) <= participants:
        raise MalformedMessage("the verified departments are not all participants")
    peers = set(verified) - {name}
    pairs = _map(pair_keys, "the pair keys", lambda k: _name(k, "a pair key's peer"),
                 lambda v: _secret(v, "a pair key", keys.KEY_BYTES))
    dealt = bool(shares_answer)
    if set(pairs) != (peers if dealt else set()):
        raise MalformedMessage("the pair keys are not exactly those of the verified peers")
    seeds = _map(own_seeds, "the own seeds", _round, lambda v: _secret(v, "a seed", sharing.SEED_BYTES))
    shares = _map(own_shares, "the own shares", _round, lambda v: _secret(v, "a share", sharing.SEED_BYTES))
    if set(seeds) != (window if dealt else set()) or set(shares) != set(seeds):
        raise MalformedMessage("the own seeds and shares do not cover the session's window")
    dealers = _map(received, "the received shares", lambda k: _name(k, "a dealer"),
                   lambda v: _map(v, "a dealer's shares", _round,
                                  lambda s: _secret(s, "a received share", sharing.SEED_BYTES)))
    if not set(dealers) <= set(pairs) or any(set(v) != window for v in dealers.values()):
        raise MalformedMessage("the received shares are not from verified peers for the window")
    answer = _message(shares_answer, Shares, "the dealt shares", dealt)
    if answer is not None and (answer.name != name or set(answer.ciphertexts) != peers):
        raise MalformedMessage("the stored dealt shares are not this department's to its verified peers")
    parsed_rounds = _map(rounds, "the rounds", _round, None, entries=True)
    if parsed_rounds and not dealt:
        raise MalformedMessage("a state that dealt no shares holds rounds")
    round_states = {r: _round_state(r, entry, session, verified) for r, entry in parsed_rounds.items()}
    return DepartmentState(name, session, private_key, advertisement, verified, pairs, seeds, shares, dealers,
                           answer, round_states)


# --- helpers ----------------------------------------------------------------------------------------------
def _message_bytes(message) -> bytes:
    return b"" if message is None else message.to_bytes()


def _pairs(mapping: dict) -> list:
    return [[key, mapping[key]] for key in sorted(mapping)]


def _params(value) -> SessionParams | None:
    if value == []:
        return None
    if not isinstance(value, list) or len(value) != 9:
        raise MalformedMessage("the session parameters must be a list of 9 fields")
    version, run_key, session_id, threshold, participants, bits, length, first_round, window = value
    if not isinstance(run_key, str) or not 0 < len(run_key) <= 256:
        raise MalformedMessage("the run key must be a string of 1..256 characters")
    if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_BYTES:
        raise MalformedMessage(f"the session id must be {SESSION_ID_BYTES} bytes")
    names = _names(participants, "the participants")
    for what, field_value, high in (("the version", version, 1 << 16), ("the threshold", threshold, len(names)),
                                    ("the modulus bits", bits, 64), ("the vector length", length, 1 << 25),
                                    ("the first round", first_round, 1 << 62), ("the window", window, MAX_WINDOW)):
        if not isinstance(field_value, int) or field_value > high:
            raise MalformedMessage(f"{what} must be an integer of at most {high}")
    return SessionParams(run_key, session_id, threshold, names, bits, length, first_round, window, version)


def _secret(value, what: str, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise MalformedMessage(f"{what} must be {size} bytes")
    return value


def _round(value) -> int:
    if not isinstance(value, int):
        raise MalformedMessage("a round number must be an integer")
    return value


def _message(value, cls, what: str, required: bool):
    """A message stored by its bytes; b"" where there is none."""
    if not isinstance(value, bytes):
        raise MalformedMessage(f"{what} must be stored as bytes")
    if not value:
        if required:
            raise MalformedMessage(f"{what} is missing")
        return None
    if not required:
        raise MalformedMessage(f"{what} is present where the session has none")
    try:
        return cls.from_bytes(value)
    except MalformedMessage as err:
        raise MalformedMessage(f"{what}: {err}") from None


def _map(value, what: str, parse_key, parse_value, entries: bool = False) -> dict:
    """``[[key, value], ...]`` sorted by key, each once; with ``entries``, ``[key, *fields]`` rows."""
    if not isinstance(value, list) or len(value) > MAX_PARTICIPANTS * MAX_WINDOW:
        raise MalformedMessage(f"{what} must be a list")
    parsed: dict = {}
    last = None
    for item in value:
        if not isinstance(item, list) or not item or (not entries and len(item) != 2):
            raise MalformedMessage(f"{what} must hold [key, value] entries")
        key = parse_key(item[0])
        if last is not None and not key > last:
            raise MalformedMessage(f"{what} must be sorted by key, each key once")
        last = key
        parsed[key] = item[1:] if entries else parse_value(item[1])
    return parsed


def _round_state(r: int, entry: list, params: SessionParams, verified) -> RoundState:
    if len(entry) != 5:
        raise MalformedMessage(f"round {r} must hold 5 fields")
    participants, answer, committed, signature, unmasking = entry
    if r not in params.rounds:
        raise MalformedMessage(f"round {r} is outside the session's window")
    participants = _names(participants, f"round {r}'s participants")
    committed = _names(committed, f"round {r}'s committed responders") or None
    if not set(participants) <= set(verified) or (committed and not set(committed) <= set(participants)):
        raise MalformedMessage(f"round {r}: its sets are not within the verified departments")
    unmasked = _message(unmasking, Unmasking, f"round {r}'s unmasking", bool(unmasking))
    # The masked vector of an unmasked round is dropped: it can never be sent again.
    masked = _message(answer, MaskedInput, f"round {r}'s masked input", unmasked is None)
    signed = _message(signature, ConsistencySignature, f"round {r}'s U3 signature", bool(signature))
    if (signed is not None or unmasked is not None) and committed is None:
        raise MalformedMessage(f"round {r}: an answer for U3 without a committed U3")
    for message in (masked, signed, unmasked):
        if message is not None and (message.round != r or message.session_id != params.session_id
                                    or message.run_key != params.run_key):
            raise MalformedMessage(f"round {r}: a stored answer belongs to another round or session")
    return RoundState(participants, masked, committed, signed, unmasked)


def roster_name(public_key, roster) -> str:
    """The roster name whose identity key is ``public_key`` (the signer's own)."""
    mine = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    names = [name for name in sorted(roster) if roster[name].public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == mine]
    if len(names) != 1:
        raise ValueError("the signer's identity key is not exactly one department's in the roster")
    return names[0]
