"""The coordinator's secure-aggregation session over a Flower Grid (``--secure-aggregation``).

One :class:`secagg.CoordinatorSession` per ServerApp run (a resume opens a new
one): :meth:`SecureAggregation.open` names the participants (their registered
names in a deployment, ``query.secagg_hello`` in a simulation), then relays the
advertise and share steps.  Each round's MaskRequest rides on the train message
and the MaskedInput on its reply (:mod:`fedsilo.server.secure_fedavg`);
:meth:`SecureAggregation.finish_round` runs the consistency step (when some of
U2 dropped) and the unmask step, and decodes the sum into the weighted mean Δ.

Every answer passes the session's checks, with the registered public keys as the
roster when known; a bad one names the department and leaves it out (it counts
as dropped).  Too few left: :class:`~fedsilo.secagg.SecAggAborted`, nothing
released.  The wire contract is docs/explanation/secure-aggregation.md.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from logging import WARNING
from typing import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log

from fedsilo.secagg import CoordinatorSession, FixedPointCodec, MalformedMessage, ProtocolViolation, SecAggAborted
from fedsilo.secagg import records
from fedsilo.secagg.messages import Advertisement, ConsistencySignature, MaskedInput, Shares, Unmasking
from fedsilo.shared.distributed_dp import DistributedDpPlan, rotation_seed
from fedsilo.shared.protocol import MAX_REASON_LENGTH, STATUS_DECLINED, STATUS_KEY, STATUS_OK
from fedsilo.shared.summary_format import RoundSecAgg, SecAggSetup

from .grid_exchange import exchange

MIN_DEPARTMENTS = 3  # with two, each learns the other's update from the sum


def default_threshold(n: int, noised: bool = False) -> int:
    """t when ``secagg-threshold`` is 0: a majority, at least 3, at most n.

    ``noised`` (distributed DP, record or client level): n − ⌈n/10⌉, at least 3.  Each
    department adds μ/(t − c) so that any t − c honest shares carry the run's noise; when all
    n answer, the sum carries n/(t − c) × μ.  A majority threshold would add up to twice the
    variance the run needs (10/6 at n = 10); tolerating a tenth of the departments dropping
    adds at most 10/9.
    """
    if noised:
        return min(n, max(3, n - math.ceil(n / 10)))
    return min(n, max(3, (n + 1) // 2 + 1))


def check_settings(settings) -> None:
    """Refuse, naming the setting, what secure aggregation cannot do (before anything starts)."""
    if not settings.secure_aggregation:
        return
    if settings.aggregation != "fedavg":
        raise ValueError(
            f"--aggregation {settings.aggregation} cannot be combined with --secure-aggregation: a robust rule needs "
            "the individual updates, which secure aggregation hides from the coordinator (no in-protocol norm check "
            "is built). Use --aggregation fedavg, or drop --secure-aggregation")
    if settings.central_dp and settings.distributed_dp:
        raise ValueError(
            "--central-dp cannot be combined with --distributed-dp: distributed DP is at one level per run, client "
            "(--central-dp: each department clips and noises its whole update) or record (--distributed-dp). Drop one")
    if settings.max_update_norm > 0:
        raise ValueError(
            f"--max-update-norm {settings.max_update_norm:g} cannot be combined with --secure-aggregation: the "
            "coordinator never sees an update, so it cannot measure its norm; each department clips every coordinate "
            "to ±--secagg-bound instead. Set --max-update-norm 0")
    if settings.fraction_train < 1.0:
        raise ValueError(
            f"--fraction-train {settings.fraction_train:g} cannot be combined with --secure-aggregation: each round "
            "asks every department of the session (an unsampled one would count as dropped). Set --fraction-train 1")
    if settings.distributed_dp:
        check_distributed(settings)
    if settings.secagg_threshold and settings.secagg_threshold < MIN_DEPARTMENTS:
        raise ValueError(f"--secagg-threshold {settings.secagg_threshold} is below {MIN_DEPARTMENTS}: set 0 (the "
                         f"default) or {MIN_DEPARTMENTS} or more")


def check_distributed(settings) -> None:
    """Refuse, naming the setting, what distributed DP's analysis does not cover."""
    if not settings.dp:
        raise ValueError("--distributed-dp is DP-SGD with the noise added by the departments: drop --no-dp")
    if settings.local_epochs != 1:
        raise ValueError(
            f"--local-epochs {settings.local_epochs} cannot be combined with --distributed-dp: a round is one DP-SGD "
            "step over the federation, and the analysis covers exactly that step (several local steps would each "
            "need their own noise, in the clear at the department). Leave --local-epochs at 1; more rounds train more")
    if settings.noise_multiplier <= 0:
        raise ValueError("--distributed-dp needs the run's σ: give --noise-multiplier or --target-epsilon (the "
                         "commands plan σ from it)")
    if not 0 < settings.sample_rate <= 1:
        raise ValueError("--distributed-dp needs each record's sampling rate: give --sample-rate (a simulation plans "
                         "it from --batch-size)")


def planned_distributed(settings, model, target_epsilon: float, delta: float, pooled_records: int = 0,
                        rounds_given: bool = True):
    """``settings`` with distributed DP's q and σ planned for ``model`` (a torch module) and checked, and the
    model's layout; ``(settings, None)`` without ``distributed-dp``.  Without ``rounds_given`` the rounds
    are planned too (:func:`~fedsilo.shared.distributed_dp.default_rounds`).

    Raises ``ValueError`` naming the option to give or drop.
    """
    from fedsilo.shared.distributed_dp import plan_distributed

    if not settings.distributed_dp:
        return settings, None
    layout = FixedPointCodec.layout_of({k: v.detach().numpy() for k, v in model.state_dict().items()})
    settings = plan_distributed(settings, layout, target_epsilon, delta, pooled_records, rounds_given)
    check_distributed(settings)
    return settings, layout


def check_departments(count: int, option: str = "--departments") -> None:
    """Refuse fewer than three departments: with two, each learns the other's update from the sum."""
    if count < MIN_DEPARTMENTS:
        raise ValueError(f"--secure-aggregation needs at least {MIN_DEPARTMENTS} departments (with two, each "
                         f"learns the other's update from the sum): set {option} {MIN_DEPARTMENTS} or more")


def check_model(arrays: ArrayRecord) -> None:
    """Refuse a model holding non-float arrays: only floating-point updates are encoded."""
    others = sorted(k for k, v in arrays.items() if not np.issubdtype(np.dtype(v.numpy().dtype), np.floating))
    if others:
        raise ValueError(f"--secure-aggregation encodes floating-point updates only; the model holds non-float "
                         f"arrays {others[:5]} (e.g. a batch-norm counter): use a model without them, or drop "
                         "--secure-aggregation")


class _Refused(Exception):
    """A department's answer that cannot be used; the text says why (fedsilo's words)."""


class SecureAggregation:
    """The run's session: who is in it, what it cost, and each round's masked sum."""

    def __init__(self, settings, run_key: str, arrays: ArrayRecord) -> None:
        check_settings(settings)
        check_model(arrays)
        self.settings, self.run_key = settings, run_key
        self.layout = FixedPointCodec.layout_of({k: v.numpy() for k, v in arrays.items()})
        self.session: CoordinatorSession | None = None
        self.codec: FixedPointCodec | None = None
        self.name_of: dict[int, str] = {}  # node id -> participant name
        self.setup: SecAggSetup | None = None
        self._bytes_sent: dict[str, int] = defaultdict(int)
        self._bytes_received: dict[str, int] = defaultdict(int)
        self._left_out: dict[str, str] = {}
        self._u2: tuple[str, ...] = ()
        self.last_facts: RoundSecAgg | None = None  # the last round's, even when it aborted

    # --- the session's setup --------------------------------------------------------------------------------
    def open(self, grid, node_names: Mapping[int, str], first_round: int, rounds_left: int,
             roster_by_node: Mapping | None = None) -> SecAggSetup:
        """Name the participants, advertise and deal; raises ``SecAggAborted`` below the threshold."""
        started, timeout = time.monotonic(), self.settings.round_timeout
        self._reset()
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if node_names:  # a deployment: the name each node was registered under, never its claim
            self.name_of = {n: node_names[n] for n in nodes if n in node_names}
        else:
            self.name_of = self._hello(grid, nodes, timeout)
        names = sorted(self.name_of.values())
        if len(names) < MIN_DEPARTMENTS:
            raise SecAggAborted(f"only {len(names)} department(s) can join the secure-aggregation session "
                                f"({self._said()}); it needs at least {MIN_DEPARTMENTS}")
        n = len(names)
        threshold = self.settings.secagg_threshold or default_threshold(n, self.distributed or self.client_level)
        if threshold > n:
            raise SecAggAborted(f"--secagg-threshold {threshold} is above the {n} departments of the session")
        self.codec = self._codec(n, threshold)
        roster = None
        if roster_by_node:
            roster = {self.name_of[node]: key for node, key in roster_by_node.items() if node in self.name_of}
            unknown = sorted(set(names) - set(roster))
            if unknown:  # a participant whose answers could not be checked: leave it out
                raise SecAggAborted(f"no registered public key for {unknown}: register every department")
        session = self.session = CoordinatorSession(self.run_key, threshold, names, self.codec.modulus_bits,
                                                    self.codec.vector_length, first_round, max(1, rounds_left),
                                                    roster=roster)
        request = session.advertise_request()
        for name, answer in self._query(grid, {n: request for n in self.name_of}, records.ACTION_ADVERTISE,
                                        Advertisement, timeout):
            self._take(name, session.receive_advertisement, answer)
        share_request = session.share_request()
        advertised = {node: share_request for node, name in self.name_of.items() if name in session.advertisements}
        for name, answer in self._query(grid, advertised, records.ACTION_SHARE, Shares, timeout):
            self._take(name, session.receive_shares, answer)
        p = session.params
        if len(session.shares) < p.threshold:
            raise SecAggAborted(f"{len(session.shares)} departments dealt their shares, fewer than the threshold "
                                f"{p.threshold} ({self._said()}); nothing is released")
        self.setup = SecAggSetup(
            participants=list(p.participants), threshold=p.threshold, modulus_bits=p.modulus_bits,
            vector_length=p.vector_length, first_round=p.first_round, window=p.window, dealt=sorted(session.shares),
            setup_bytes=sum(self._bytes_sent.values()) + sum(self._bytes_received.values()),
            setup_seconds=round(time.monotonic() - started, 3), left_out=dict(sorted(self._left_out.items())))
        return self.setup

    @property
    def members(self) -> set[int]:
        """Node ids of the departments that dealt their shares (only they are asked to train)."""
        dealt = set(self.session.shares) if self.session is not None else set()
        return {node for node, name in self.name_of.items() if name in dealt}

    # --- one round --------------------------------------------------------------------------------------------
    def start_round(self) -> None:
        """Forget the previous round's bytes and refusals."""
        self._reset()

    def mask_record(self, node: int, server_round: int) -> ConfigRecord:
        """The MaskRequest for ``node``'s train message (U2 is fixed by the first one of the round)."""
        name = self.name_of[node]
        request = self.session.mask_request(name, server_round)
        self._u2 = request.participants
        self._bytes_received[name] += len(request.to_bytes())
        return records.to_record(request)

    def receive_masked(self, node: int, name: str, record) -> None:
        """A trained reply's MaskedInput into the session; ``ValueError`` (saying why) to reject the reply."""
        expected = self.name_of.get(node)
        if expected is None:
            raise ValueError("it is not a member of the secure-aggregation session")
        try:
            answer = records.from_record(record, MaskedInput)
            self._bytes_sent[expected] += len(answer.to_bytes())
            if answer.name != expected:
                raise ProtocolViolation(f"its masked input is signed as '{answer.name}'")
            self.session.receive_masked(answer)
            self._masked.add(expected)
        except (MalformedMessage, ProtocolViolation, ValueError) as err:
            self._left_out[expected] = _short(err)
            raise ValueError(f"its masked input was refused: {_short(err)}") from None

    def finish_round(self, grid, server_round: int) -> tuple[dict[str, np.ndarray], int, RoundSecAgg]:
        """Consistency (if U3 != U2) and unmask: the weighted mean Δ, Σw and the round's facts.

        Raises ``SecAggAborted`` (nothing released) when too few answer; :attr:`last_facts`
        holds what was known then.
        """
        session, timeout = self.session, self.settings.round_timeout
        self.last_facts = facts = RoundSecAgg(u2=list(self._u2), u3=sorted(self._masked),
                                              dropped_before_masking=sorted(set(self._u2) - self._masked))
        facts.bytes_sent, facts.bytes_received = dict(self._bytes_sent), dict(self._bytes_received)
        facts.left_out = dict(self._left_out)
        try:
            consistency = session.consistency_request(server_round)  # fixes U3; below t: SecAggAborted
        except ValueError as err:  # nobody was asked to mask
            raise SecAggAborted(f"round {server_round}: {err}; nothing is released") from None
        u3 = list(consistency.responders) if consistency is not None else list(self._u2)
        facts.u3, facts.dropped_before_masking = u3, sorted(set(self._u2) - set(u3))
        facts.consistency = consistency is not None
        nodes = {node: name for node, name in self.name_of.items() if name in u3}
        try:
            if consistency is not None:
                for name, answer in self._query(grid, {n: consistency for n in nodes}, records.ACTION_CONSISTENCY,
                                                ConsistencySignature, timeout):
                    self._take(name, session.receive_consistency, answer)
            unmask = session.unmask_request(server_round)
            unmasked = set()
            for name, answer in self._query(grid, {n: unmask for n in nodes}, records.ACTION_UNMASK, Unmasking,
                                            timeout):
                if self._take(name, session.receive_unmasking, answer):
                    unmasked.add(name)
            facts.dropped_after_masking = sorted(set(u3) - unmasked)
            total = session.unmask(server_round)
            if self.client_level:  # Σ clipped Δ + noise over the members asked (a public count, as q·N)
                mean, total_weight = self.codec.decode(total, rotation_seed(self.run_key, server_round))
                asked = max(len(self.members), 1)
                mean = {key: value * (total_weight / asked) for key, value in mean.items()}
            elif self.distributed:
                mean, total_weight = self.codec.decode(total, rotation_seed(self.run_key, server_round))
            else:
                mean, total_weight = self.codec.decode(total)
        finally:
            facts.bytes_sent = dict(sorted(self._bytes_sent.items()))
            facts.bytes_received = dict(sorted(self._bytes_received.items()))
            facts.left_out = dict(sorted(self._left_out.items()))
        return mean, total_weight, facts

    @property
    def distributed(self) -> bool:
        """Distributed DP: the sum is one DP-SGD step's noisy gradient, not a weighted Δ."""
        return bool(self.settings.distributed_dp)

    @property
    def client_level(self) -> bool:
        """Client-level distributed DP: the sum is of clipped, noised updates, one per department."""
        return bool(self.settings.central_dp)

    def _codec(self, n: int, threshold: int):
        s = self.settings
        if not (self.distributed or self.client_level):
            return FixedPointCodec(self.layout, s.secagg_bound, s.secagg_frac_bits, s.secagg_max_weight, n)
        try:
            if self.client_level:
                return DistributedDpPlan.client_level(self.layout, s, n, threshold)
            return DistributedDpPlan.for_run(self.layout, s, n, threshold)
        except ValueError as err:
            raise SecAggAborted(str(err)) from None

    # --- the exchange ------------------------------------------------------------------------------------------
    def _hello(self, grid, nodes: list[int], timeout: float) -> dict[int, str]:
        """Simulation: node id -> the name each department gives (no registry to ask)."""
        messages = [Message(content=RecordDict({records.RECORD_NAME: records.hello_record()}), dst_node_id=node,
                            message_type=records.ACTION_HELLO) for node in nodes]
        names: dict[int, str] = {}
        duplicated: set[str] = set()
        for reply in _exchange(grid, messages, timeout):
            node = reply.metadata.src_node_id
            try:
                name, status, reason = _status(reply)
                if status != STATUS_OK:
                    raise _Refused(f"declined to join: {reason}" if status == STATUS_DECLINED else f"said {status!r:.40}")
            except _Refused as err:
                self._left_out[f"node-{node}"] = str(err)
                continue
            if name in names.values() or name in duplicated:
                self._left_out[name] = "two nodes gave this name; neither joins"
                duplicated.add(name)
                names = {n: v for n, v in names.items() if v != name}
                continue
            names[node] = name
        return names

    def _query(self, grid, requests: Mapping[int, object], action: str, cls, timeout: float):
        """Send each node its request; yield (name, answer) for each readable answer, the rest left out."""
        messages = []
        for node, request in requests.items():
            self._bytes_received[self.name_of[node]] += len(request.to_bytes())
            messages.append(Message(content=RecordDict({records.RECORD_NAME: records.to_record(request)}), dst_node_id=node,
                                    message_type=action))
        answered = set()
        for reply in _exchange(grid, messages, timeout):
            node = reply.metadata.src_node_id
            name = self.name_of.get(node)
            if name is None or node in answered:
                continue
            answered.add(node)
            try:
                answer = _answer(reply, cls)
                self._bytes_sent[name] += len(answer.to_bytes())
                if answer.name != name:
                    raise _Refused(f"its answer is made out as '{answer.name:.60}'")
            except _Refused as err:
                self._leave_out(name, str(err))
                continue
            yield name, answer
        for node in requests:
            if node not in answered:
                self._leave_out(self.name_of[node], f"no answer to {action} before the round deadline")

    def _take(self, name: str, receive, answer) -> bool:
        """``receive(answer)``; a protocol violation leaves ``name`` out instead of ending the step."""
        try:
            receive(answer)
        except ProtocolViolation as err:
            self._leave_out(name, _short(err))
            return False
        return True

    def _leave_out(self, name: str, reason: str) -> None:
        log(WARNING, "secure aggregation: %s left out: %s", name, reason)
        self._left_out[name] = reason[:MAX_REASON_LENGTH]

    def _reset(self) -> None:
        self._bytes_sent, self._bytes_received, self._left_out = defaultdict(int), defaultdict(int), {}
        self._masked: set[str] = set()

    def _said(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in sorted(self._left_out.items())) or "no department answered"


def _exchange(grid, messages: list, timeout: float) -> list:
    return exchange(grid, messages, timeout) if messages else []


def _status(reply: Message) -> tuple[str, str, str]:
    if reply.has_error():
        raise _Refused(f"its ClientApp failed: {str(reply.error.reason)[:200]}")
    record = reply.content.config_records.get(STATUS_KEY)
    if record is None or not all(isinstance(record.get(k), str) for k in ("name", "status", "reason")):
        raise _Refused(f"its answer has no well-formed '{STATUS_KEY}' record")
    return str(record["name"])[:100], str(record["status"]), str(record["reason"])[:MAX_REASON_LENGTH]


def _answer(reply: Message, cls):
    """The ``cls`` answer in ``reply``, or ``_Refused`` saying why not."""
    _, status, reason = _status(reply)
    if status == STATUS_DECLINED:
        raise _Refused(f"declined: {reason}")
    if status != STATUS_OK:
        raise _Refused(f"its status is {status!r:.40}, not '{STATUS_OK}'")
    record = reply.content.config_records.get(records.RECORD_NAME)
    if record is None:
        raise _Refused(f"its answer has no '{records.RECORD_NAME}' record")
    try:
        return records.from_record(record, cls)
    except (MalformedMessage, ValueError) as err:
        raise _Refused(_short(err)) from None


def _short(err: BaseException) -> str:
    return str(err)[:MAX_REASON_LENGTH]
