"""Secure aggregation: the coordinator learns only the sum of a round's inputs.

The protocol core as plain, in-process state machines (:class:`DepartmentSession`,
:class:`CoordinatorSession`) exchanging typed messages (:mod:`.messages`); a
variant of Bonawitz et al. (CCS 2017) against a malicious coordinator, with
per-round pair seeds revealed for dropouts.  See
docs/explanation/secure-aggregation.md for the protocol and its argument.
Not yet wired into runs; :mod:`.records` (the only module importing Flower), the
session's saved state (:meth:`DepartmentSession.to_state`) and :mod:`.fixed_point`
are the pieces that wiring uses.
"""

from .coordinator import CoordinatorSession
from .department import DepartmentPolicy, DepartmentSession
from .errors import MalformedMessage, ProtocolViolation, SecAggAborted, SecAggError
from .fixed_point import FixedPointCodec
from .masking import decode_signed, encode_signed, required_bits
from .messages import VERSION

__all__ = ["CoordinatorSession", "DepartmentPolicy", "DepartmentSession", "FixedPointCodec", "MalformedMessage",
           "ProtocolViolation", "SecAggAborted", "SecAggError", "VERSION", "decode_signed", "encode_signed",
           "required_bits"]
