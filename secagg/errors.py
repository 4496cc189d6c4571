"""The three ways a secure-aggregation step can fail.

Each is a ``ValueError`` so that callers that already treat bad input as a value
error keep working; catch the specific class to tell them apart.
"""

from __future__ import annotations


class SecAggError(ValueError):
    """Base class of every secure-aggregation failure."""


class MalformedMessage(SecAggError):
    """The bytes do not parse as the message they claim to be (or exceed a size bound)."""


class ProtocolViolation(SecAggError):
    """A well-formed message that the protocol forbids here: wrong session, round,
    participant set, a bad signature or ciphertext, a second answer for one round."""


class SecAggAborted(SecAggError):
    """Too few departments took part: the round ends and nothing is released."""
