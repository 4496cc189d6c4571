"""The train request: what a coordinator's train task asks of a department, in its config.

The coordinator builds a :class:`TrainRequest` and sends :meth:`TrainRequest.to_config`
as the task's ``config`` (Flower's strategy adds ``server-round`` itself, with the
same value); a department reads it back with :meth:`TrainRequest.from_config`,
which checks every field: a request with a field of the wrong type, a negative or
huge number, an acknowledged head that is not a ledger hash, or a version newer
than this fedsilo reads raises :class:`MalformedRequest`, which the department's
budget guard answers with a decline that names the field.  Keys the request does
not define (Flower's own) are left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .protocol import RUN_KEY
from .record import ACK_HEAD_KEY, ACK_SEQ_KEY, MAX_COUNT

# Flower's own key for the round number, which its strategies put into every task's config.
ROUND_KEY = "server-round"
# The request's format; absent from a request of fedsilo 0.4 and earlier (the same fields: version 1).
REQUEST_VERSION_KEY = "request-version"
REQUEST_VERSION = 1
# A ledger head is a SHA-256 hex digest; an empty ledger's head is "".
_HEAD = re.compile(r"[0-9a-f]{64}")


class MalformedRequest(ValueError):
    """A train request that cannot be honoured as sent; the message names the field."""


@dataclass(frozen=True)
class TrainRequest:
    """One train task's config.

    Parameters
    ----------
    run_key : str
        The coordinator's name for the run, the same across its resumes: it names
        the run in the department's ledger ("" when a coordinator did not send
        one; the department then uses Flower's run id).
    server_round : int
        The round, counted from 1 (0: not stated).
    acknowledged : (int, str) or None
        The (entries, head hash) of the department's ledger that the coordinator
        last recorded for its identity; None when it has recorded none.
    version : int
        The request's format, :data:`REQUEST_VERSION`.
    """

    run_key: str = ""
    server_round: int = 0
    acknowledged: tuple[int, str] | None = None
    version: int = REQUEST_VERSION

    def __post_init__(self) -> None:
        _check(self)

    def to_config(self) -> dict[str, int | str]:
        """The config values of the task (a ``ConfigRecord`` is built from them)."""
        config: dict[str, int | str] = {REQUEST_VERSION_KEY: self.version, RUN_KEY: self.run_key,
                                        ROUND_KEY: self.server_round}
        if self.acknowledged is not None:
            config[ACK_SEQ_KEY], config[ACK_HEAD_KEY] = self.acknowledged
        return config

    def acknowledging(self, acknowledged: tuple[int, str] | None) -> "TrainRequest":
        """The same request for one department: with the head acknowledged for its identity."""
        return TrainRequest(self.run_key, self.server_round, acknowledged, self.version)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TrainRequest":
        """The request a task's config states, every field checked.

        Raises
        ------
        MalformedRequest
            A field of the wrong type or out of range, only one of the
            acknowledged seq and head, or a version newer than this fedsilo reads.
        """
        version = config.get(REQUEST_VERSION_KEY, REQUEST_VERSION)
        _whole(REQUEST_VERSION_KEY, version)
        if version > REQUEST_VERSION:
            raise MalformedRequest(
                f"{REQUEST_VERSION_KEY}: the coordinator sent a version {version} request, newer than the "
                f"version {REQUEST_VERSION} this department's fedsilo reads; upgrade fedsilo on the department")
        if version < 1:
            raise MalformedRequest(f"{REQUEST_VERSION_KEY}: must be 1 or more, got {version}")
        run_key = config.get(RUN_KEY, "")
        if not isinstance(run_key, str):
            raise MalformedRequest(f"{RUN_KEY}: must be text, got {type(run_key).__name__}")
        server_round = config.get(ROUND_KEY, 0)
        has_seq, has_head = ACK_SEQ_KEY in config, ACK_HEAD_KEY in config
        if has_seq != has_head:
            given, lacking = (ACK_SEQ_KEY, ACK_HEAD_KEY) if has_seq else (ACK_HEAD_KEY, ACK_SEQ_KEY)
            raise MalformedRequest(f"{lacking}: missing, while {given} is given (they come together)")
        acknowledged = (config[ACK_SEQ_KEY], config[ACK_HEAD_KEY]) if has_seq else None
        try:
            return cls(run_key, server_round, acknowledged, version)
        except TypeError as err:  # a tuple that is not one: the checks name the field
            raise MalformedRequest(str(err)) from None


def _whole(key: str, value: Any) -> None:
    """``value`` is an int (not a bool) in [0, MAX_COUNT]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedRequest(f"{key}: must be a whole number, got {type(value).__name__}")
    if not 0 <= value <= MAX_COUNT:
        raise MalformedRequest(f"{key}: must be in [0, 2^53], got {value}")


def _check(request: TrainRequest) -> None:
    """Every field of ``request`` typed and in range (the coordinator's own requests included)."""
    _whole(REQUEST_VERSION_KEY, request.version)
    if not isinstance(request.run_key, str):
        raise MalformedRequest(f"{RUN_KEY}: must be text, got {type(request.run_key).__name__}")
    _whole(ROUND_KEY, request.server_round)
    if request.acknowledged is None:
        return
    seq, head = request.acknowledged
    _whole(ACK_SEQ_KEY, seq)
    if not isinstance(head, str):
        raise MalformedRequest(f"{ACK_HEAD_KEY}: must be text, got {type(head).__name__}")
    if len(head) > 64:
        raise MalformedRequest(f"{ACK_HEAD_KEY}: {len(head)} characters, longer than a ledger hash (64)")
    if (seq == 0) != (head == "") or (head and not _HEAD.fullmatch(head)):
        shown = head[:16] + ("…" if len(head) > 16 else "")
        raise MalformedRequest(f"{ACK_HEAD_KEY}: entry {seq}'s head must be "
                               + ("a SHA-256 hex digest" if seq else "empty (an empty ledger)")
                               + f", got {shown!r}")
