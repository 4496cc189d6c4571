"""What the CLIs show while a run is in flight: the run's events, followed as the ServerApp writes them.

No Flower here: a writer thread (or a fake simulation) appends to ``events.jsonl``
while :class:`~fedsilo.server.progress.RunProgress` follows it in its own thread.
"""

from __future__ import annotations

import io
import signal
import threading
import time
from types import SimpleNamespace

from rich.console import Console

from fedsilo.server.events import EVENTS_FILE, DepartmentLeftOut, EventLog, Notice, RoundCompleted, RunEnded, RunStarted
from fedsilo.server.progress import RunProgress, flower_error
from fedsilo.shared.flower_cli import RunOutcome
from fedsilo.simulations.ray_resources import SimulationResources

RED, GREEN, RESET = "\x1b[91m", "\x1b[92m", "\x1b[0m"


def _round(n: int, rounds: int) -> RoundCompleted:
    return RoundCompleted(round=n, rounds=rounds, task="multiclass", metrics={"accuracy": n / rounds, "loss": 1.0},
                          epsilon={"a": 0.1 * n}, counts={"trained": 2, "refused": 0, "failed": 0})


def test_the_follower_shows_every_event_in_order_while_a_writer_appends(tmp_path):
    """Lines written in pieces (a reader may see half of one) and a torn last line: nothing lost, no error."""
    rounds = 150
    events = [_round(n, rounds) for n in range(1, rounds + 1)]
    shown, warned = [], []
    progress = RunProgress(tmp_path, shown.append, warned.append, poll=0.005)

    def write() -> None:
        with open(tmp_path / EVENTS_FILE, "a", encoding="utf-8") as fh:
            for n, event in enumerate(events):
                line = event.to_json() + "\n"
                cut = len(line) // 2 if n % 3 == 0 else len(line)
                fh.write(line[:cut])
                fh.flush()
                if cut < len(line):
                    time.sleep(0.002)  # the reader may look now, at half a line
                    fh.write(line[cut:])
                    fh.flush()
            fh.write(RunEnded(status="completed", reason="", task="multiclass", metrics={}).to_json()[:30])  # torn

    with progress:
        writer = threading.Thread(target=write)
        writer.start()
        writer.join(timeout=30)
    assert not writer.is_alive()
    assert shown == [f"  {e.describe()}" for e in events]
    assert warned == []


def test_a_resumed_run_shows_only_what_it_writes_now(tmp_path):
    log = EventLog(tmp_path)
    log.emit(_round(1, 3))  # shown by the attempt that wrote it
    shown = []
    with RunProgress(tmp_path, shown.append, poll=0.01):
        log.emit(Notice(text="resumed", round=2))
        log.emit(DepartmentLeftOut(round=2, department="b", status="declined", reason="budget"))
    assert shown == ["  resumed", "  round 2: b declined: budget"]


def test_an_unreadable_events_file_stops_the_progress_not_the_run(tmp_path):
    (tmp_path / EVENTS_FILE).write_text('{"v": 9, "kind": "notice", "text": "x"}\n')
    shown, warned = [], []
    progress = RunProgress(tmp_path, shown.append, warned.append, poll=0.01)
    progress._start = 0  # as if the ServerApp had written it after the CLI looked
    with progress:
        pass
    assert shown == [] and len(warned) == 1 and "event version 9" in warned[0] and "flower.log" in warned[0]


def test_flowers_error_records_are_shown_once_and_nothing_else_of_its_log():
    shown, warned = [], []
    progress = RunProgress("/nonexistent", shown.append, warned.append)
    for line in [
        f"{GREEN}INFO {RESET}:      Starting Flower Simulation",
        f"{GREEN}INFO {RESET}:      fedsilo: round 1/2 accuracy=0.5000",  # the ServerApp's echo of an event
        f"{RED}ERROR {RESET}:     ServerApp thread raised an exception: round 2: no update",
        "Traceback (most recent call last):",
        "12/01/2026 18:55:19:ERROR:ServerApp thread raised an exception: round 2: no update",  # the same record again
        "12/01/2026 18:55:20:CRITICAL:Simulation raised an exception",
    ]:
        progress.flower_line(line)
    assert shown == []
    assert warned == ["  Flower error: ServerApp thread raised an exception: round 2: no update",
                      "  Flower error: Simulation raised an exception"]
    assert flower_error("ERROR 2026-12-01 18:55:09,123:  timestamped") == "timestamped"
    assert flower_error("an ERROR in the middle of a line") is None


def test_verbose_shows_flowers_whole_log_but_not_the_echo_of_an_event():
    shown = []
    progress = RunProgress("/nonexistent", shown.append, verbose=True)
    lines = ["Using SuperLink: fedsilo (127.0.0.1:50787)", f"{GREEN}INFO {RESET}:      fedsilo: round 1/2 accuracy=0.5",
             f"{RED}ERROR {RESET}:     boom"]
    for line in lines:
        progress.flower_line(line)
    assert shown == [lines[0], lines[2]]


class FakeFederation:
    """Stands in for LocalFederation: the 'simulation' writes the run's events and Flower's log as it goes."""

    def __init__(self, workdir, resources=None):
        self.workdir = workdir
        self.progress = None
        self.connection = type("Connection", (), {"home": workdir})()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def run(self, run_config, num_supernodes, on_line, log_path):
        run_dir = log_path.parent
        log = EventLog(run_dir)
        log.emit(RunStarted(run="r1", run_dir=str(run_dir), task="multiclass", model="mlp", per_sample_gradients="ghost",
                            rounds=2, initial={"accuracy": 0.1}))
        on_line(f"{GREEN}INFO {RESET}:      fedsilo: run r1 -> {run_dir} (multiclass, ...)")  # the echo: not shown twice
        for n in (1, 2):
            time.sleep(0.05)
            log.emit(DepartmentLeftOut(round=n, department="c", status="refused", reason="budget spent"))
            log.emit(_round(n, 2))
        on_line(f"{RED}ERROR {RESET}:     a department's ClientApp raised an exception")
        log.emit(RunEnded(status="completed", reason="", task="multiclass", metrics={"accuracy": 0.9}))
        (run_dir / "summary.json").write_text("{}")
        log_path.write_text("the full log\n")
        return RunOutcome("7248", "finished:completed", log_path)


def test_simulate_prints_the_runs_events_as_its_progress(tmp_path, monkeypatch):
    from fedsilo.simulations import simulate

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(simulate, "console", Console(file=out, width=300))
    monkeypatch.setattr(simulate, "err_console", Console(file=err, width=300))
    monkeypatch.setattr(simulate, "LocalFederation", FakeFederation)
    monkeypatch.setattr(simulate, "publish", lambda settings, home: {})
    monkeypatch.setattr(simulate, "print_run_report", lambda run_dir, console: console.print("REPORT") or SimpleNamespace(status="completed"))
    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        simulate._run(None, run_dir, departments=3, resources=SimulationResources(), verbose=False)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"  run r1 -> {run_dir} (multiclass, model mlp")
    assert lines[1:6] == ["  round 1: c refused: budget spent", f"  {_round(1, 2).describe()}",
                          "  round 2: c refused: budget spent", f"  {_round(2, 2).describe()}",
                          "  finished: completed, final accuracy 0.9000"]
    assert lines[6:] == ["REPORT", f"Summary: {run_dir / 'summary.json'}"]
    assert err.getvalue().splitlines() == ["  Flower error: a department's ClientApp raised an exception"]


def test_coordinator_run_prints_the_runs_events_as_its_progress(tmp_path, monkeypatch):
    from fedsilo.server import cli

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=300))
    monkeypatch.setattr(cli, "err_console", Console(file=err, width=300))
    monkeypatch.setattr(cli, "publish", lambda settings, home: {})
    monkeypatch.setattr(cli, "withdraw", lambda run_config, home: None)
    monkeypatch.setattr(cli.coord, "superexec_home", lambda state: tmp_path / "home")
    fake = FakeFederation(tmp_path)
    monkeypatch.setattr(cli.coord, "submit", lambda connection, run_config, log_path, on_line:
                        fake.run(run_config, 2, on_line, log_path))
    monkeypatch.setattr(cli, "print_run_report", lambda run_dir, console: SimpleNamespace(status="completed"))
    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    cli._submit(None, None, run_dir, verbose=False, state=tmp_path / "state")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  run r1 -> ") and lines[-1] == "  finished: completed, final accuracy 0.9000"
    assert len(lines) == 6
    assert "ClientApp raised an exception" in err.getvalue()
