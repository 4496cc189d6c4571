"""FedAvg under secure aggregation: the coordinator averages a sum it cannot take apart.

:class:`SecureFedAvg` is :class:`~fedsilo.server.strategy.DepartmentFedAvg` with
one change: a trained reply carries a MaskedInput (``"secagg"``) instead of its
arrays.  Heads are checked and acknowledged, and refusals, declines and roll-backs
reported, exactly as without it; the masked input of a reply that passes is handed
to the session (:mod:`fedsilo.server.secure_aggregation`), and the round's new
global model is global + the decoded weighted mean Δ, cast to each array's dtype.
Only the departments of the session are asked to train.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsilo.secagg import records
from fedsilo.secagg import SecAggAborted
from fedsilo.shared.protocol import ARRAYS_KEY

from .replies import MalformedReply
from .secure_aggregation import SecureAggregation
from .strategy import DepartmentFedAvg


class SecureFedAvg(DepartmentFedAvg):
    """Weighted FedAvg of masked updates; ``secure`` is the run's session (opened by the ServerApp)."""

    def __init__(self, *, secure: SecureAggregation, **kwargs) -> None:
        super().__init__(**kwargs)
        self.secure = secure
        self._grid: Grid | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._velocity: dict[str, np.ndarray] = {}  # distributed DP: the optimizer's momentum

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self._arrays = {k: v.numpy() for k, v in arrays.items()}
        self.secure.start_round()
        members = self.secure.members
        messages = [m for m in super().configure_train(server_round, arrays, config, grid)
                    if m.metadata.dst_node_id in members]
        for message in messages:  # each its own content: its MaskRequest holds the ciphertexts addressed to it
            node = message.metadata.dst_node_id
            content = RecordDict(dict(message.content.items()))
            content[records.RECORD_NAME] = self.secure.mask_record(node, server_round)
            message.content = content
        self.asked = [m.metadata.dst_node_id for m in messages]
        return messages

    def _read_update(self, msg: Message, name: str) -> dict[str, np.ndarray]:
        if ARRAYS_KEY in msg.content or msg.content.array_records:
            raise MalformedReply("it sent a plain update under secure aggregation; it is never used")
        record = msg.content.config_records.get(records.RECORD_NAME)
        if record is None:
            raise MalformedReply(f"a trained reply under secure aggregation holds a '{records.RECORD_NAME}' record")
        try:
            self.secure.receive_masked(msg.metadata.src_node_id, name, record)
        except ValueError as err:
            raise MalformedReply(str(err)) from None
        return {}

    def combine(self, server_round: int, accepted: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the round's sum and step the global model by its weighted mean Δ."""
        try:
            mean, total_weight, facts = self.secure.finish_round(self._grid, server_round)
        except SecAggAborted:
            self.last_report.secagg = self.secure.last_facts
            raise
        self.last_report.secagg = facts
        step = self._sgd_step(mean) if self.secure.distributed else mean
        new = {}
        for key, value in self._arrays.items():
            stepped = value.astype(np.float64) + step[key]
            new[key] = Array(np.ascontiguousarray(stepped.astype(value.dtype)))
        return ArrayRecord(new), MetricRecord({"num-examples": total_weight})

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """A copy of the coordinator's optimizer state (distributed DP's momentum), for the checkpoint."""
        return {key: np.array(value, dtype=np.float64) for key, value in self._velocity.items()}

    def restore_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Continue a resumed run's momentum where its checkpoint left it."""
        self._velocity = {key: np.array(value, dtype=np.float64) for key, value in state.items()}

    def _sgd_step(self, gradient: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Distributed DP: the coordinator's SGD step (PyTorch's momentum convention) on the noisy gradient.

        Post-processing of the released sum; the momentum lives here, across rounds.
        """
        settings = self.secure.settings
        step = {}
        for key, g in gradient.items():
            velocity = settings.momentum * self._velocity.get(key, 0.0) + g
            self._velocity[key] = velocity
            step[key] = -settings.learning_rate * velocity
        return step
