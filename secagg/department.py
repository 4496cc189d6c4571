"""The department's side of a session: a state machine that answers each request once.

A department trusts only its own roster of identity keys, never the coordinator's
word.  Per round it masks at most one input and answers at most one unmask: for
every department in the round it reveals either a share of its self-mask seed or
its own pair seed with it, never both, and it commits to a single set U3 of
departments whose inputs count.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from ..shared.signing import Signer, verify
from . import keys, masking, sharing
from . import state as state_form
from .encoding import decode, encode
from .errors import MalformedMessage, ProtocolViolation
from .messages import (VERSION, Advertisement, AdvertiseRequest, ConsistencyRequest, ConsistencySignature,
                       MaskedInput, MaskRequest, Shares, ShareRequest, Unmasking, UnmaskRequest)
from .session import SessionParams


@dataclass(frozen=True)
class DepartmentPolicy:
    """What a department accepts, whatever the coordinator proposes."""

    min_threshold: int = 3          # c + 2 for the c colluding departments it assumes (here c = 1)
    min_participants: int = 3
    max_vector_length: int = 1 << 24
    max_window: int = 1000
    # Require 2t > n + c, c = min_threshold - 2: no two disjoint-enough sets of t can each reconstruct
    # (a coordinator forking the departments' views of who dropped).  Off for the bare protocol's own
    # tests; every wired department (client/secure_aggregation.py) turns it on.
    majority_rule: bool = False


@dataclass
class _Round:
    participants: tuple[str, ...]
    answer: MaskedInput | None = field(repr=False)   # dropped once unmasked: it is never sent again
    committed: tuple[str, ...] | None = None     # the one U3 this department accepts for the round
    signature: ConsistencySignature | None = None
    unmasking: Unmasking | None = field(default=None, repr=False)


class DepartmentSession:
    """One department in one session (one key agreement; ``window`` rounds)."""

    def __init__(self, name: str, signer: Signer, roster: Mapping[str, ec.EllipticCurvePublicKey],
                 policy: DepartmentPolicy = DepartmentPolicy()) -> None:
        if name not in roster:
            raise ValueError(f"'{name}' is not in its own roster")
        self.name, self._signer, self._roster, self.policy = name, signer, dict(roster), policy
        self.params: SessionParams | None = None
        self._private = self._public = None
        self._advertisement: Advertisement | None = None
        self._verified: tuple[str, ...] = ()
        self._pair_keys: dict[str, bytes] = {}
        self._own_seeds: dict[int, bytes] = {}
        self._own_shares: dict[int, bytes] = {}
        self._received: dict[str, dict[int, bytes]] = {}   # dealer -> round -> my share of its seed
        self._shares_answer: Shares | None = None
        self._rounds: dict[int, _Round] = {}

    def __repr__(self) -> str:
        return f"DepartmentSession(name={self.name!r}, session={self.params and self.params.session_id.hex()})"

    # --- 1. advertise -------------------------------------------------------------------------------
    def advertise(self, request: AdvertiseRequest) -> Advertisement:
        params = SessionParams.from_request(request)
        if self.params is not None:
            if params != self.params:
                raise ProtocolViolation("this department already joined another session; start a new one")
            return self._advertisement
        self._check_params(params)
        self.params = params
        self._private, self._public = keys.new_key_pair()
        signature = self._signer.sign(params.advertisement_payload(self.name, self._public))
        self._advertisement = Advertisement(params.run_key, params.session_id, self.name, self._public, signature)
        return self._advertisement

    def _check_params(self, params: SessionParams) -> None:
        """Refuse a session this department's policy does not accept."""
        n, t, policy = len(params.participants), params.threshold, self.policy
        if params.version != VERSION:
            raise ProtocolViolation(f"protocol version {params.version} is not supported")
        if list(params.participants) != sorted(set(params.participants)):
            raise ProtocolViolation("the proposed participants must be sorted and unique")
        if self.name not in params.participants:
            raise ProtocolViolation(f"'{self.name}' is not among the proposed participants")
        if n < max(2, policy.min_participants):
            raise ProtocolViolation(f"{n} participants; this department's policy needs {policy.min_participants}")
        if not max(2, policy.min_threshold) <= t <= n:
            raise ProtocolViolation(f"threshold {t} outside [{max(2, policy.min_threshold)}, {n}] (policy and n)")
        # With c = min_threshold - 2 colluders assumed, 2t > n + c keeps two disjoint sets of t (a forked
        # view of the dropouts) from both being reconstructible: each would need more than c honest members.
        colluders = max(policy.min_threshold - 2, 0)
        if policy.majority_rule and not 2 * t > n + colluders:
            raise ProtocolViolation(f"threshold {t} with {n} participants breaks 2t > n + c (c = {colluders} "
                                    "colluders assumed by this department's policy)")
        if not masking.MIN_BITS <= params.modulus_bits <= masking.MAX_BITS:
            raise ProtocolViolation(f"modulus bits {params.modulus_bits} outside [8, 62]")
        if not 0 < params.vector_length <= policy.max_vector_length:
            raise ProtocolViolation(f"vector length {params.vector_length} outside [1, {policy.max_vector_length}]")
        if not 0 < params.window <= policy.max_window:
            raise ProtocolViolation(f"window {params.window} outside [1, {policy.max_window}]")

    # --- 2. key agreement and dealing ---------------------------------------------------------------
    def share(self, request: ShareRequest) -> Shares:
        params = self._joined()
        params.check_header(request)
        if self._shares_answer is not None:
            raise ProtocolViolation("shares for this session were already dealt; a session deals once")
        public_keys = self._verify_advertisements(params, request.advertisements)
        self._verified = tuple(sorted(public_keys))
        self._pair_keys = {peer: keys.pair_key(self._private, public_keys[peer], params.session_id,
                                               params.context, self.name, peer)
                           for peer in self._verified if peer != self.name}
        n = len(params.participants)
        dealt: dict[str, list[bytes]] = {peer: [] for peer in self._pair_keys}
        for r in params.rounds:
            seed = secrets.token_bytes(sharing.SEED_BYTES)
            shares = sharing.split(seed, params.threshold, n)
            self._own_seeds[r] = seed
            self._own_shares[r] = shares[params.share_index(self.name)]
            for peer in dealt:
                dealt[peer].append(shares[params.share_index(peer)])
        ciphertexts = {peer: keys.seal(keys.share_key(self._pair_keys[peer], params.context),
                                       encode(self.name, peer, params.first_round, params.window, dealt[peer]),
                                       self._shares_ad(self.name, peer))
                       for peer in dealt}
        self._shares_answer = Shares(params.run_key, params.session_id, self.name, ciphertexts)
        return self._shares_answer

    def _verify_advertisements(self, params: SessionParams, advertisements) -> dict[str, bytes]:
        public_keys: dict[str, bytes] = {}
        for adv in advertisements:
            try:
                params.check_header(adv)
            except ProtocolViolation as err:
                raise ProtocolViolation(f"advertisement of '{adv.name}': {err}") from None
            if adv.name not in self._roster:
                raise ProtocolViolation(f"'{adv.name}' is not in this department's roster (a Sybil?)")
            if adv.name not in params.participants:
                raise ProtocolViolation(f"'{adv.name}' advertised but is not a proposed participant")
            if adv.name in public_keys:
                raise ProtocolViolation(f"two advertisements for '{adv.name}'")
            if not verify(self._roster[adv.name], params.advertisement_payload(adv.name, adv.public_key),
                          adv.signature):
                raise ProtocolViolation(f"the advertisement of '{adv.name}' is not signed by its roster key")
            if any(hmac.compare_digest(adv.public_key, other) for other in public_keys.values()):
                raise ProtocolViolation(f"the X25519 key of '{adv.name}' is also another department's")
            public_keys[adv.name] = adv.public_key
        if self.name not in public_keys or not hmac.compare_digest(public_keys[self.name], self._public):
            raise ProtocolViolation("this department's own advertisement is missing or altered")
        if len(public_keys) < params.threshold:
            raise ProtocolViolation(f"{len(public_keys)} valid advertisements, fewer than the threshold "
                                    f"{params.threshold}")
        return public_keys

    def _shares_ad(self, sender: str, recipient: str) -> bytes:
        p = self.params
        return keys.shares_associated_data(p.context, sender, recipient, p.first_round, p.window)

    # --- 3. mask ------------------------------------------------------------------------------------
    def mask(self, request: MaskRequest, x: np.ndarray) -> MaskedInput:
        """y for round r.  Asked again for the round, the same y (never a second input under one mask)."""
        params = self._dealt()
        params.check_header(request)
        r, participants = request.round, tuple(request.participants)
        done = self._rounds.get(r)
        if done is not None:
            if done.unmasking is not None:
                raise ProtocolViolation(f"round {r} was already unmasked")
            if participants != done.participants:
                raise ProtocolViolation(f"round {r} was already masked over another participant set")
            return done.answer
        if r not in params.rounds:
            raise ProtocolViolation(f"round {r} is outside this session's window {params.rounds}")
        self._check_set(participants, self._verified, "U2", "the verified departments")
        peers = [v for v in participants if v != self.name]
        if set(request.ciphertexts) != set(peers):
            missing = sorted(set(peers) - set(request.ciphertexts))
            extra = sorted(set(request.ciphertexts) - set(peers))
            raise ProtocolViolation(f"round {r}: share ciphertexts missing from {missing}, unexpected from {extra}")
        for peer in peers:
            self._receive(peer, request.ciphertexts[peer])
        x = masking.check_element(x, params.vector_length, params.modulus_bits)
        bits, length = params.modulus_bits, params.vector_length
        own = keys.self_mask_key(self._own_seeds[r], params.session_id, params.context, self.name, r)
        y = masking.add(x, masking.prg(own, length, bits), bits)
        for peer in peers:
            pair = masking.prg(keys.pair_seed(self._pair_keys[peer], r, params.context), length, bits)
            y = masking.add(y, pair, bits) if self.name < peer else masking.subtract(y, pair, bits)
        signature = self._signer.sign(params.masked_payload(r, participants))
        answer = MaskedInput(params.run_key, params.session_id, r, self.name, masking.to_bytes(y, bits), signature)
        self._rounds[r] = _Round(participants, answer)
        return answer

    def _receive(self, dealer: str, sealed: bytes) -> None:
        """Decrypt ``dealer``'s shares for me; a second copy must carry the same shares."""
        params = self.params
        plaintext = keys.open_sealed(keys.share_key(self._pair_keys[dealer], params.context), sealed,
                                     self._shares_ad(dealer, self.name), dealer)
        try:
            sender, recipient, first, window, shares = decode(plaintext, 512 + 24 * params.window)
        except (MalformedMessage, ValueError):
            raise ProtocolViolation(f"the shares from '{dealer}' do not parse") from None
        if ((sender, recipient, first, window) != (dealer, self.name, params.first_round, params.window)
                or len(shares) != params.window or any(not isinstance(s, bytes) or len(s) != 16 for s in shares)):
            raise ProtocolViolation(f"the shares from '{dealer}' are not for this pair and window")
        received = dict(zip(params.rounds, shares))
        known = self._received.get(dealer)
        if known is not None and not all(hmac.compare_digest(known[r], received[r]) for r in params.rounds):
            raise ProtocolViolation(f"'{dealer}' dealt two different sets of shares")
        self._received[dealer] = received

    # --- 4. consistency and unmask ------------------------------------------------------------------
    def sign_responders(self, request: ConsistencyRequest) -> ConsistencySignature:
        """Sign U3 for round r: this department then unmasks r for this U3 only."""
        state = self._masked(request)
        responders = tuple(request.responders)
        self._check_set(responders, state.participants, "U3", "the round's U2")
        if state.unmasking is not None:
            raise ProtocolViolation(f"round {request.round} was already unmasked")
        if state.committed is not None and state.committed != responders:
            raise ProtocolViolation(f"round {request.round}: already committed to another U3 {state.committed}")
        if state.signature is None:
            params = self.params
            signature = self._signer.sign(params.responders_payload(request.round, responders))
            state.committed = responders
            state.signature = ConsistencySignature(params.run_key, params.session_id, request.round, self.name,
                                                   signature)
        return state.signature

    def unmask(self, request: UnmaskRequest) -> Unmasking:
        """For v in U3 my share of b_v,r; for d in U2 minus U3 my seed with d.  Once per round."""
        state = self._masked(request)
        r, responders, params = request.round, tuple(request.responders), self.params
        if state.unmasking is not None:
            if responders != state.committed:
                raise ProtocolViolation(f"round {r} was already unmasked for U3 = {state.committed}; "
                                        "one answer per round")
            return state.unmasking
        self._check_set(responders, state.participants, "U3", "the round's U2")
        # A share of b_v is revealed only if v masked over this same U2 (so y_v carries a pair mask with
        # this department): a coordinator showing departments different U2s gains nothing from it.
        masked_over = params.masked_payload(r, state.participants)
        for member in responders:
            signature = request.mask_signatures.get(member)
            if member != self.name and (signature is None or not verify(self._roster[member], masked_over,
                                                                       signature)):
                raise ProtocolViolation(f"round {r}: no valid signature of '{member}' on having masked over "
                                        f"this department's U2 {list(state.participants)}")
        if state.committed is not None and state.committed != responders:
            raise ProtocolViolation(f"round {r}: this department signed U3 = {list(state.committed)} for the "
                                    "round and unmasks for that set only")
        dropped = [d for d in state.participants if d not in responders]
        if dropped:
            # Seeds are revealed only for a U3 that every member signed, this department included: no two
            # honest members of a U3 can then disagree about who dropped.
            if state.committed is None:
                raise ProtocolViolation(f"round {r}: U3 differs from U2 but this department signed nothing "
                                        "for the round")
            payload = params.responders_payload(r, responders)
            for member in responders:
                signature = request.signatures.get(member)
                if member != self.name and (signature is None or not verify(self._roster[member], payload,
                                                                           signature)):
                    raise ProtocolViolation(f"round {r}: no valid signature of '{member}' on U3; every member "
                                            "of U3 must sign it when a department is declared dropped")
        state.committed = responders
        shares = {v: (self._own_shares[r] if v == self.name else self._received[v][r]) for v in responders}
        seeds = {d: keys.pair_seed(self._pair_keys[d], r, params.context) for d in dropped}
        state.unmasking = Unmasking(params.run_key, params.session_id, r, self.name, shares, seeds)
        state.answer = None   # mask() refuses an unmasked round, so y is dead weight in the saved state
        return state.unmasking

    # --- state between messages (Flower's context.state) ----------------------------------------------
    def to_state(self) -> bytes:
        """Everything this session holds, as canonical bytes for :meth:`from_state`; they hold its secrets."""
        rounds = {r: state_form.RoundState(s.participants, s.answer, s.committed, s.signature, s.unmasking)
                  for r, s in self._rounds.items()}
        state = state_form.DepartmentState(
            self.name, self.params, state_form.private_bytes(self._private), self._advertisement, self._verified,
            self._pair_keys, self._own_seeds, self._own_shares, self._received, self._shares_answer, rounds)
        return state_form.dump(state, self._roster)

    @classmethod
    def from_state(cls, data: bytes, signer: Signer, roster: Mapping[str, ec.EllipticCurvePublicKey],
                   policy: DepartmentPolicy = DepartmentPolicy()) -> "DepartmentSession":
        """The session :meth:`to_state` wrote, for the department whose identity ``signer`` holds.

        A state of another department or roster, or one that does not parse, is ``MalformedMessage``;
        a session the ``policy`` does not accept is ``ProtocolViolation``.
        """
        name = state_form.roster_name(signer.public_key, roster)
        state = state_form.load(data, name, roster)
        session = cls(name, signer, roster, policy)
        if state.params is not None:
            session._check_params(state.params)
        session.params = state.params
        session._private = state.private()
        session._public = session._private and keys.public_bytes(session._private)
        session._advertisement, session._verified = state.advertisement, state.verified
        session._pair_keys, session._own_seeds, session._own_shares = state.pair_keys, state.own_seeds, state.own_shares
        session._received, session._shares_answer = state.received, state.shares_answer
        session._rounds = {r: _Round(s.participants, s.answer, s.committed, s.signature, s.unmasking)
                           for r, s in state.rounds.items()}
        return session

    # --- helpers ------------------------------------------------------------------------------------
    def _check_set(self, members: tuple[str, ...], within, what: str, within_what: str) -> None:
        if self.name not in members:
            raise ProtocolViolation(f"{what} does not contain '{self.name}'")
        if not set(members) <= set(within):
            raise ProtocolViolation(f"{what} names {sorted(set(members) - set(within))}, not in {within_what}")
        if len(members) < self.params.threshold:
            raise ProtocolViolation(f"{what} has {len(members)} departments, fewer than the threshold "
                                    f"{self.params.threshold}")

    def _masked(self, request) -> _Round:
        params = self._dealt()
        params.check_header(request)
        state = self._rounds.get(request.round)
        if state is None:
            raise ProtocolViolation(f"round {request.round} was never masked by '{self.name}'")
        return state

    def _joined(self) -> SessionParams:
        if self.params is None:
            raise ProtocolViolation("no session: the AdvertiseRequest comes first")
        return self.params

    def _dealt(self) -> SessionParams:
        params = self._joined()
        if self._shares_answer is None:
            raise ProtocolViolation("no shares dealt yet: the ShareRequest comes first")
        return params
