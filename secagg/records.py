"""Secure-aggregation messages in Flower records: the one module of secagg that imports Flower.

Each protocol message travels as a Flower ``ConfigRecord`` holding a single bytes
value (the message's canonical byte form) under a key naming its kind, e.g.
``{"secagg-mask-request": b"..."}``; reading one back is strict, so a record of
another kind, a missing key or any extra key is ``MalformedMessage``.  The
wiring puts that record under :data:`RECORD_NAME` in a ``Message``'s content.
"""

from __future__ import annotations

from flwr.app import ConfigRecord

from .errors import MalformedMessage
from .messages import (Advertisement, AdvertiseRequest, ConsistencyRequest, ConsistencySignature, MaskedInput,
                       MaskRequest, Shares, ShareRequest, Unmasking, UnmaskRequest)

# The action names of the messages the coordinator sends.  Flower requires "<category>.<identifier>", so the
# action is "secagg_advertise", not "secagg-advertise" (a hyphen fails flwr.app.metadata.validate_message_type).
ACTION_ADVERTISE = "query.secagg_advertise"        # AdvertiseRequest -> Advertisement
ACTION_SHARE = "query.secagg_share"                # ShareRequest -> Shares
ACTION_CONSISTENCY = "query.secagg_consistency"    # ConsistencyRequest -> ConsistencySignature
ACTION_UNMASK = "query.secagg_unmask"              # UnmaskRequest -> Unmasking
ACTIONS = (ACTION_ADVERTISE, ACTION_SHARE, ACTION_CONSISTENCY, ACTION_UNMASK)
ACTION_HELLO = "query.secagg_hello"                # hello -> the name a department claims (simulation only)
# MaskRequest rides on the train request and MaskedInput on its reply: masking needs no exchange of its own.

RECORD_NAME = "secagg"                             # the ConfigRecord's name in a Message's RecordDict
STATE_RECORD_NAME = "secagg-state"                 # the department's saved session in context.state
STATE_KEY = "secagg-department-state"
HELLO_KIND = "secagg-hello"                        # the hello request's only key; its value is empty bytes

KINDS = {
    AdvertiseRequest: "secagg-advertise-request",
    Advertisement: "secagg-advertisement",
    ShareRequest: "secagg-share-request",
    Shares: "secagg-shares",
    MaskRequest: "secagg-mask-request",
    MaskedInput: "secagg-masked-input",
    ConsistencyRequest: "secagg-consistency-request",
    ConsistencySignature: "secagg-consistency-signature",
    UnmaskRequest: "secagg-unmask-request",
    Unmasking: "secagg-unmasking",
}


def to_record(message) -> ConfigRecord:
    """``message`` as a ConfigRecord ``{kind: bytes}``."""
    kind = KINDS.get(type(message))
    if kind is None:
        raise TypeError(f"{type(message).__name__} is not a secure-aggregation message")
    return ConfigRecord({kind: message.to_bytes()})


def from_record(record, cls):
    """The ``cls`` message in ``record``; any other content is ``MalformedMessage``."""
    kind = KINDS[cls]
    return cls.from_bytes(_single_bytes(record, kind, cls.__name__))


def hello_record() -> ConfigRecord:
    """The hello request: asks a department the name it goes by (a deployment uses the registered name)."""
    return ConfigRecord({HELLO_KIND: b""})


def read_hello(record) -> None:
    """Check that ``record`` is exactly :func:`hello_record`'s; anything else is ``MalformedMessage``."""
    if _single_bytes(record, HELLO_KIND, "hello") != b"":
        raise MalformedMessage("a hello carries empty bytes")


def state_to_record(state: bytes) -> ConfigRecord:
    """A department's saved session (``DepartmentSession.to_state()``) for ``context.state``."""
    return ConfigRecord({STATE_KEY: state})


def state_from_record(record) -> bytes:
    """The saved session bytes back from :func:`state_to_record`'s record."""
    return _single_bytes(record, STATE_KEY, "department state")


def _single_bytes(record, key: str, what: str) -> bytes:
    if not isinstance(record, ConfigRecord):
        raise MalformedMessage(f"a {what} must arrive in a ConfigRecord, not {type(record).__name__}")
    keys = sorted(record.keys())
    if keys != [key]:
        # Names of the keys only: values may be secrets (a saved state) or large.
        raise MalformedMessage(f"a {what} record holds exactly the key '{key}', not {keys!r:.200}")
    value = record[key]
    if not isinstance(value, bytes):
        raise MalformedMessage(f"the '{key}' value must be bytes, not {type(value).__name__}")
    return value
