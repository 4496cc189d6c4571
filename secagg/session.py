"""What both sides agree on for one session, and the exact bytes each signature covers."""

from __future__ import annotations

from dataclasses import dataclass

from .encoding import encode
from .errors import ProtocolViolation
from .messages import VERSION, AdvertiseRequest

CONTEXT_LABEL = "fedsilo-secagg/context/v1"
ADVERTISEMENT_LABEL = "fedsilo-secagg/advertisement/v1"
RESPONDERS_LABEL = "fedsilo-secagg/responders/v1"
MASKED_LABEL = "fedsilo-secagg/masked-over/v1"


@dataclass(frozen=True)
class SessionParams:
    """The parameters of one session, as the AdvertiseRequest proposed them."""

    run_key: str
    session_id: bytes
    threshold: int
    participants: tuple[str, ...]
    modulus_bits: int
    vector_length: int
    first_round: int
    window: int
    version: int = VERSION

    @classmethod
    def from_request(cls, request: AdvertiseRequest) -> "SessionParams":
        return cls(request.run_key, request.session_id, request.threshold, tuple(request.participants),
                   request.modulus_bits, request.vector_length, request.first_round, request.window,
                   request.version)

    @property
    def context(self) -> bytes:
        """Everything that identifies the session; bound into every key, signature and AD."""
        return encode(CONTEXT_LABEL, self.version, self.run_key, self.session_id, self.threshold,
                      self.modulus_bits, self.vector_length, sorted(self.participants),
                      self.first_round, self.window)

    @property
    def rounds(self) -> range:
        return range(self.first_round, self.first_round + self.window)

    def share_index(self, name: str) -> int:
        """A department's Shamir index: its 1-based place in the sorted participant list."""
        return 1 + self.participants.index(name)

    def advertisement_payload(self, name: str, public_key: bytes) -> bytes:
        return encode(ADVERTISEMENT_LABEL, self.context, name, public_key)

    def responders_payload(self, round_number: int, responders) -> bytes:
        """What a department signs to commit to U3 for a round."""
        return encode(RESPONDERS_LABEL, self.context, round_number, sorted(responders))

    def masked_payload(self, round_number: int, participants) -> bytes:
        """What a department signs with its masked input: the U2 it masked over."""
        return encode(MASKED_LABEL, self.context, round_number, sorted(participants))

    def check_header(self, message, round_number: int | None = None) -> None:
        """Refuse a message of another version, run, session or (where given) round: a replay."""
        if message.version != self.version or message.run_key != self.run_key:
            raise ProtocolViolation(f"{type(message).__name__} belongs to another run or protocol version")
        if message.session_id != self.session_id:
            raise ProtocolViolation(f"{type(message).__name__} belongs to another session")
        if round_number is not None and message.round != round_number:
            raise ProtocolViolation(f"{type(message).__name__} is for round {message.round}, not {round_number}")
