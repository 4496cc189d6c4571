"""The coordinator's side: builds each request, collects the answers, and recovers the sum.

The coordinator relays everything and is trusted with nothing: it learns the
sum over U3 of a round and nothing else as long as fewer than t departments
collude with it (see docs/explanation/secure-aggregation.md).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from ..shared.signing import verify
from . import keys, masking, sharing
from .errors import ProtocolViolation, SecAggAborted
from .messages import (SESSION_ID_BYTES, Advertisement, AdvertiseRequest, ConsistencyRequest,
                       ConsistencySignature, MaskedInput, MaskRequest, Shares, ShareRequest, Unmasking,
                       UnmaskRequest)
from .session import SessionParams


@dataclass
class _RoundState:
    participants: tuple[str, ...]                                      # U2
    masked: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    mask_signatures: dict[str, str] = field(default_factory=dict, repr=False)
    responders: tuple[str, ...] | None = None                           # U3, fixed once asked
    signatures: dict[str, str] = field(default_factory=dict, repr=False)
    unmaskings: dict[str, Unmasking] = field(default_factory=dict, repr=False)


class CoordinatorSession:
    """One session from the coordinator's side.

    ``roster`` (name -> identity public key), when given, lets the coordinator
    check what it relays, so that a department's bad message is pinned on it
    rather than refused downstream; the departments never rely on this check.
    """

    def __init__(self, run_key: str, threshold: int, participants, modulus_bits: int, vector_length: int,
                 first_round: int = 0, window: int = 1, session_id: bytes | None = None,
                 roster: Mapping[str, ec.EllipticCurvePublicKey] | None = None) -> None:
        names = tuple(sorted(participants))
        if len(set(names)) != len(names):
            raise ValueError("participant names must be unique")
        if not 2 <= threshold <= len(names):
            raise ValueError(f"threshold {threshold} outside [2, {len(names)}]")
        self.params = SessionParams(run_key, session_id or secrets.token_bytes(SESSION_ID_BYTES), threshold,
                                    names, modulus_bits, vector_length, first_round, window)
        self._roster = dict(roster) if roster is not None else None
        self.advertisements: dict[str, Advertisement] = {}
        self.shares: dict[str, Shares] = {}
        self._rounds: dict[int, _RoundState] = {}

    # --- requests and answers, in protocol order ----------------------------------------------------
    def advertise_request(self) -> AdvertiseRequest:
        p = self.params
        return AdvertiseRequest(p.run_key, p.session_id, p.threshold, p.participants, p.modulus_bits,
                                p.vector_length, p.first_round, p.window)

    def receive_advertisement(self, adv: Advertisement) -> None:
        self._from_participant(adv, adv.name)
        if self._roster is not None and not verify(
                self._roster[adv.name], self.params.advertisement_payload(adv.name, adv.public_key), adv.signature):
            raise ProtocolViolation(f"the advertisement of '{adv.name}' is not signed by its identity key")
        self.advertisements[adv.name] = adv

    def share_request(self) -> ShareRequest:
        self._require(len(self.advertisements), "advertisements")
        p = self.params
        return ShareRequest(p.run_key, p.session_id, tuple(self.advertisements[n] for n in sorted(self.advertisements)))

    def receive_shares(self, shares: Shares) -> None:
        self._from_participant(shares, shares.name)
        if shares.name not in self.advertisements:
            raise ProtocolViolation(f"shares from '{shares.name}', which did not advertise")
        self.shares[shares.name] = shares

    def mask_request(self, name: str, round_number: int) -> MaskRequest:
        """Round r's request to ``name``; U2 (those whose shares arrived) is fixed by the first call."""
        state = self._rounds.get(round_number)
        if state is None:
            self._require(len(self.shares), "departments with shares")
            if round_number not in self.params.rounds:
                raise ValueError(f"round {round_number} is outside the session's window")
            state = self._rounds[round_number] = _RoundState(tuple(sorted(self.shares)))
        ciphertexts = {v: self.shares[v].ciphertexts[name] for v in state.participants if v != name}
        p = self.params
        return MaskRequest(p.run_key, p.session_id, round_number, state.participants, ciphertexts)

    def receive_masked(self, answer: MaskedInput) -> None:
        state = self._round(answer)
        if answer.name not in state.participants:
            raise ProtocolViolation(f"a masked input from '{answer.name}', not in U2 of round {answer.round}")
        if state.responders is not None:
            raise ProtocolViolation(f"round {answer.round}: U3 is already fixed; '{answer.name}' is too late")
        p = self.params
        if self._roster is not None and not verify(self._roster[answer.name],
                                                   p.masked_payload(answer.round, state.participants), answer.signature):
            raise ProtocolViolation(f"the masked input of '{answer.name}' is not signed over U2 of round {answer.round}")
        state.masked[answer.name] = masking.from_bytes(answer.masked, p.vector_length, p.modulus_bits)
        state.mask_signatures[answer.name] = answer.signature

    def consistency_request(self, round_number: int) -> ConsistencyRequest | None:
        """Fix U3 (who sent y); when someone in U2 did not, the request each member of U3 must sign."""
        state = self._fix_responders(round_number)
        if state.responders == state.participants:
            return None
        p = self.params
        return ConsistencyRequest(p.run_key, p.session_id, round_number, state.responders)

    def receive_consistency(self, answer: ConsistencySignature) -> None:
        state = self._round(answer)
        if state.responders is None or answer.name not in state.responders:
            raise ProtocolViolation(f"a U3 signature from '{answer.name}', not in U3 of round {answer.round}")
        state.signatures[answer.name] = answer.signature

    def unmask_request(self, round_number: int) -> UnmaskRequest:
        state = self._fix_responders(round_number)
        signatures = {}
        if state.responders != state.participants:
            missing = sorted(set(state.responders) - set(state.signatures))
            if missing:
                raise SecAggAborted(f"round {round_number}: {missing} did not sign U3; it cannot change now "
                                    "(the others signed it), so the round ends with nothing released")
            signatures = {n: state.signatures[n] for n in state.responders}
        p = self.params
        mask_signatures = {n: state.mask_signatures[n] for n in state.responders}
        return UnmaskRequest(p.run_key, p.session_id, round_number, state.responders, mask_signatures, signatures)

    def receive_unmasking(self, answer: Unmasking) -> None:
        state = self._round(answer)
        if state.responders is None or answer.name not in state.responders:
            raise ProtocolViolation(f"an unmasking from '{answer.name}', not in U3 of round {answer.round}")
        dropped = set(state.participants) - set(state.responders)
        if set(answer.shares) != set(state.responders) or set(answer.seeds) != dropped:
            raise ProtocolViolation(f"the unmasking from '{answer.name}' covers other departments than "
                                    f"U3 = {list(state.responders)} and the dropped {sorted(dropped)}")
        state.unmaskings[answer.name] = answer

    def unmask(self, round_number: int) -> np.ndarray:
        """Σ_{v in U3} x_v mod 2^k for round r.  Too few answers: ``SecAggAborted``."""
        state = self._rounds.get(round_number)
        if state is None or state.responders is None:
            raise ValueError(f"round {round_number} has not reached the unmask step")
        p, answers = self.params, state.unmaskings
        bits, length, t = p.modulus_bits, p.vector_length, p.threshold
        if len(answers) < t:
            raise SecAggAborted(f"round {round_number}: {len(answers)} unmask answers, fewer than the threshold "
                                f"{t}; nothing is released")
        dropped = [d for d in state.participants if d not in state.responders]
        silent = sorted(set(state.responders) - set(answers))
        if dropped and silent:
            # Only v itself reveals its pair seed with a dropped d; without it y_v stays masked.
            raise SecAggAborted(f"round {round_number}: {silent} sent a masked input but no unmasking, after "
                                f"{dropped} had dropped; nothing is released")
        owner_of = {p.share_index(n): n for n in p.participants}
        total = np.zeros(length, dtype=np.uint64)
        for v in state.responders:
            shares = {p.share_index(holder): answers[holder].shares[v] for holder in sorted(answers)}
            seed = sharing.combine(shares, t, owner_of, v)
            own = keys.self_mask_key(seed, p.session_id, p.context, v, round_number)
            y = masking.subtract(state.masked[v], masking.prg(own, length, bits), bits)
            for d in dropped:
                pair = masking.prg(answers[v].seeds[d], length, bits)
                # v added +PRG if v < d, subtracted it otherwise: undo exactly that.
                y = masking.subtract(y, pair, bits) if v < d else masking.add(y, pair, bits)
            total = masking.add(total, y, bits)
        return total

    # --- helpers ------------------------------------------------------------------------------------
    def _fix_responders(self, round_number: int) -> _RoundState:
        state = self._rounds.get(round_number)
        if state is None:
            raise ValueError(f"round {round_number} was never asked to mask")
        if state.responders is None:
            state.responders = tuple(sorted(state.masked))
            self._require(len(state.responders), f"masked inputs in round {round_number}")
        return state

    def _round(self, answer) -> _RoundState:
        self.params.check_header(answer)
        state = self._rounds.get(answer.round)
        if state is None:
            raise ProtocolViolation(f"an answer for round {answer.round}, which was never asked")
        return state

    def _from_participant(self, message, name: str) -> None:
        self.params.check_header(message)
        if name not in self.params.participants:
            raise ProtocolViolation(f"'{name}' is not a participant of this session")

    def _require(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise SecAggAborted(f"{count} {what}, fewer than the threshold {self.params.threshold}; "
                                "nothing is released")
