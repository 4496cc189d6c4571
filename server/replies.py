"""Every department's train reply, read into typed, validated values — or a reason to reject it.

The coordinator must survive its departments: one registered department may
send anything in a reply, and nothing it sends may raise out of a round or
reach the aggregate unchecked.  This module is the one place a train reply is
read.  Each reader returns a frozen value or raises :class:`MalformedReply`
(a :class:`ValueError`) whose message is the reason recorded for the
department under ``rejected``:

* :func:`read_envelope` — the ``department`` status record: ``name`` (text,
  at most :data:`MAX_NAME_LENGTH` characters, no control characters),
  ``status`` (one of the protocol's), ``reason`` (text, shortened past
  :data:`MAX_REASON_LENGTH`);
* :func:`read_metrics` — the ``metrics`` record: ``num-examples`` a positive
  integer below :data:`MAX_NUM_EXAMPLES` (0 on a reply without an update),
  ``steps`` an integer in ``[0, MAX_STEPS]``, ``replayed-seq`` an integer in
  ``[0, 2^53]``, ``epsilon`` and ``max-epsilon`` ≥ 0 or +∞ (∞ is how a
  department trained without DP states its ε), ``delta`` in ``[0, 1]``;
  NaN is never a number here;
* :func:`read_head` — the signed ``ledger-head``: every field present, typed
  and finite (:class:`~fedsilo.shared.record.LedgerHead` refuses NaN and ∞, so
  nothing non-finite is ever signed into the coordinator's record), text
  fields of bounded length;
* :func:`read_update` — the one ArrayRecord: the global model's layers, each
  with its dtype and shape (checked on the array's header before its bytes
  are read, and again after), finite, and at most ``max_magnitude`` in
  absolute value, computed in float64 so a value cannot overflow on the way
  to the check.  There is no cast: a float64 update of a float32 model is
  rejected, so 1e300 cannot become ∞ when averaged.

A reply that passes is a :class:`TrainReply`; :meth:`TrainReply.content` is
the canonical message content Flower's rules then see (the same records and
keys from every department, so one department's extra key cannot make
Flower's consistency check skip the whole round).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsilo.shared.protocol import (
    ARRAYS_KEY, MAX_REASON_LENGTH, METRICS_KEY, STATUS_DECLINED, STATUS_INCOMPATIBLE, STATUS_KEY, STATUS_REFUSED,
    STATUS_ROLLED_BACK, STATUS_TRAINED,
)
from fedsilo.shared.record import HEAD_KEY, LedgerHead, MalformedHead

STATUSES = (STATUS_TRAINED, STATUS_REFUSED, STATUS_DECLINED, STATUS_ROLLED_BACK, STATUS_INCOMPATIBLE)
MAX_NAME_LENGTH = 128
# Far above any department's table (a trillion records), far below where a float sum loses integers.
MAX_NUM_EXAMPLES = 10**12
# Optimizer steps in one round; the departments' own default limit is far lower.
MAX_STEPS = 10**9
MAX_SEQ = 2**53
# The departments' default --max-weight-magnitude (client/limits.py): an update above it would
# make a global model the departments refuse, and it keeps every rule's arithmetic finite in
# float32 (Krum's squared distances: (2·1e4)² per weight).
MAX_WEIGHT_MAGNITUDE = 1e4
# Bounds on a signed head's text fields (the record keeps every acknowledged head).
HEAD_TEXT_LIMITS = {"identity": 256, "public_key": 4096, "head": 256, "run_id": 1024, "signature": 1024}


class MalformedReply(ValueError):
    """A reply the coordinator cannot use as sent; the message is the reason recorded for it.

    ``name`` is the name the reply gave, when it gave a usable one before the fault.
    """

    def __init__(self, reason: str, name: str = "") -> None:
        super().__init__(reason)
        self.name = name


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Envelope:
    """The ``department`` status record: who says it is answering, and how."""

    name: str  # as reported; in a deployment the registered name is used instead
    status: str
    reason: str


@dataclass(frozen=True)
class ReplyMetrics:
    """The ``metrics`` record, every number checked; ``None`` where a reply left one out."""

    num_examples: int
    steps: int
    replayed: int  # 0: trained now; else the ledger entry (from 1) that charged an update sent again
    epsilon: float | None  # whole-history ε (∞: trained without DP)
    budget: float | None
    delta: float | None


@dataclass(frozen=True)
class Layout:
    """The round's global model: layer -> (dtype, shape), in its order."""

    layers: Mapping[str, tuple[str, tuple[int, ...]]]

    @classmethod
    def of(cls, arrays: ArrayRecord) -> "Layout":
        return cls(MappingProxyType({key: (str(a.dtype), tuple(int(d) for d in a.shape)) for key, a in arrays.items()}))


@dataclass(frozen=True)
class TrainReply:
    """A usable update: the department's envelope and metrics, its verified head, its arrays."""

    node_id: int
    name: str  # the name it is reported under (the registered one in a deployment)
    envelope: Envelope
    metrics: ReplyMetrics
    head: LedgerHead | None
    arrays: Mapping[str, np.ndarray]

    def content(self) -> RecordDict:
        """The canonical content a Flower rule sees: the same records and keys from everyone."""
        return RecordDict({
            ARRAYS_KEY: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in self.arrays.items()}),
            METRICS_KEY: MetricRecord({"num-examples": self.metrics.num_examples, "steps": self.metrics.steps}),
            STATUS_KEY: ConfigRecord({"name": self.name, "status": self.envelope.status,
                                      "reason": self.envelope.reason}),
        })


# ----------------------------------------------------------------------------- readers


def read_envelope(msg: Message) -> Envelope:
    """The status record; a reply without one is a ``trained`` reply of ``node-<id>`` (as Flower's own)."""
    record = msg.content.config_records.get(STATUS_KEY)
    if record is None:
        return Envelope(f"node-{msg.metadata.src_node_id}", STATUS_TRAINED, "")
    if "name" not in record:
        raise MalformedReply("its status record has no 'name'")
    name = record["name"]
    if not isinstance(name, str) or not name.strip():
        raise MalformedReply("its status record's 'name' is not a non-empty text")
    if len(name) > MAX_NAME_LENGTH or any(unicodedata.category(c).startswith("C") for c in name):
        raise MalformedReply(f"its status record's 'name' is longer than {MAX_NAME_LENGTH} characters or holds "
                             "control characters")
    status = record.get("status", STATUS_TRAINED)
    if status not in STATUSES:
        raise MalformedReply(f"its status {_show(status)} is none of {', '.join(STATUSES)}", name)
    reason = record.get("reason", "")
    if not isinstance(reason, str):
        raise MalformedReply("its status record's 'reason' is not text", name)
    if len(reason) > MAX_REASON_LENGTH:
        reason = reason[:MAX_REASON_LENGTH] + f"… ({len(reason) - MAX_REASON_LENGTH} more characters not kept)"
    return Envelope(name, status, reason)


def read_metrics(msg: Message, status: str) -> ReplyMetrics:
    """The metrics record; required (with ``num-examples`` and ``steps``) on a ``trained`` reply."""
    metrics = msg.content.metric_records.get(METRICS_KEY)
    trained = status == STATUS_TRAINED
    if metrics is None:
        if trained:
            raise MalformedReply(f"expected a '{METRICS_KEY}' MetricRecord")
        return ReplyMetrics(0, 0, 0, None, None, None)
    if trained:
        for key in ("num-examples", "steps"):
            if key not in metrics:
                raise MalformedReply(f"its metrics have no '{key}'")
    num_examples = _integer(metrics, "num-examples", 0, MAX_NUM_EXAMPLES)
    if trained and num_examples < 1:
        raise MalformedReply(f"num-examples must be a positive integer, got {_show(metrics['num-examples'])}")
    return ReplyMetrics(
        num_examples=num_examples,
        steps=_integer(metrics, "steps", 0, MAX_STEPS),
        replayed=_integer(metrics, "replayed-seq", 0, MAX_SEQ) if trained else 0,
        epsilon=_privacy(metrics, "epsilon", math.inf),
        budget=_privacy(metrics, "max-epsilon", math.inf),
        delta=_privacy(metrics, "delta", 1.0),
    )


def read_head(msg: Message) -> LedgerHead:
    """The reply's signed ledger head, every field typed, finite and bounded (not yet verified)."""
    record = msg.content.config_records.get(HEAD_KEY)
    if record is None:
        raise MalformedReply("its reply carries no signed ledger head")
    for field, limit in HEAD_TEXT_LIMITS.items():
        value = record.get(field)
        if isinstance(value, str) and len(value) > limit:
            raise MalformedReply(f"malformed ledger head: '{field}' is longer than {limit} characters")
    try:
        return LedgerHead.from_record(record)
    except MalformedHead as err:
        raise MalformedReply(str(err)) from None


def read_update(msg: Message, layout: Layout, max_magnitude: float = MAX_WEIGHT_MAGNITUDE) -> dict[str, np.ndarray]:
    """The update's arrays, in the global model's layer order, each checked before it is used."""
    records = msg.content.array_records
    if len(records) != 1:
        raise MalformedReply(f"expected one ArrayRecord, got {len(records)}")
    arrays = next(iter(records.values()))
    if set(arrays.keys()) != set(layout.layers):
        raise MalformedReply(f"layers {_show(sorted(arrays.keys()))} differ from the global model's")
    out: dict[str, np.ndarray] = {}
    for key, (dtype, shape) in layout.layers.items():
        array = arrays[key]
        # The header first: a wrong dtype or shape is refused before its bytes are read.
        if str(array.dtype) != dtype or tuple(array.shape) != shape:
            raise MalformedReply(f"layer '{key}' has dtype {_show(array.dtype, plain=True)} and shape "
                                 f"{_show(array.shape, plain=True)}, expected dtype {dtype} and shape {shape}")
        try:
            values = array.numpy()
        except Exception as err:  # noqa: BLE001 - any bytes may arrive: not a readable .npy is a rejection
            raise MalformedReply(f"layer '{key}' is not a readable array ({type(err).__name__})") from None
        if str(values.dtype) != dtype or tuple(values.shape) != shape:
            raise MalformedReply(f"layer '{key}' holds dtype {values.dtype} and shape {values.shape} where its "
                                 f"header says dtype {dtype} and shape {shape}")
        if np.issubdtype(values.dtype, np.inexact):
            wide = values.astype(np.complex128 if np.iscomplexobj(values) else np.float64)
            if not np.all(np.isfinite(wide)):
                raise MalformedReply(f"layer '{key}' holds NaN or infinite values")
            largest = float(np.max(np.abs(wide))) if wide.size else 0.0
            if largest > max_magnitude:
                raise MalformedReply(f"layer '{key}' holds a value of magnitude {largest:.3g}, above the "
                                     f"coordinator's bound of {max_magnitude:g}")
        out[key] = values
    return out


# ----------------------------------------------------------------------------- numbers


def _integer(metrics: MetricRecord, key: str, default: int, most: int) -> int:
    """An integer metric (an integral float is accepted: JSON and Flower may carry 3 as 3.0)."""
    if key not in metrics:
        return default
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedReply(f"{key} must be an integer, got {_show(value)}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise MalformedReply(f"{key} must be an integer, got {_show(value)}")
    if not 0 <= value <= most:
        raise MalformedReply(f"{key} must be an integer in [0, {most:g}], got {_show(value)}")
    return int(value)


def _privacy(metrics: MetricRecord, key: str, most: float) -> float | None:
    """ε, a budget (+∞ allowed: no DP) or δ (at most 1); never NaN, never negative."""
    if key not in metrics:
        return None
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= most:
        raise MalformedReply(f"{key} must be a number in [0, {most:g}], got {_show(value)}")
    return float(value)


def _show(value: Any, plain: bool = False) -> str:
    """A department's value in a reason: its repr (its str, ``plain``), shortened."""
    text = str(value) if plain else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
