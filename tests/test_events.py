"""The run's typed event log: written line by line, read back typed, followed as it grows."""

from __future__ import annotations

import json
import math
import threading

import pytest

from fedsilo.server.events import (
    EVENTS_FILE, DepartmentLeftOut, EventLog, Notice, RoundCompleted, RunEnded, RunResumed, RunStarted, follow,
    parse_event, read_events,
)
from fedsilo.shared.safe_read import UnreadableFile

EVENTS = [
    RunStarted(run="r1", run_dir="/runs/r1", task="multiclass", model="mlp", per_sample_gradients="ghost", rounds=3,
               initial={"accuracy": 0.1, "loss": 2.3}),
    RoundCompleted(round=1, rounds=3, task="multiclass", metrics={"accuracy": 0.5, "loss": math.nan},
                   epsilon={"a": 1.25, "b": math.inf}, counts={"trained": 1, "refused": 0, "failed": 0, "declined": 1}),
    DepartmentLeftOut(round=1, department="b", status="declined", reason="delta: looser than this department's"),
    Notice(text="round 2: only 1 department(s) connected", round=2),
    RunResumed(run="r1", after_round=1, rounds=3, task="multiclass", metrics={"accuracy": 0.5}),
    RunEnded(status="completed", reason="", task="multiclass", metrics={"accuracy": 0.81}),
]


def test_every_event_is_one_versioned_json_line_read_back_as_written(tmp_path):
    log = EventLog(tmp_path)
    for event in EVENTS:
        log.emit(event)
    lines = (tmp_path / EVENTS_FILE).read_text().splitlines()
    assert len(lines) == len(EVENTS)
    first = json.loads(lines[1])
    assert first["v"] == 1 and first["kind"] == "round-completed"
    assert first["epsilon"]["b"] is None and first["metrics"]["loss"] is None  # JSON has no inf or NaN
    back = read_events(tmp_path)
    assert [type(e) for e in back] == [type(e) for e in EVENTS]
    assert back[0] == EVENTS[0] and back[2] == EVENTS[2]


def test_the_progress_lines_say_what_the_log_lines_said():
    texts = [e.describe() for e in EVENTS]
    assert texts[0] == ("run r1 -> /runs/r1 (multiclass, model mlp, per-sample gradients: ghost; initial accuracy 0.1000)")
    assert texts[1].startswith("round 1/3 accuracy=0.5000") and "trained=1 refused=0 failed=0 declined=1" in texts[1]
    assert texts[1].endswith("max-epsilon-spent=1.250")  # the department without DP has no finite ε to show
    assert texts[2] == "round 1: b declined: delta: looser than this department's"
    assert texts[4] == "run r1 resumed from its checkpoint after round 1/3 (accuracy 0.5000)"
    assert texts[5] == "finished: completed, final accuracy 0.8100"


def test_a_reader_skips_kinds_it_does_not_know_and_refuses_other_versions_and_fields(tmp_path):
    assert parse_event('{"v": 1, "kind": "from-the-future", "at": 1}') is None
    with pytest.raises(UnreadableFile, match="event version 2"):
        parse_event('{"v": 2, "kind": "notice", "text": "x"}')
    with pytest.raises(UnreadableFile, match="notice event with other fields"):
        parse_event('{"v": 1, "kind": "notice"}')
    with pytest.raises(UnreadableFile):
        parse_event('{"v": 1, "kind": "notice", "text": NaN}')


def test_follow_yields_events_as_they_are_appended_and_only_whole_lines(tmp_path):
    stop, seen = threading.Event(), []
    reader = threading.Thread(target=lambda: seen.extend(follow(tmp_path, stop, poll=0.01)))
    reader.start()
    log = EventLog(tmp_path)
    log.emit(EVENTS[0])
    with open(tmp_path / EVENTS_FILE, "a") as fh:  # a line being written: not yet an event
        fh.write(EVENTS[5].to_json()[:20])
        fh.flush()
        deadline = threading.Event()
        for _ in range(500):
            if seen:
                break
            deadline.wait(0.01)
        assert seen == [EVENTS[0]]
        fh.write(EVENTS[5].to_json()[20:] + "\n")
    stop.set()
    reader.join(timeout=10)
    assert not reader.is_alive() and seen == [EVENTS[0], EVENTS[5]]


def test_a_run_writes_its_events_as_it_goes(tmp_path, serverapp_identity):
    """The real round loop (in-process, three departments, one of which lies): every event in order."""
    from test_malicious_department import _Department, _metric, _run

    departments = [_Department(tmp_path, "a"), _Department(tmp_path, "b"),
                   _Department(tmp_path, "evil", doctor=_metric("num-examples", math.nan))]
    run_dir, run = _run(tmp_path, departments)
    run()
    events = read_events(run_dir)
    kinds = [e.kind for e in events]
    assert kinds[0] == "run-started" and kinds[-1] == "run-ended"
    assert kinds.count("round-completed") == 2
    left_out = [e for e in events if isinstance(e, DepartmentLeftOut)]
    assert [(e.round, e.department, e.status) for e in left_out] == [(1, "evil", "rejected"), (2, "evil", "rejected")]
    assert "num-examples must be an integer" in left_out[0].reason
    rounds = [e for e in events if isinstance(e, RoundCompleted)]
    assert rounds[-1].counts["trained"] == 2 and set(rounds[-1].epsilon) >= {"a", "b"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert events[-1].status == summary["status"] == "completed"
    assert events[-1].metrics == pytest.approx(summary["final_metrics"])


def test_the_audit_never_reads_a_runs_events_as_a_ledger(tmp_path, serverapp_identity):
    """A deployment's run folder holds the coordinator's files only: summary.json, events.jsonl, no ledgers."""
    import shutil

    from fedsilo.audit import audit_path
    from test_malicious_department import _Department, _run

    run_dir, run = _run(tmp_path, [_Department(tmp_path, "a"), _Department(tmp_path, "b")])
    run()
    folder = tmp_path / "deployment-run"
    folder.mkdir()
    for name in ("summary.json", EVENTS_FILE):
        shutil.copy(run_dir / name, folder / name)
    result = audit_path(folder)
    assert all(row.id != "events" for row in result.departments)
    assert not any("events" in problem for problem in result.problems), result.problems


@pytest.mark.parametrize("torn", [b'{"v": 1, "kind": "round-comp', b"x" * 70000])
def test_a_resumed_run_cuts_the_half_written_line_a_killed_run_left(tmp_path, torn):
    log = EventLog(tmp_path)
    for event in EVENTS[:2]:
        log.emit(event)
    with open(tmp_path / EVENTS_FILE, "ab") as fh:  # killed in the middle of a write
        fh.write(torn)
    resumed = EventLog(tmp_path)
    resumed.emit(EVENTS[4])
    assert [type(e) for e in read_events(tmp_path)] == [RunStarted, RoundCompleted, RunResumed]


def test_a_torn_first_line_leaves_an_empty_log(tmp_path):
    (tmp_path / EVENTS_FILE).write_bytes(b'{"v": 1, "ki')
    EventLog(tmp_path).emit(EVENTS[0])
    assert read_events(tmp_path) == [EVENTS[0]]
