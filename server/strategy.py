"""Weighted FedAvg that knows departments can refuse, fail, or send bad updates.

Flower's FedAvg averages every non-error reply.  A fedsilo round has four kinds
of reply, and only one of them may reach the average:

* ``trained``  — a finite update of the right shape: averaged, weighted by
  ``num-examples``;
* ``refused``  — the department's budget guard said no: it carries its ε and
  reason but no weights;
* ``rejected`` — an update with NaN/inf values or the wrong keys/shapes: logged
  with the department's name and left out;
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
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsilo.shared.protocol import (
    CONFIG_KEY, METRICS_KEY, STATUS_DECLINED, STATUS_INCOMPATIBLE, STATUS_KEY, STATUS_REFUSED,
    STATUS_ROLLED_BACK, STATUS_TRAINED,
)
from fedsilo.shared.record import ACK_HEAD_KEY, ACK_SEQ_KEY

from .acknowledgements import HeadKeeper


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


class DepartmentFedAvg(FedAvg):
    """FedAvg over the departments that trained, with per-department reporting.

    Parameters are those of :class:`flwr.serverapp.strategy.FedAvg`, plus
    ``max_update_norm``: the largest L2 norm of an update's delta from the
    round's global model (0, the default, is no bound).  Federated
    (client-side) evaluation is off by default: the coordinator evaluates the
    global model on its own held-out test set.

    The average is weighted by the ``num-examples`` each department reports
    about itself: a department that lies about its size moves the average
    further (with the bound, at most ``max_update_norm`` per round, but in the
    direction it chooses).  The rules of :mod:`fedsilo.server.robust` do not
    weight the model by it.
    """

    def __init__(self, *, max_update_norm: float = 0.0, **kwargs) -> None:
        if not (isinstance(max_update_norm, (int, float)) and math.isfinite(max_update_norm) and max_update_norm >= 0):
            raise ValueError(f"max-update-norm must be a finite number >= 0 (0 = no bound), got {max_update_norm!r}")
        kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**kwargs)
        self.max_update_norm = float(max_update_norm)
        self.last_report = RoundReport()
        self._reference: dict[str, tuple[int, ...]] = {}
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
        for message in messages:
            expected = self.heads.expectation(message.metadata.dst_node_id)
            config = ConfigRecord(dict(record[CONFIG_KEY])) if CONFIG_KEY in record else ConfigRecord()
            if expected is not None:
                config[ACK_SEQ_KEY], config[ACK_HEAD_KEY] = expected
            own = RecordDict({key: value for key, value in record.items() if key != CONFIG_KEY})
            own[CONFIG_KEY] = config
            message.content = own
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Remember the global model's layout to validate what comes back, and who
        # was asked, to name those who never answer.
        self._reference = {k: tuple(v.shape) for k, v in arrays.items()}
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

        With ``max_update_norm`` set, each returned update is already bounded
        (its message's ArrayRecord replaced by the scaled one).
        """
        report = RoundReport()
        accepted: list[Message] = []
        replies = list(replies)
        answered = {msg.metadata.src_node_id for msg in replies}
        for node in self._asked:
            if node not in answered:
                report.failed[self.node_names.get(node, f"node-{node}")] = "no reply before the round deadline"
        for msg in replies:
            if msg.has_error():
                node = msg.metadata.src_node_id
                report.failed[self.node_names.get(node, f"node-{node}")] = msg.error.reason
                continue
            name, status, reason = _status(msg)
            # In a deployment the name it was registered under, not the one it reports.
            name = self.node_names.get(msg.metadata.src_node_id, name)
            if status == STATUS_INCOMPATIBLE:
                report.incompatible[name] = reason
                continue
            if status == STATUS_ROLLED_BACK:  # the department found it itself: its reason is the precise one
                report.rolled_back[name] = reason
                continue
            metrics = msg.content.metric_records.get(METRICS_KEY)
            # An update released before the coordinator restarted: charged once, by an earlier entry.
            replayed = int(metrics.get("replayed-seq", 0)) if metrics is not None and status == STATUS_TRAINED else 0
            if self.heads is not None:
                head, problem = self.heads.check(msg, trained=status == STATUS_TRAINED and not replayed)
                if not problem and replayed and not 0 < replayed <= head.seq:
                    problem = f"it replayed an update charged by ledger entry {replayed}, which its head of {head.seq} entries does not hold"
                if problem:
                    log(WARNING, "round %s: %s refused: %s", server_round, name, problem)
                    report.rolled_back[name] = problem
                    continue
                self.heads.acknowledge(head, name)
            if metrics is not None and "epsilon" in metrics:
                report.epsilon[name] = float(metrics["epsilon"])
            if metrics is not None and "max-epsilon" in metrics:
                report.budget[name] = float(metrics["max-epsilon"])
            if metrics is not None and "delta" in metrics:
                report.delta[name] = float(metrics["delta"])
            if status == STATUS_REFUSED:
                report.refused[name] = reason
                continue
            if status == STATUS_DECLINED:
                report.declined[name] = reason
                continue
            problem = self._validate(msg)
            if problem:
                log(WARNING, "round %s: update from %s rejected: %s", server_round, name, problem)
                report.rejected[name] = problem
                continue
            report.trained[name] = int(metrics["num-examples"])
            report.steps[name] = int(metrics["steps"])
            if replayed:
                report.replayed[name] = replayed
            if self.max_update_norm > 0:
                norm = self._bound(msg)
                if norm is not None:
                    report.clipped[name] = norm
                    log(WARNING, "round %s: update from %s has norm %.4g > max-update-norm %g: scaled down to it",
                        server_round, name, norm, self.max_update_norm)
            accepted.append(msg)
        self.last_report = report
        return accepted

    def _bound(self, msg: Message) -> float | None:
        """Scale ``msg``'s update so that ‖update − global‖₂ ≤ max_update_norm.

        Returns the norm before scaling when it was scaled, else ``None``.  The
        norm is over all layers together, computed in float64; the scaled layers
        keep their dtype.
        """
        if not self._global:
            raise RuntimeError("max-update-norm needs the round's global model: call configure_train first")
        ((key, update),) = msg.content.array_records.items()
        deltas = {k: update[k].numpy().astype(np.float64) - self._global[k] for k in update.keys()}
        norm = math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values()))
        if norm <= self.max_update_norm:
            return None
        scale = self.max_update_norm / norm
        dtypes = {k: update[k].numpy().dtype for k in update.keys()}
        msg.content[key] = ArrayRecord(
            {k: Array(np.ascontiguousarray((self._global[k] + scale * d).astype(dtypes[k]))) for k, d in deltas.items()}
        )
        return norm

    def _validate(self, msg: Message) -> str:
        """Empty string when the update is usable, else what is wrong with it."""
        records = msg.content.array_records
        metrics = msg.content.metric_records.get(METRICS_KEY)
        if len(records) != 1 or metrics is None:
            return "expected one ArrayRecord and a 'metrics' MetricRecord"
        if not int(metrics.get("num-examples", 0)) > 0:
            return "num-examples must be positive"
        arrays = next(iter(records.values()))
        if set(arrays.keys()) != set(self._reference):
            return f"layers {sorted(arrays.keys())} differ from the global model's"
        for key, array in arrays.items():
            values = array.numpy()
            if tuple(values.shape) != self._reference[key]:
                return f"layer '{key}' has shape {values.shape}, expected {self._reference[key]}"
            if not np.all(np.isfinite(values)):
                return f"layer '{key}' holds NaN or infinite values"
        return ""


def _status(msg: Message) -> tuple[str, str, str]:
    record = msg.content.config_records.get(STATUS_KEY)
    if record is None:
        return f"node-{msg.metadata.src_node_id}", STATUS_TRAINED, ""
    return str(record["name"]), str(record.get("status", STATUS_TRAINED)), str(record.get("reason", ""))
