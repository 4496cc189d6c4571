"""Weighted FedAvg that knows departments can refuse, fail, or send bad updates.

Flower's FedAvg averages every non-error reply.  A fedsilo round has four kinds
of reply, and only one of them may reach the average:

* ``trained``  — a finite update of the right shape: averaged, weighted by
  ``num-examples``;
* ``refused``  — the department's budget guard said no: it carries its ε and
  reason but no weights;
* ``rejected`` — a malformed reply (:mod:`fedsilo.server.replies`): a missing
  or wrongly typed field, a number that is NaN, infinite or out of bounds, an
  update with NaN/inf values, values above the magnitude bound, or the wrong
  keys, dtypes or shapes: logged with the department's name and the reason, and
  left out — never an exception out of the round;
* ``failed``   — an error reply (the ClientApp raised, the node vanished);
* ``incompatible`` — the department's executor would not answer the run's app
  (not fedsilo's, altered, another protocol): it names the reason;
* ``declined`` — the run asks for something looser than the department's own
  policy (δ, budget, accountant, training without DP, its limits): it names
  the setting and both values;
* ``rolled-back`` — the department's ledger no longer holds the head the
  coordinator acknowledged, or its signed head goes behind or forks from it
  (:mod:`fedsilo.server.acknowledgements`): its update, if any, is not used.

:attr:`DepartmentFedAvg.last_report` tells the ServerApp who did what.

With ``max_update_norm`` > 0 every accepted update is bounded before anything
combines it: where ``‖w_dept − w_global‖₂`` (all layers together) exceeds the
bound, the delta is scaled down to exactly the bound and the department's
norm before scaling goes into :attr:`RoundReport.clipped`.  The bound is
applied in :meth:`DepartmentFedAvg.classify`, so it also holds under the
client-level DP wrapper (``central_dp``), which combines the classified
updates itself.  The robust rules (trimmed mean, median, Krum) are subclasses
in :mod:`fedsilo.server.robust`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsilo.shared.protocol import (
    CONFIG_KEY, STATUS_DECLINED, STATUS_INCOMPATIBLE, STATUS_REFUSED, STATUS_ROLLED_BACK, STATUS_TRAINED,
)
from fedsilo.shared.record import LedgerHead, MalformedHead, RecordError
from fedsilo.shared.train_request import TrainRequest

from .acknowledgements import HeadKeeper
from .replies import (
    MAX_REASON_LENGTH, MAX_WEIGHT_MAGNITUDE, Envelope, Layout, MalformedReply, TrainReply, read_envelope, read_head,
    read_metrics, read_update,
)


@dataclass
class RoundReport:
    """Who did what in one round; ``epsilon`` is each reporting department's whole-history ε."""

    trained: dict[str, int] = field(default_factory=dict)  # name -> num-examples
    refused: dict[str, str] = field(default_factory=dict)  # name -> reason
    rejected: dict[str, str] = field(default_factory=dict)  # name -> reason
    failed: dict[str, str] = field(default_factory=dict)  # node/name -> reason
    incompatible: dict[str, str] = field(default_factory=dict)  # name -> why it refused the app
    declined: dict[str, str] = field(default_factory=dict)  # name -> the looser asks, both values
    rolled_back: dict[str, str] = field(default_factory=dict)  # name -> how its ledger went backwards
    # Trained departments that sent again the update they had released for this
    # round before the coordinator restarted (no new ε): name -> ledger seq.
    replayed: dict[str, int] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    delta: dict[str, float] = field(default_factory=dict)
    budget: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    # Updates scaled down to max-update-norm: name -> the update's L2 norm before scaling.
    clipped: dict[str, float] = field(default_factory=dict)
    # Departments whose ledger recorded a new release this round (a trained, not replayed reply
    # whose signed head verified), used or not: name -> {ledger_seq, ledger_head, epsilon}.
    charged: dict[str, dict] = field(default_factory=dict)
    # Under secure aggregation: the round's sets, drops and bytes (a shared.summary_format.RoundSecAgg).
    secagg: object | None = None
    # Bytes of the arrays in each answering department's reply (its upload this round).
    upload_bytes: dict[str, int] = field(default_factory=dict)


def array_bytes(msg: Message) -> int:
    """Bytes of every array a message carries (its payload; the envelope's few fields not counted)."""
    return sum(len(array.data) for record in msg.content.array_records.values() for array in record.values())


class DepartmentFedAvg(FedAvg):
    """FedAvg over the departments that trained, with per-department reporting.

    Parameters are those of :class:`flwr.serverapp.strategy.FedAvg`, plus
    ``max_update_norm``: the largest L2 norm of an update's delta from the
    round's global model (0, the default, is no bound), and
    ``max_weight_magnitude``: the largest absolute value an update may hold
    (default :data:`~fedsilo.server.replies.MAX_WEIGHT_MAGNITUDE`, the
    departments' own default bound on a global model).  Federated
    (client-side) evaluation is off by default: the coordinator evaluates the
    global model on its own held-out test set.

    The average is weighted by the ``num-examples`` each department reports
    about itself: a department that lies about its size moves the average
    further (with the bound, at most ``max_update_norm`` per round, but in the
    direction it chooses).  The rules of :mod:`fedsilo.server.robust` do not
    weight the model by it.
    """

    def __init__(self, *, max_update_norm: float = 0.0, max_weight_magnitude: float = MAX_WEIGHT_MAGNITUDE,
                 **kwargs) -> None:
        if not (isinstance(max_update_norm, (int, float)) and math.isfinite(max_update_norm) and max_update_norm >= 0):
            raise ValueError(f"max-update-norm must be a finite number >= 0 (0 = no bound), got {max_update_norm!r}")
        if isinstance(max_weight_magnitude, bool) or not (
                isinstance(max_weight_magnitude, (int, float)) and 0 < max_weight_magnitude <= 1e30):
            raise ValueError(f"max-weight-magnitude must be a number in (0, 1e30], got {max_weight_magnitude!r}")
        kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**kwargs)
        self.max_update_norm = float(max_update_norm)
        self.max_weight_magnitude = float(max_weight_magnitude)
        self.last_report = RoundReport()
        # The usable updates of the last classified round, as read (canonical arrays, verified heads).
        self.accepted: list[TrainReply] = []
        self._layout = Layout({})
        # A copy of the round's global model (only kept when updates are bounded).
        self._global: dict[str, np.ndarray] = {}
        # node id -> registered department name, to name departments that fail
        self.node_names: dict[int, str] = {}
        self._asked: list[int] = []
        # The acknowledged ledger heads (set by the ServerApp): sent with each task, checked on each reply.
        self.heads: HeadKeeper | None = None

    def _construct_messages(self, record, node_ids, message_type):
        """One message per node, each with its own config: the head acknowledged for that node."""
        messages = list(super()._construct_messages(record, node_ids, message_type))
        if self.heads is None:
            return messages
        shared = dict(record[CONFIG_KEY]) if CONFIG_KEY in record else {}
        request = TrainRequest.from_config(shared)  # the run key and round, the same for every node
        for message in messages:
            expected = self.heads.expectation(message.metadata.dst_node_id)
            config = ConfigRecord({**shared, **request.acknowledging(expected).to_config()})
            own = RecordDict({key: value for key, value in record.items() if key != CONFIG_KEY})
            own[CONFIG_KEY] = config
            message.content = own
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Remember the global model's layout to validate what comes back, and who
        # was asked, to name those who never answer.
        self._layout = Layout.of(arrays)
        if self.max_update_norm > 0:
            self._global = {k: np.array(v.numpy(), dtype=np.float64) for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._asked = [m.metadata.dst_node_id for m in messages]
        return messages

    @property
    def asked(self) -> list[int]:
        """Node ids sent a train message this round (a wrapper that subsamples sets it)."""
        return list(self._asked)

    @asked.setter
    def asked(self, node_ids: Iterable[int]) -> None:
        self._asked = list(node_ids)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.classify(server_round, replies)
        if not accepted:
            return None, None
        return self.combine(server_round, accepted)

    def combine(self, server_round: int, accepted: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The rule over the accepted updates: the next strategy in the MRO (FedAvg, or a robust rule's)."""
        return super().aggregate_train(server_round, accepted)

    def classify(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Sort the replies into :attr:`last_report`; return the usable updates.

        Every reply is read by :mod:`fedsilo.server.replies`; anything malformed
        is ``rejected`` with the reason, never raised.  Each returned message
        holds the canonical content of its :class:`TrainReply` (also in
        :attr:`accepted`); with ``max_update_norm`` set, its update is already
        bounded.  :attr:`last_report` is filled as replies are read, so even an
        error that escapes (the coordinator's record cannot be written) leaves
        what was known.
        """
        report = self.last_report = RoundReport()
        self.accepted = []
        accepted: list[Message] = []
        replies = list(replies)
        answered = {msg.metadata.src_node_id for msg in replies}
        for node in self._asked:
            if node not in answered:
                report.failed[self.node_names.get(node, f"node-{node}")] = "no reply before the round deadline"
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                report.failed[self.node_names.get(node, f"node-{node}")] = str(msg.error.reason)[:MAX_REASON_LENGTH]
                continue
            name = self.node_names.get(node, f"node-{node}")
            try:
                upload = array_bytes(msg)
                envelope = read_envelope(msg)
                # In a deployment the name it was registered under, not the one it reports.
                name = self.node_names.get(node, envelope.name)
                update = self._read(server_round, msg, envelope, name, report)
            except (RecordError, OSError):
                raise  # the coordinator's own record, not the reply: the round cannot go on
            except (MalformedReply, MalformedHead) as err:
                update, problem = None, str(err)
                name = self.node_names.get(node, getattr(err, "name", "") or name)
            except Exception as err:  # noqa: BLE001 - a reply must never stop the round
                update, problem = None, f"the coordinator could not read its reply ({type(err).__name__})"
                log(WARNING, "round %s: reading the reply of %s raised", server_round, name, exc_info=True)
            else:
                problem = ""
            if problem:
                log(WARNING, "round %s: reply from %s rejected: %s", server_round, name, problem)
                report.rejected[name] = problem
            if update is not None:
                report.upload_bytes[name] = upload
                msg.content = update.content()  # what the rule sees: checked values, the same keys from all
                self.accepted.append(update)
                accepted.append(msg)
        return accepted

    def _read(self, server_round: int, msg: Message, envelope: Envelope, name: str,
              report: RoundReport) -> TrainReply | None:
        """One reply into ``report``: the usable update, or None; :class:`MalformedReply` to reject it."""
        node = msg.metadata.src_node_id
        status, reason = envelope.status, envelope.reason
        if status == STATUS_INCOMPATIBLE:
            report.incompatible[name] = reason
            return None
        if status == STATUS_ROLLED_BACK:  # the department found it itself: its reason is the precise one
            report.rolled_back[name] = reason
            return None
        try:
            metrics, unreadable = read_metrics(msg, status), None
        except MalformedReply as err:
            metrics, unreadable = None, err
        head = None
        if self.heads is not None:
            # The head even when the metrics are unusable: it says whether the department was charged.
            head = read_head(msg) if unreadable is None else _head_or_none(msg)
            if head is None:
                raise unreadable
            replayed = metrics.replayed if metrics is not None else 0
            fresh = status == STATUS_TRAINED and not replayed
            head, problem = self.heads.check(node, head, trained=fresh)
            if not problem and replayed and not 0 < replayed <= head.seq:
                problem = f"it replayed an update charged by ledger entry {replayed}, which its head of {head.seq} entries does not hold"
            if problem:
                if unreadable is not None:
                    raise unreadable
                log(WARNING, "round %s: %s refused: %s", server_round, name, problem)
                report.rolled_back[name] = problem
                return None
            self.heads.acknowledge(head, name)
            if fresh:
                report.charged[name] = {"ledger_seq": head.seq, "ledger_head": head.head,
                                        "epsilon": head.epsilon if head.epsilon >= 0 else None}
        if unreadable is not None:
            raise unreadable
        if self.heads is None and status == STATUS_TRAINED and not metrics.replayed:  # no record kept: its word
            finite = metrics.epsilon is not None and math.isfinite(metrics.epsilon)
            report.charged[name] = {"ledger_seq": None, "ledger_head": None,
                                    "epsilon": metrics.epsilon if finite else None}
        if metrics.epsilon is not None:
            report.epsilon[name] = metrics.epsilon
        if metrics.budget is not None:
            report.budget[name] = metrics.budget
        if metrics.delta is not None:
            report.delta[name] = metrics.delta
        if status == STATUS_REFUSED:
            report.refused[name] = reason
            return None
        if status == STATUS_DECLINED:
            report.declined[name] = reason
            return None
        arrays = self._read_update(msg, name)
        if self.max_update_norm > 0:
            arrays, norm = self._bound(arrays)
            if norm is not None:
                report.clipped[name] = norm
                log(WARNING, "round %s: update from %s has norm %.4g > max-update-norm %g: scaled down to it",
                    server_round, name, norm, self.max_update_norm)
        report.trained[name] = metrics.num_examples
        report.steps[name] = metrics.steps
        if metrics.replayed:
            report.replayed[name] = metrics.replayed
        return TrainReply(node, name, envelope, metrics, head, arrays)

    def _read_update(self, msg: Message, name: str) -> dict[str, np.ndarray]:
        """A trained reply's update, checked against the round's layout (secure aggregation reads a masked one)."""
        return read_update(msg, self._layout, self.max_weight_magnitude)

    def _bound(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float | None]:
        """Scale ``arrays`` so that ‖update − global‖₂ ≤ max_update_norm.

        Returns the arrays (scaled or as they were) and the norm before scaling
        when it was scaled, else ``None``.  The norm is over all layers
        together, computed in float64; the scaled layers keep their dtype.
        """
        if not self._global:
            raise RuntimeError("max-update-norm needs the round's global model: call configure_train first")
        deltas = {k: v.astype(np.float64) - self._global[k] for k, v in arrays.items()}
        norm = math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values()))
        if norm <= self.max_update_norm:
            return arrays, None
        scale = self.max_update_norm / norm
        scaled = {k: np.ascontiguousarray((self._global[k] + scale * d).astype(arrays[k].dtype)) for k, d in deltas.items()}
        return scaled, norm


def _head_or_none(msg: Message) -> LedgerHead | None:
    try:
        return read_head(msg)
    except MalformedReply:
        return None
