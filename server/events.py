"""The run's events: ``RUN_DIR/events.jsonl``, one typed, versioned JSON line per thing that happened.

The ServerApp appends an event when the run starts or resumes, when a round
completes (its metrics and every department's whole-history ε), when a
department is left out of a round (declined, refused, rejected, failed, its
app refused, its ledger rolled back), when a round fails, and when the run
ends.  ``fedsilo simulate`` and ``fedsilo coordinator run`` follow this file
for their progress lines (:func:`follow`, from :mod:`fedsilo.server.progress`),
instead of reading Flower's log; anyone else can too (``tail -f``, a dashboard).  ``summary.json`` stays the
run's final record; the events are how it got there.

Each line is ``{"v": 1, "kind": ..., "at": UNIX_TIME, ...fields}``.  A reader
skips kinds it does not know (a newer fedsilo may add some) and refuses a
version it does not read.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterator

from fedsilo.shared import safe_read
from fedsilo.shared.runs import EVENTS
from fedsilo.shared.metrics import format_metrics, headline

EVENTS_FILE = EVENTS
EVENTS_VERSION = 1
MAX_EVENT_BYTES = 1 << 20  # one line: a round's ε per department fits many times over


@dataclass(frozen=True)
class Event:
    """Base of every event; ``at`` is when it happened (UNIX time)."""

    kind: ClassVar[str] = ""
    at: float = field(default_factory=time.time, kw_only=True)

    def describe(self) -> str:
        """The progress line the CLI shows for it."""
        raise NotImplementedError

    def to_json(self) -> str:
        body = {"v": EVENTS_VERSION, "kind": self.kind, **_json_safe(asdict(self))}
        return json.dumps(body, sort_keys=True, allow_nan=False)


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run-started"
    run: str
    run_dir: str
    task: str
    model: str
    per_sample_gradients: str
    rounds: int
    initial: dict[str, float]

    def describe(self) -> str:
        head, value = _headline(self.initial, self.task)
        return (f"run {self.run} -> {self.run_dir} ({self.task}, model {self.model}, per-sample gradients: "
                f"{self.per_sample_gradients}; initial {head} {value:.4f})")


@dataclass(frozen=True)
class RunResumed(Event):
    kind: ClassVar[str] = "run-resumed"
    run: str
    after_round: int
    rounds: int
    task: str
    metrics: dict[str, float]

    def describe(self) -> str:
        head, value = _headline(self.metrics, self.task)
        return f"run {self.run} resumed from its checkpoint after round {self.after_round}/{self.rounds} ({head} {value:.4f})"


@dataclass(frozen=True)
class RoundCompleted(Event):
    kind: ClassVar[str] = "round-completed"
    round: int
    rounds: int
    task: str
    metrics: dict[str, float]
    epsilon: dict[str, float | None]  # every department's whole-history ε after the round (None: no DP, unbounded)
    counts: dict[str, int]  # trained, refused, failed, declined, ... (only those that happened)
    client_level: dict[str, float] | None = None  # sampled, population, epsilon
    # Under --secure-aggregation: u2, u3 (counts), dropped_before_masking, dropped_after_masking, consistency, bytes
    secure_aggregation: dict[str, Any] | None = None

    def describe(self) -> str:
        counts = dict(self.counts)
        text = (f"round {self.round}/{self.rounds} {format_metrics(_numbers(self.metrics), self.task)} "
                f"trained={counts.pop('trained', 0)} refused={counts.pop('refused', 0)} failed={counts.pop('failed', 0)}")
        text += "".join(f" {name}={n}" for name, n in counts.items() if n)
        finite = [e for e in self.epsilon.values() if e is not None and math.isfinite(e)]
        if finite:
            text += f" max-epsilon-spent={max(finite):.3f}"
        if self.client_level:
            c = self.client_level
            text += f" sampled={int(c['sampled'])}/{int(c['population'])} client-level-epsilon={c['epsilon']:.3f}"
        if self.secure_aggregation:
            s = self.secure_aggregation
            text += f" secagg U2={s.get('u2', 0)} U3={s.get('u3', 0)}"
            text += f" dropped={s.get('dropped_before_masking', 0)}+{s.get('dropped_after_masking', 0)}"
            text += (" consistency" if s.get("consistency") else "") + f" bytes={s.get('bytes', 0)}"
        return text


@dataclass(frozen=True)
class DepartmentLeftOut(Event):
    """A department that did not contribute to a round, and why (its own words, or the coordinator's)."""

    kind: ClassVar[str] = "department-left-out"
    round: int
    department: str
    status: str  # declined | refused | rejected | failed | incompatible | rolled-back
    reason: str

    def describe(self) -> str:
        return f"round {self.round}: {self.department} {self.status}: {self.reason}"


@dataclass(frozen=True)
class Notice(Event):
    """Something the operator must know that is not a round's result (a failed round, an over-count)."""

    kind: ClassVar[str] = "notice"
    text: str
    round: int = 0

    def describe(self) -> str:
        return self.text


@dataclass(frozen=True)
class RunEnded(Event):
    kind: ClassVar[str] = "run-ended"
    status: str
    reason: str
    task: str
    metrics: dict[str, float]

    def describe(self) -> str:
        if not self.metrics:
            return f"finished: {self.status}" + (f" ({self.reason})" if self.reason else "")
        head, value = _headline(self.metrics, self.task)
        return f"finished: {self.status}, final {head} {value:.4f}"


KINDS: dict[str, type[Event]] = {cls.kind: cls for cls in (RunStarted, RunResumed, RoundCompleted, DepartmentLeftOut,
                                                            Notice, RunEnded)}


# The ServerApp logs each event it writes with this tag too (so flower.log tells the same
# story); the CLIs show progress from events.jsonl and leave these echoes out of --verbose.
ECHO_TAG = "fedsilo:"


class EventLog:
    """Appends events to ``RUN_DIR/events.jsonl``; each line is flushed as it is written."""

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self._drop_torn_tail()

    def _drop_torn_tail(self) -> None:
        """Cut a last line a killed run left half-written, so a resumed run appends whole lines only.

        Every event is one write of a whole line; bytes after the last newline are
        therefore a write the process did not finish, never an event.
        """
        try:
            with open(self.path, "rb+") as fh:
                size = fh.seek(0, os.SEEK_END)
                if size == 0:
                    return
                fh.seek(size - 1)
                if fh.read(1) == b"\n":
                    return
                block, end = 65536, size
                while end > 0:
                    start = max(0, end - block)
                    fh.seek(start)
                    cut = fh.read(end - start).rfind(b"\n")
                    if cut >= 0:
                        fh.truncate(start + cut + 1)
                        return
                    end = start
                fh.truncate(0)
        except FileNotFoundError:
            return

    def emit(self, event: Event) -> Event:
        line = event.to_json() + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
        return event


def parse_event(line: str, path: Path | str = EVENTS_FILE, lineno: int | None = None) -> Event | None:
    """One line as its event; None for a kind this fedsilo does not know.

    Raises
    ------
    UnreadableFile
        Not an event line of a version this fedsilo reads, or a known kind with wrong fields.
    """
    raw = safe_read.parse_json(line, path, lineno, "event line", dict)
    if raw.get("v") != EVENTS_VERSION:
        raise safe_read.UnreadableFile(path, f"event version {raw.get('v')!r}; this fedsilo reads version "
                                       f"{EVENTS_VERSION}", lineno, "read it with the fedsilo that wrote it")
    cls = KINDS.get(str(raw.get("kind")))
    if cls is None:
        return None
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in raw.items() if k in names})
    except TypeError as err:
        raise safe_read.UnreadableFile(path, f"a {cls.kind} event with other fields ({err})", lineno,
                                       "it is not a file fedsilo wrote") from None


def read_events(run_dir: Path | str) -> list[Event]:
    """Every event of a run so far, in order (unknown kinds left out)."""
    path = Path(run_dir) / EVENTS_FILE
    lines, _ = safe_read.read_lines(path, "events")
    return [e for n, line in enumerate(lines, 1) if (e := parse_event(line, path, n)) is not None]


def follow(run_dir: Path | str, stop: threading.Event, poll: float = 0.2, start: int = 0) -> Iterator[Event]:
    """Yield the run's events as they are appended, from byte ``start``, until ``stop`` is set.

    Only complete lines are read; after ``stop`` what is already complete is still yielded.
    """
    path = Path(run_dir) / EVENTS_FILE
    offset, pending = start, b""
    while True:
        stopping = stop.is_set()
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read(MAX_EVENT_BYTES)
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                event = parse_event(line.decode("utf-8", errors="replace"), path)
                if event is not None:
                    yield event
        if len(pending) > MAX_EVENT_BYTES:
            raise safe_read.UnreadableFile(path, f"an event line longer than {MAX_EVENT_BYTES} bytes", None,
                                           "it is not a file fedsilo wrote")
        if stopping and not chunk:
            return
        if not chunk:
            stop.wait(poll)


def _headline(metrics: dict[str, float], task: str) -> tuple[str, float]:
    key = headline(task)
    return key, _numbers(metrics).get(key, math.nan)


def _numbers(metrics: dict[str, float | None]) -> dict[str, float]:
    return {k: math.nan if v is None else float(v) for k, v in metrics.items()}


def _json_safe(value: Any) -> Any:
    """Non-finite numbers become null (JSON has none): ε of a department without DP, a NaN loss."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
