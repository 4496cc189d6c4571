"""The protocol's messages: frozen dataclasses with a strict canonical byte form.

Every message carries the protocol version, the run key and the session id, and
those that belong to a round carry it too, so that a message from another run,
session or round is refused where it arrives.  Parsing checks types, sizes and
canonical order (names sorted and unique); fields holding secrets are left out of
``repr()``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .encoding import decode, encode
from .errors import MalformedMessage

VERSION = 2  # 2: masked vectors packed in k-bit words
SESSION_ID_BYTES = 16
MAX_RUN_KEY = 256
MAX_NAME = 64
MAX_PARTICIPANTS = 1000
MAX_VECTOR_LENGTH = 1 << 25
MAX_WINDOW = 10_000
MAX_SIGNATURE = 256  # base64 of a DER ECDSA-P384 signature is about 140 characters
MAX_CIPHERTEXT = 512 + 24 * MAX_WINDOW  # a window of 16-byte shares, each with its 5-byte tag
MAX_MESSAGE_BYTES = 64 + 8 * MAX_VECTOR_LENGTH + 64 * 1024 * 1024
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def _names(value, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_PARTICIPANTS:
        raise MalformedMessage(f"{what} must be a list of at most {MAX_PARTICIPANTS} names")
    names = tuple(_name(v, what) for v in value)
    if list(names) != sorted(set(names)):
        raise MalformedMessage(f"{what} must be sorted and unique")
    return names


def _name(value, what: str = "a name") -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not NAME_PATTERN.match(value):
        raise MalformedMessage(f"{what}: {value!r:.80} is not a department name")
    return value


def _bytes(value, what: str, low: int = 0, high: int = MAX_MESSAGE_BYTES) -> bytes:
    if not isinstance(value, bytes) or not low <= len(value) <= high:
        raise MalformedMessage(f"{what} must be {low}..{high} bytes")
    return value


def _int(value, what: str, high: int = 2**63) -> int:
    if not isinstance(value, int) or value > high:
        raise MalformedMessage(f"{what} must be an integer of at most {high}")
    return value


def _map(value, what: str, parse_value) -> dict:
    if not isinstance(value, list) or len(value) > MAX_PARTICIPANTS:
        raise MalformedMessage(f"{what} must be a list of at most {MAX_PARTICIPANTS} pairs")
    pairs = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise MalformedMessage(f"{what} must hold [name, value] pairs")
        pairs.append((_name(item[0], what), parse_value(item[1])))
    keys = [k for k, _ in pairs]
    if keys != sorted(set(keys)):
        raise MalformedMessage(f"{what} must be sorted by name, each name once")
    return dict(pairs)


def _signature(value, what="a signature") -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_SIGNATURE:
        raise MalformedMessage(f"{what} must be a base64 string of at most {MAX_SIGNATURE} characters")
    return value


# How each kind of field is written (to a canonical value) and read back (strictly).
_KINDS = {
    "name": (lambda v: v, _name),
    "names": (lambda v: list(v), _names),
    "count": (lambda v: v, lambda v, w: _int(v, w, MAX_PARTICIPANTS)),
    "bits": (lambda v: v, lambda v, w: _int(v, w, 64)),
    "length": (lambda v: v, lambda v, w: _int(v, w, MAX_VECTOR_LENGTH)),
    "round": (lambda v: v, _int),
    "window": (lambda v: v, lambda v, w: _int(v, w, MAX_WINDOW)),
    "public_key": (lambda v: v, lambda v, w: _bytes(v, w, 32, 32)),
    "signature": (lambda v: v, _signature),
    "vector": (lambda v: v, lambda v, w: _bytes(v, w, 0, 8 * MAX_VECTOR_LENGTH)),
    "ciphertexts": (lambda v: [[k, v[k]] for k in sorted(v)],
                    lambda v, w: _map(v, w, lambda c: _bytes(c, w, 28, MAX_CIPHERTEXT))),
    "signatures": (lambda v: [[k, v[k]] for k in sorted(v)], lambda v, w: _map(v, w, _signature)),
    "shares": (lambda v: [[k, v[k]] for k in sorted(v)], lambda v, w: _map(v, w, lambda s: _bytes(s, w, 16, 16))),
    "seeds": (lambda v: [[k, v[k]] for k in sorted(v)], lambda v, w: _map(v, w, lambda s: _bytes(s, w, 32, 32))),
    "advertisements": (lambda v: [a.to_bytes() for a in v],
                       lambda v, w: _advertisements(v)),
}


def _advertisements(value) -> tuple:
    if not isinstance(value, list) or len(value) > MAX_PARTICIPANTS:
        raise MalformedMessage(f"advertisements must be a list of at most {MAX_PARTICIPANTS}")
    return tuple(Advertisement.from_bytes(_bytes(item, "an advertisement", 0, 4096)) for item in value)


class _Message:
    """Shared byte form: ``[type name, version, run key, session id, fields...]``."""

    _KINDS_OF: dict[str, str] = {}

    def to_bytes(self) -> bytes:
        values = [_KINDS[kind][0](getattr(self, name)) for name, kind in self._KINDS_OF.items()]
        return encode(type(self).__name__, self.version, self.run_key, self.session_id, *values)

    @classmethod
    def from_bytes(cls, data: bytes):
        items = decode(data, MAX_MESSAGE_BYTES)
        if len(items) != 4 + len(cls._KINDS_OF):
            raise MalformedMessage(f"{cls.__name__} has {4 + len(cls._KINDS_OF)} fields, not {len(items)}")
        tag, version, run_key, session_id, *rest = items
        if tag != cls.__name__:
            raise MalformedMessage(f"expected a {cls.__name__}, got {tag!r:.60}")
        if version != VERSION:
            raise MalformedMessage(f"protocol version {version!r:.20} is not supported (this side speaks {VERSION})")
        if not isinstance(run_key, str) or not 0 < len(run_key) <= MAX_RUN_KEY:
            raise MalformedMessage("the run key must be a string of 1..256 characters")
        _bytes(session_id, "the session id", SESSION_ID_BYTES, SESSION_ID_BYTES)
        fields = {name: _KINDS[kind][1](value, f"{cls.__name__}.{name}")
                  for (name, kind), value in zip(cls._KINDS_OF.items(), rest)}
        return cls(run_key=run_key, session_id=session_id, **fields)


def _message(**kinds: str):
    """Class decorator: a frozen dataclass whose fields (after the header) have these kinds."""
    def wrap(cls):
        cls = dataclass(frozen=True)(cls)
        cls._KINDS_OF = kinds
        missing = set(kinds) - {f.name for f in dataclasses.fields(cls)}
        assert not missing, missing
        return cls
    return wrap


@_message(threshold="count", participants="names", modulus_bits="bits", vector_length="length",
          first_round="round", window="window")
class AdvertiseRequest(_Message):
    """Coordinator -> each department: the proposed session."""
    run_key: str
    session_id: bytes
    threshold: int
    participants: tuple[str, ...]
    modulus_bits: int
    vector_length: int
    first_round: int
    window: int
    version: int = VERSION


@_message(name="name", public_key="public_key", signature="signature")
class Advertisement(_Message):
    """Department -> coordinator: its session X25519 key, signed with its identity key."""
    run_key: str
    session_id: bytes
    name: str
    public_key: bytes
    signature: str
    version: int = VERSION


@_message(advertisements="advertisements")
class ShareRequest(_Message):
    """Coordinator -> each department: every advertisement it received."""
    run_key: str
    session_id: bytes
    advertisements: tuple[Advertisement, ...]
    version: int = VERSION


@_message(name="name", ciphertexts="ciphertexts")
class Shares(_Message):
    """Department -> coordinator: recipient -> its encrypted shares of the window's self-mask seeds."""
    run_key: str
    session_id: bytes
    name: str
    ciphertexts: dict = field(repr=False)
    version: int = VERSION


@_message(round="round", participants="names", ciphertexts="ciphertexts")
class MaskRequest(_Message):
    """Coordinator -> one department: mask round r over U2 (``participants``); the ciphertexts addressed to it."""
    run_key: str
    session_id: bytes
    round: int
    participants: tuple[str, ...]
    ciphertexts: dict = field(repr=False)
    version: int = VERSION


@_message(round="round", name="name", masked="vector", signature="signature")
class MaskedInput(_Message):
    """Department -> coordinator: y = x + self mask + pair masks, packed in k-bit words (masking.to_bytes), and its
    identity signature over (context, r, U2): the one U2 it masked over in this round."""
    run_key: str
    session_id: bytes
    round: int
    name: str
    masked: bytes = field(repr=False)
    signature: str
    version: int = VERSION


@_message(round="round", responders="names")
class ConsistencyRequest(_Message):
    """Coordinator -> each member of U3 (only when U3 != U2): sign the set of departments that sent y."""
    run_key: str
    session_id: bytes
    round: int
    responders: tuple[str, ...]
    version: int = VERSION


@_message(round="round", name="name", signature="signature")
class ConsistencySignature(_Message):
    """Department -> coordinator: its identity signature over (context, r, U3)."""
    run_key: str
    session_id: bytes
    round: int
    name: str
    signature: str
    version: int = VERSION


@_message(round="round", responders="names", mask_signatures="signatures", signatures="signatures")
class UnmaskRequest(_Message):
    """Coordinator -> each member of U3: reveal what removes the masks.  Carries every member's
    MaskedInput signature over (r, U2), and, when U3 != U2, every member's signature over (r, U3)."""
    run_key: str
    session_id: bytes
    round: int
    responders: tuple[str, ...]
    mask_signatures: dict = field(default_factory=dict, repr=False)
    signatures: dict = field(default_factory=dict, repr=False)
    version: int = VERSION


@_message(round="round", name="name", shares="shares", seeds="seeds")
class Unmasking(_Message):
    """Department -> coordinator: v -> its share of b_v,r for v in U3; d -> seed_ud,r for d in U2 minus U3."""
    run_key: str
    session_id: bytes
    round: int
    name: str
    shares: dict = field(repr=False)
    seeds: dict = field(repr=False)
    version: int = VERSION


MESSAGE_TYPES = (AdvertiseRequest, Advertisement, ShareRequest, Shares, MaskRequest, MaskedInput,
                 ConsistencyRequest, ConsistencySignature, UnmaskRequest, Unmasking)
