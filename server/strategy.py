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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
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
    epsilon: dict[str, float] = field(default_factory=dict)
    delta: dict[str, float] = field(default_factory=dict)
    budget: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)


class DepartmentFedAvg(FedAvg):
    """FedAvg over the departments that trained, with per-department reporting.

    Parameters are those of :class:`flwr.serverapp.strategy.FedAvg`.  Federated
    (client-side) evaluation is off by default: the coordinator evaluates the
    global model on its own held-out test set.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**kwargs)
        self.last_report = RoundReport()
        self._reference: dict[str, tuple[int, ...]] = {}
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
        return super().aggregate_train(server_round, accepted)

    def classify(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Sort the replies into :attr:`last_report`; return the usable updates."""
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
            if self.heads is not None:
                head, problem = self.heads.check(msg, trained=status == STATUS_TRAINED)
                if problem:
                    log(WARNING, "round %s: %s refused: %s", server_round, name, problem)
                    report.rolled_back[name] = problem
                    continue
                self.heads.acknowledge(head, name)
            metrics = msg.content.metric_records.get(METRICS_KEY)
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
            accepted.append(msg)
        self.last_report = report
        return accepted

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
