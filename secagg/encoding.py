"""One canonical, length-prefixed binary encoding for everything signed, used as
AEAD associated data or HKDF info, and for the messages themselves.

A value is one of: ``bytes``, ``str`` (UTF-8), a non-negative ``int`` below 2**64,
or a list/tuple of values.  Each is written as a one-byte tag, then

* ``B`` / ``S``: a 4-byte big-endian length and the bytes,
* ``I``: 8 bytes big-endian,
* ``L``: a 4-byte big-endian count and the items.

There is exactly one encoding per value and the decoder accepts only that one
(no trailing bytes, no alternative forms), so two different tuples never sign
or authenticate the same bytes — the ambiguity JSON would leave.
"""

from __future__ import annotations

import struct
from typing import Union

from .errors import MalformedMessage

Value = Union[bytes, str, int, list, tuple]

MAX_DEPTH = 6


def encode(*items: Value) -> bytes:
    """The canonical encoding of ``items`` (a list of them)."""
    out = bytearray()
    _put(out, list(items), 0)
    return bytes(out)


def _put(out: bytearray, value: Value, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply to encode")
    if isinstance(value, bool):  # bool is an int; refuse it rather than guess
        raise TypeError("booleans have no canonical encoding")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out += b"B" + struct.pack(">I", len(data)) + data
    elif isinstance(value, str):
        data = value.encode("utf-8")
        out += b"S" + struct.pack(">I", len(data)) + data
    elif isinstance(value, int):
        if not 0 <= value < 2**64:
            raise ValueError(f"integer {value} outside [0, 2**64)")
        out += b"I" + struct.pack(">Q", value)
    elif isinstance(value, (list, tuple)):
        out += b"L" + struct.pack(">I", len(value))
        for item in value:
            _put(out, item, depth + 1)
    else:
        raise TypeError(f"no canonical encoding for {type(value).__name__}")


def decode(data: bytes, max_bytes: int) -> list:
    """The list that :func:`encode` turned into ``data``; strict, bounded by ``max_bytes``."""
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedMessage("a message must be bytes")
    if len(data) > max_bytes:
        raise MalformedMessage(f"message of {len(data)} bytes exceeds the bound of {max_bytes}")
    value, end = _get(bytes(data), 0, 0)
    if end != len(data):
        raise MalformedMessage(f"{len(data) - end} trailing bytes after the message")
    if not isinstance(value, list):
        raise MalformedMessage("a message must be a list")
    return value


def _get(data: bytes, pos: int, depth: int) -> tuple[Value, int]:
    if depth > MAX_DEPTH:
        raise MalformedMessage("message nested too deeply")
    if pos >= len(data):
        raise MalformedMessage("message truncated")
    tag = data[pos:pos + 1]
    pos += 1
    if tag == b"I":
        if pos + 8 > len(data):
            raise MalformedMessage("message truncated in an integer")
        return struct.unpack(">Q", data[pos:pos + 8])[0], pos + 8
    if tag not in (b"B", b"S", b"L"):
        raise MalformedMessage(f"unknown tag {tag!r} at byte {pos - 1}")
    if pos + 4 > len(data):
        raise MalformedMessage("message truncated in a length")
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    pos += 4
    if tag == b"L":
        # Every item takes at least 5 bytes: a count beyond that is a lie, refused before looping.
        if length * 5 > len(data) - pos:
            raise MalformedMessage("list count exceeds the bytes left")
        items = []
        for _ in range(length):
            item, pos = _get(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if pos + length > len(data):
        raise MalformedMessage("message truncated in a string")
    raw = data[pos:pos + length]
    if tag == b"B":
        return raw, pos + length
    try:
        return raw.decode("utf-8"), pos + length
    except UnicodeDecodeError:
        raise MalformedMessage("a string is not valid UTF-8") from None
