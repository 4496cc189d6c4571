"""What one run may ask of this department's host: its work, memory and time, bounded.

A coordinator is trusted with nothing a department's host must give up: a run
that asks for a quarter of a million steps, a 3-million-class label, a text
column hashed into 2^20 features or a 5 MB run key is declined *before* any
planning, model building or table loading, with the limit named.  The limits
are part of the department's own policy (:class:`~fedsilo.client.policy.DepartmentPolicy`,
set with ``fedsilo department start``) and apply to every run.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

RUN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")

# Seconds a task's message may take to be complete in the SuperNode.  Flower's
# own ClientApp waits up to 2 hours (500 tries per object).  But a SuperNode that
# was pulling a message when the coordinator went away, and learns on
# reconnecting that its run has ended, drops the message and leaves its task
# behind without the message's objects (flwr 1.41): they never arrive.  One
# long-lived executor waiting on that task would answer nothing else, for hours.
INPUT_WAIT = 120.0


class LimitError(ValueError):
    """A limit setting itself is out of range; the message names it."""


@dataclass(frozen=True)
class RunLimits:
    """The most one run may ask of this department.

    Parameters
    ----------
    max_steps_per_round : int
        DP-SGD steps one round may run (``local-epochs`` × batches).
    max_rounds : int
        Rounds a run may plan (``num-server-rounds``): the budget planner
        spreads σ over them, so its cost grows with them.
    max_model_parameters : int
        Parameters of the model the run asks for, counted before it is built.
    max_features : int
        Encoded input width of the run's schema (text columns count their hashed features).
    max_categories : int
        Categories of one categorical column.
    max_classes : int
        Classes of the label.
    max_run_key_length : int
        Characters of the run's key (written into every ledger entry); only
        letters, digits and ``. _ : -`` are accepted.
    max_round_seconds : float
        Wall time of one round's training; a round past it stops, is charged
        as if released, and sends nothing.
    max_weight_magnitude : float
        The largest absolute value a weight of the incoming global model may
        have; a model past it is declined before any record is touched.
    max_encoded_values : int
        The table's rows × ``max_features``: the most values a run's schema can
        make this host encode (2^31 float32 is 8 GiB).  Checked against the
        table when the department starts, never against a run, so no run can
        learn the row count from it.
    """

    max_steps_per_round: int = 10_000
    max_rounds: int = 1_000
    max_model_parameters: int = 50_000_000
    max_features: int = 65_536
    max_categories: int = 10_000
    max_classes: int = 1_000
    max_run_key_length: int = 128
    max_round_seconds: float = 3600.0
    max_weight_magnitude: float = 1e4
    max_encoded_values: int = 1 << 31

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            option = "--" + field.name.replace("_", "-")
            if field.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise LimitError(f"{option} must be a whole number of at least 1, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise LimitError(f"{option} must be a positive finite number, got {value!r}")
            else:
                object.__setattr__(self, field.name, float(value))
        # Beyond float32's range every weight is suspect, and the check would not bound anything.
        if self.max_weight_magnitude > 1e30:
            raise LimitError(f"--max-weight-magnitude must be at most 1e30, got {self.max_weight_magnitude:g}")

    # ------------------------------------------------------------------ checks
    def check_run_key(self, run_key: str) -> list[str]:
        if len(run_key) > self.max_run_key_length:
            return [f"run-key: {len(run_key)} characters; this department accepts at most {self.max_run_key_length}"]
        if not RUN_KEY.match(run_key):
            return ["run-key: only letters, digits and '. _ : -' are accepted (it is written into every ledger entry)"]
        return []

    def check_rounds(self, rounds: int) -> list[str]:
        if rounds > self.max_rounds:
            return [f"num-server-rounds: the run plans {rounds} rounds; this department plans at most {self.max_rounds}"]
        return []

    def check_steps(self, steps: int) -> list[str]:
        if steps > self.max_steps_per_round:
            return [
                f"steps: a round would run {steps} DP-SGD steps; this department runs at most "
                f"{self.max_steps_per_round} a round (ask fewer local-epochs or a larger batch-size)"
            ]
        return []

    def check_schema(self, num_features: int, categories: Mapping[str, int], classes: int) -> list[str]:
        """Each width limit the run's data schema passes (checked before the table is read)."""
        out = []
        if num_features > self.max_features:
            out.append(f"schema: {num_features} encoded features; this department encodes at most {self.max_features}")
        wide = sorted((n, c) for c, n in categories.items() if n > self.max_categories)
        if wide:
            n, column = wide[-1]
            out.append(f"schema: column '{column[:64]}' has {n} categories; this department accepts at most {self.max_categories}")
        if classes > self.max_classes:
            out.append(f"schema: the label has {classes} classes; this department accepts at most {self.max_classes}")
        return out

    def check_table(self, rows: int) -> list[str]:
        """Whether a table of ``rows`` rows fits every schema within ``max_features`` (checked at start)."""
        if rows * self.max_features > self.max_encoded_values:
            fits = max(self.max_encoded_values // max(rows, 1), 1)
            return [
                f"table: {rows} rows at max-features {self.max_features} could take {rows * self.max_features:,} encoded "
                f"values, more than max-encoded-values {self.max_encoded_values:,}; lower --limit max-features={fits} "
                "or, with the memory for it, raise --limit max-encoded-values"
            ]
        return []

    def check_parameters(self, count: int) -> list[str]:
        if count > self.max_model_parameters:
            return [f"model: {count:,} parameters; this department builds at most {self.max_model_parameters:,}"]
        return []

    # ------------------------------------------------------------------ state
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_options(cls, options: list[str]) -> "RunLimits":
        """Limits from ``NAME=VALUE`` options (``max-steps-per-round=5000``); the rest keep their defaults."""
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for option in options:
            name, sep, text = option.partition("=")
            key = name.strip().replace("-", "_")
            if not sep or key not in types:
                known = ", ".join(f.name.replace("_", "-") for f in fields(cls))
                raise LimitError(f"--limit {option!r}: write NAME=VALUE with NAME one of {known}")
            try:
                values[key] = int(text) if types[key] in ("int", int) else float(text)
            except ValueError:
                raise LimitError(f"--limit {option!r}: {text!r} is not a number") from None
        return cls(**values)

    @classmethod
    def from_dict(cls, raw: Any) -> "RunLimits":
        if not isinstance(raw, dict):
            raise LimitError("the department policy's limits must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise LimitError(f"unknown limit(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**raw)
