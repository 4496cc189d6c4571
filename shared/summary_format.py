"""The run summary's format: ``RUN_DIR/summary.json`` as typed, versioned records.

The coordinator writes it (:class:`fedsilo.server.summary.RunSummary`, after
every round); the report, the audit, serving and the CLIs read it with
:func:`read_summary`.  :class:`Summary` is the whole file: its rounds
(:class:`RoundRecord`), the rounds that produced no model (:class:`FailedRound`),
per-department totals (:class:`DepartmentTotals`), resumes (:class:`Resume`) and
the coordinator's client-level DP (:class:`Central`).

The file says its format version, ``"v"`` (:data:`SUMMARY_VERSION`).  A file
without one was written by fedsilo 0.4 or earlier: the same fields, some of
them absent in older runs, which read as their defaults.  A file with a newer
version is refused with a message that says to upgrade fedsilo.  Reading is
strict: every field is checked for its type and an error names the field
(``rounds[2].epsilon['hr']``), so what a reader gets is what the types say.
"""

from __future__ import annotations

import functools
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from . import safe_read
from .runs import SUMMARY
from .safe_read import UnreadableFile

# 1: the file says "v" (fedsilo 0.4 wrote the same fields without it).
SUMMARY_VERSION = 1
# A run's status while the coordinator works (or after it died); the others say how it ended.
RUNNING = "running"
_NOT_OURS = "it is not a summary fedsilo wrote"


class SummaryFormatError(UnreadableFile):
    """A ``summary.json`` that is not a summary this fedsilo can read; the message names the field."""


def _optional(default: Any = None, factory: Any = None) -> Any:
    """A field written only when it holds something: absent (not null) in the file otherwise."""
    if factory is not None:
        return field(default_factory=factory, metadata={"omit_empty": True})
    return field(default=default, metadata={"omit_empty": True})


@dataclass
class RoundSecAgg:
    """Secure aggregation in one round: who masked, who dropped, what it cost (the round ran under ``--secure-aggregation``)."""

    u2: list[str] = field(default_factory=list)  # asked to mask (had dealt their shares)
    u3: list[str] = field(default_factory=list)  # sent a masked input that was accepted
    dropped_before_masking: list[str] = field(default_factory=list)  # in U2, no usable masked input
    dropped_after_masking: list[str] = field(default_factory=list)  # in U3, no usable unmasking
    consistency: bool = False  # the consistency step ran (U3 != U2)
    # Bytes of secure-aggregation messages, per department: what it sent, what it was sent.
    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)
    # Departments whose secure-aggregation answer was refused this round, and why.
    left_out: dict[str, str] = _optional(factory=dict)


@dataclass
class SecAggSetup:
    """The run's secure-aggregation session: its parameters and what setting it up cost."""

    participants: list[str] = field(default_factory=list)
    threshold: int = 0
    modulus_bits: int = 0
    vector_length: int = 0
    first_round: int = 0
    window: int = 0
    dealt: list[str] = field(default_factory=list)  # advertised and dealt their shares (U1)
    setup_bytes: int = 0
    setup_seconds: float = 0.0
    left_out: dict[str, str] = _optional(factory=dict)  # who left the setup, and why


@dataclass
class Traffic:
    """What one round moves per department: the global model down, an update up, against the whole model."""

    model_bytes: int = 0  # the arrays that travel each way (a pretrained base's adapters and head only)
    whole_model_bytes: int = 0  # every parameter of the model, a frozen base's included


@dataclass
class Participation:
    """Who did what in a round, completed or failed (from :class:`fedsilo.server.strategy.RoundReport`)."""

    # Whole-history ε of every department known so far, at the summary's `delta` (None: ∞).
    epsilon: dict[str, float | None] = field(default_factory=dict)
    trained: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    # Departments whose executor would not answer the run's app, and why.
    incompatible: dict[str, str] = field(default_factory=dict)
    # Departments whose policy is stricter than the run asks (setting, both values).
    declined: dict[str, str] = field(default_factory=dict)
    # Departments whose ledger no longer holds the head the coordinator acknowledged.
    rolled_back: dict[str, str] = field(default_factory=dict)
    # Departments that sent again the update they had released for this round before
    # the coordinator restarted: name -> the ledger entry (seq) that charged it.
    replayed: dict[str, int] = field(default_factory=dict)
    # Updates scaled down to max-update-norm: name -> their norm before scaling.
    bounded: dict[str, float | None] = field(default_factory=dict)
    # Departments whose ledger recorded a new release in this round, used or not:
    # name -> {ledger_seq, ledger_head, epsilon}.
    charged: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    # Under --secure-aggregation: the round's sets, drops and bytes (absent otherwise).
    secagg: RoundSecAgg | None = _optional()
    # Bytes of the arrays each department's reply carried to the coordinator (its upload).
    upload_bytes: dict[str, int] = _optional(factory=dict)


@dataclass
class RoundCentral:
    """What the coordinator's client-level DP released in one round."""

    epsilon: float | None = None
    sampled: int = 0
    population: int = 0


@dataclass
class RoundRecord(Participation):
    """A completed round: the global model's held-out metrics and who took part."""

    round: int = 0
    accuracy: float | None = None
    loss: float | None = None
    # Every held-out metric of the task (accuracy, f1, roc_auc; r2, rmse, mae; loss).
    metrics: dict[str, float | None] = field(default_factory=dict)
    central: RoundCentral | None = _optional()


@dataclass
class FailedRound(Participation):
    """A round that produced no model: why, and who was charged for it all the same."""

    round: int = 0
    reason: str = ""


@dataclass
class DepartmentTotals:
    """One department over this run: its latest whole-history ε and what it did."""

    epsilon: float | None = None
    rounds_trained: int = 0
    rounds_refused: int = 0
    steps: int = 0
    max_epsilon: float | None = _optional()  # the budget it grants this run
    delta: float | None = _optional()  # its own δ
    num_examples: int | None = _optional()  # the size it last reported


@dataclass
class Resume:
    """A restarted coordinator continuing the run after ``after_round``."""

    after_round: int = 0
    flower_run_id: str = ""
    at: float = 0.0
    # Filled in when the first resumed round completes (None until then).
    replayed: list[str] | None = None
    trained: list[str] | None = None
    # Client-level releases charged after the checkpoint, so run again (None: no --central-dp).
    central_charged_and_rerun: int | None = _optional()


@dataclass
class Central:
    """The coordinator's client-level DP settings and its whole-history ε."""

    level: str = ""
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    sample_rate: float = 0.0
    delta: float = 0.0
    max_epsilon: float = 0.0
    accountant: str = ""
    ledger: str = ""
    epsilon: float | None = None
    # Client-level distributed DP: the departments clipped and noised under secure aggregation.
    distributed: bool = False


@dataclass
class Asked:
    """What the run asked of the departments' policies (None: nothing)."""

    delta: float | None = None
    max_epsilon: float | None = None
    accountant: str | None = None
    dp: bool = True


@dataclass
class Summary:
    """``summary.json``: a run's settings, rounds, per-department totals and outcome."""

    v: int = SUMMARY_VERSION
    run_id: str = ""
    status: str = RUNNING
    stop_reason: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    dp: bool = True
    # δ at which the departments state ε: the largest of their own, the weakest stated.
    delta: float | None = None
    asked: Asked | None = None
    accountant: str | None = None
    max_epsilon: float | None = None
    initial: dict[str, float | None] = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)
    departments: dict[str, DepartmentTotals] = field(default_factory=dict)
    task: str | None = None
    final_accuracy: float | None = None
    final_loss: float | None = None
    final_metrics: dict[str, float | None] = field(default_factory=dict)
    model: str | None = None
    ledgers: str | None = None
    # The coordinator's signed record of acknowledged ledger heads, relative to the run folder.
    record: str | None = None
    wall_time_s: float = 0.0
    central: Central | None = _optional()
    dp_path: str | None = _optional()
    flower_run_ids: list[str] = _optional(factory=list)
    resumes: list[Resume] = _optional(factory=list)
    failed_rounds: list[FailedRound] = _optional(factory=list)
    model_card: str | None = _optional()
    # Under --secure-aggregation, one entry per session (a resume opens a new one).
    secure_aggregation: list[SecAggSetup] = _optional(factory=list)
    traffic: Traffic | None = _optional()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``summary.json`` (fields with nothing to say left out)."""
        return _to_plain(self)

    def to_json(self) -> str:
        """The file's text: indented, no NaN or ∞ (written as null before they get here)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, raw: Any, path: Path | str = SUMMARY) -> "Summary":
        """A summary from its JSON object, every field typed; ``path`` names the file in errors.

        Raises
        ------
        SummaryFormatError
            A field of the wrong type, an unknown or (in a version-1 file)
            missing field, or a version newer than :data:`SUMMARY_VERSION`.
        """
        if not isinstance(raw, dict):
            raise SummaryFormatError(path, "a run summary is a JSON object", hint=_NOT_OURS)
        version = raw.get("v", 0)
        if type(version) is not int or (version < 1 and "v" in raw):
            raise SummaryFormatError(path, f"the run summary's format version 'v' is {version!r}", hint=_NOT_OURS)
        if version > SUMMARY_VERSION:
            raise SummaryFormatError(
                path, f"the run summary is format v{version}, newer than the v{SUMMARY_VERSION} this fedsilo reads",
                hint="upgrade fedsilo (pip install -U fedsilo) to read it")
        # v0 (fedsilo 0.4 and earlier): the same fields, without "v"; older runs lack some of them.
        legacy = version == 0
        raw = {**raw, "v": version}
        if legacy and type(raw.get("run_id")) is int:  # fedsilo 0.1 could name a run by a number
            raw["run_id"] = str(raw["run_id"])
        summary = _typed(cls, raw, "", path, legacy)
        summary.v = SUMMARY_VERSION
        return summary

    @classmethod
    def from_json(cls, text: str, path: Path | str = SUMMARY) -> "Summary":
        """A summary from the file's text (parsed safely: bounded, finite)."""
        return cls.from_dict(safe_read.parse_json(text, path, what="run summary"), path)


def read_summary(path: Path | str) -> Summary:
    """The summary of a run folder (or the ``summary.json`` named), read safely and typed.

    Raises
    ------
    UnreadableFile
        The file is missing, not a regular file, not JSON, or (a
        :class:`SummaryFormatError`) not a summary this fedsilo reads.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY
    return Summary.from_dict(safe_read.load_json(path, "run summary"), path)


def _to_plain(record: Any) -> dict[str, Any]:
    plain = {}
    for name, omit_empty in _writing(type(record)):
        value = getattr(record, name)
        if omit_empty and value in (None, [], {}):
            continue
        plain[name] = _plain_value(value)
    return plain


@functools.cache
def _writing(cls: type) -> tuple[tuple[str, bool], ...]:
    """A record's field names, each with whether it is left out when empty."""
    return tuple((f.name, bool(f.metadata.get("omit_empty"))) for f in fields(cls))


_SCALARS = (str, int, float, bool, type(None))


def _plain_value(value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list):
        return [_plain_value(v) for v in value]
    if isinstance(value, dict):
        return {k: v if isinstance(v, _SCALARS) else _plain_value(v) for k, v in value.items()}
    if is_dataclass(value):
        return _to_plain(value)
    return value


def _where(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


@functools.cache
def _layout(cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """A record's field types and fields, resolved once (a summary holds a record per round)."""
    return typing.get_type_hints(cls), {f.name: f for f in fields(cls)}


def _typed(cls: type, raw: Any, at: str, path: Path | str, legacy: bool) -> Any:
    """``raw`` as a ``cls`` record, every field checked; unknown fields refused unless ``legacy``."""
    if not isinstance(raw, dict):
        raise SummaryFormatError(path, f"the run summary's '{at}' must be an object", hint=_NOT_OURS)
    hints, known = _layout(cls)
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown and not legacy:
        raise SummaryFormatError(path, f"the run summary has unknown field(s) {', '.join(_where(at, k) for k in unknown)[:200]}",
                                 hint="written by a newer fedsilo? upgrade fedsilo to read it")
    values = {}
    for name, f in known.items():
        if name in raw:
            values[name] = _value(hints[name], raw[name], _where(at, name), path, legacy)
        elif not legacy and not f.metadata.get("omit_empty"):  # v1 files say every field
            raise SummaryFormatError(path, f"the run summary lacks field '{_where(at, name)}'", hint=_NOT_OURS)
    return cls(**values)


def _value(kind: Any, value: Any, at: str, path: Path | str, legacy: bool) -> Any:
    """``value`` checked against the type hint ``kind``; the error names ``at``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        return _value(kind, value, at, path, legacy)
    if kind is Any:
        return value
    if is_dataclass(kind):
        return _typed(kind, value, at, path, legacy)
    if origin is list:
        if not isinstance(value, list):
            raise _wrong(path, at, "an array", value)
        return [_value(args[0], v, f"{at}[{i}]", path, legacy) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong(path, at, "an object", value)
        return {k: _value(args[1], v, f"{at}[{k!r}]", path, legacy) for k, v in value.items()}
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(path, at, "a number", value)
        return value
    if kind is int:
        if type(value) is not int:
            raise _wrong(path, at, "a whole number", value)
        return value
    if kind in (str, bool):
        if type(value) is not kind:
            raise _wrong(path, at, "text" if kind is str else "true or false", value)
        return value
    raise TypeError(f"no check for {kind!r} ({at})")  # a field of a type this module does not know


def _wrong(path: Path | str, at: str, expected: str, value: Any) -> SummaryFormatError:
    shown = safe_read._json_type(value)
    return SummaryFormatError(path, f"the run summary's '{at}' must be {expected}, not a JSON {shown}", hint=_NOT_OURS)


__all__ = ["Asked", "Central", "DepartmentTotals", "FailedRound", "Participation", "Resume", "RoundCentral",
           "RoundRecord", "SUMMARY_VERSION", "Summary", "SummaryFormatError", "read_summary"]
