"""The progress line while the simulation engine starts: driven by a fake clock and fake streams, no Ray.

``fedsilo simulate`` used to print nothing for ~20 s between its settings line and
round 1.  :class:`StartupProgress` says what is starting and for how long; until the
ServerApp exists its stages come from the processes and Flower's log, then from the
run's events: it steps aside for the run's first event and ends at the next.
"""

import io
import sys
import time

import pytest

from fedsilo.server.events import RoundCompleted, RunStarted
from fedsilo.server.progress import RunProgress
from fedsilo.shared.flower_cli import RunOutcome
from fedsilo.simulations.local_federation import LocalFederation, StartupProgress

GREEN, RESET = "\x1b[92m", "\x1b[0m"
STARTED = RunStarted(run="7248", run_dir="/tmp/run", task="multiclass", model="auto", per_sample_gradients="none (no DP)",
                     rounds=2, initial={"accuracy": 0.0333, "loss": 2.3})
ROUND_1 = RoundCompleted(round=1, rounds=2, task="multiclass", metrics={"accuracy": 0.4917, "loss": 2.0368},
                         epsilon={}, counts={"trained": 3, "refused": 0, "failed": 0})
ROUND_2 = RoundCompleted(round=2, rounds=2, task="multiclass", metrics={"accuracy": 0.7333, "loss": 1.6444},
                         epsilon={}, counts={"trained": 3, "refused": 0, "failed": 0})
STARTED_LINE = "  run 7248 -> /tmp/run (multiclass, model auto, per-sample gradients: none (no DP); initial accuracy 0.0333)"
ROUND_1_LINE = "  round 1/2 accuracy=0.4917 loss=2.0368 trained=3 refused=0 failed=0"
ROUND_2_LINE = "  round 2/2 accuracy=0.7333 loss=1.6444 trained=3 refused=0 failed=0"
# What `flwr run --stream` prints, as in a real run's flower.log.
FLOWER_NOISE = [
    "Using SuperLink: fedsilo (127.0.0.1:50787)",
    "Successfully started run 7248",
    f"{GREEN}INFO {RESET}:      Starting Flower Simulation",
    f"{GREEN}INFO {RESET}:      configure_train: Sampled 3 nodes (out of 3)",
]
# The ServerApp's log echo of an event: never shown, the event is.
ECHO = f"{GREEN}INFO {RESET}:      fedsilo: round 1/2 accuracy=0.4917 loss=2.0368 trained=3 refused=0 failed=0"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Events(io.StringIO):
    """A fake stderr that records each line it gets, in one list with the run's own output."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def write(self, text):
        self.events.extend(("progress", line) for line in text.splitlines() if line)
        return len(text)


@pytest.fixture
def plain():
    events, clock = [], Clock()
    progress = StartupProgress(Events(events), clock=clock, live=False, thread=False)
    # Not started: the tests hand it events themselves, as its follower thread would.
    show = RunProgress("/nonexistent", lambda text: events.append(("run", text)), startup=progress)
    return progress, show, clock, events


def test_plain_lines_every_ten_seconds_until_the_first_round(plain):
    progress, show, clock, events = plain
    progress.start("Flower SuperLink")
    assert events == [("progress", "starting the simulation engine (Flower SuperLink)…")]
    clock.now += 2.7
    progress.stage("Flower SuperExec")
    progress.tick()
    for line in FLOWER_NOISE[:3]:  # Flower's own lines: not shown, the progress goes on
        progress.log_line(line)
        show.flower_line(line)
    assert progress.stage_text == "ServerApp and Ray"  # the simulation process said it started
    clock.now += 7.5  # 10.2 s
    progress.tick()
    progress.tick()  # once per 10 s, however often it ticks
    assert events[1:] == [("progress", "still starting the simulation engine (ServerApp and Ray): 10 s")]
    clock.now += 4.0
    progress.set_up = "3 departments in Ray, first round"
    show.show_event(STARTED)  # the ServerApp is set up: its line shows, the progress moves on to Ray
    show.flower_line(ECHO)
    assert progress.active and progress.stage_text == "3 departments in Ray, first round"
    clock.now += 6.0  # 20.2 s
    show.flower_line(FLOWER_NOISE[3])
    progress.tick()
    clock.now += 3.2  # 23.4 s
    show.show_event(ROUND_1)
    show.show_event(ROUND_2)
    clock.now += 30
    progress.tick()  # stopped: nothing more
    assert events[2:] == [
        ("run", STARTED_LINE),
        ("progress", "still starting the simulation engine (3 departments in Ray, first round): 20 s"),
        ("progress", "simulation engine started in 23 s"),  # before round 1's line, not after
        ("run", ROUND_1_LINE),
        ("run", ROUND_2_LINE),
    ]
    assert not progress.active


def test_a_run_that_fails_before_its_first_event_stops_the_progress_quietly(plain):
    progress, show, clock, events = plain
    progress.start("Flower SuperLink")
    for line in FLOWER_NOISE:
        show.flower_line(line)
    clock.now += 12
    progress.stop()  # what LocalFederation.run does when `flwr run` returns or raises
    progress.tick()
    assert [text for _, text in events] == ["starting the simulation engine (Flower SuperLink)…"]
    assert not progress.active


def test_a_flower_error_ends_the_progress_without_saying_started(plain):
    progress, show, clock, events = plain
    progress.start("Flower SuperLink")
    clock.now += 5
    show.flower_line("\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception: no data")
    clock.now += 20
    progress.tick()
    assert not progress.active
    assert [text for _, text in events] == ["starting the simulation engine (Flower SuperLink)…",
                                            "  Flower error: ServerApp thread raised an exception: no data"]


def test_verbose_output_ends_the_progress_at_flowers_first_line(plain):
    progress, _, clock, events = plain
    verbose = RunProgress("/nonexistent", lambda text: events.append(("run", text)), verbose=True, startup=progress)
    progress.start("Flower SuperLink")
    clock.now += 3
    verbose.flower_line(FLOWER_NOISE[0])
    clock.now += 20
    progress.tick()
    # The full log speaks for itself; "started" would be untrue this early.
    assert events == [("progress", "starting the simulation engine (Flower SuperLink)…"), ("run", FLOWER_NOISE[0])]


def test_on_a_terminal_one_line_is_redrawn_then_erased():
    stream, clock = io.StringIO(), Clock()
    progress = StartupProgress(stream, clock=clock, live=True, thread=False)
    shown = []
    show = RunProgress("/nonexistent", shown.append, startup=progress)
    stderr = sys.stderr
    progress.start("Flower SuperLink")
    clock.now += 12.6
    progress.tick()
    progress._live.refresh()
    show.show_event(STARTED)
    assert progress.active and progress._live is not None  # drawn again after the run's first line
    show.show_event(ROUND_1)
    assert not progress.active and progress._live is None and sys.stderr is stderr
    out = stream.getvalue()
    assert "starting the simulation engine (Flower SuperLink)… 12 s" in out
    assert out.rstrip().endswith("simulation engine started in 12 s")
    assert shown == [STARTED_LINE, ROUND_1_LINE]


def test_the_ticker_writes_on_its_own_and_stops_with_the_progress():
    events = []
    progress = StartupProgress(Events(events), live=False, every=0.1, interval=0.01)
    progress.start("Flower SuperLink")
    time.sleep(0.35)
    progress.stop()
    count = len(events)
    time.sleep(0.15)
    assert len(events) == count  # nothing after stop
    assert 3 <= count <= 5, events  # the first line, then one every 0.1 s
    assert events[1] == ("progress", "still starting the simulation engine (Flower SuperLink): 0.1 s")


class FakeConnection:
    """Stands in for `flwr run --stream`: hands Flower's lines to the handler, the events to the
    follower (as the ServerApp writes them meanwhile), or fails."""

    def __init__(self, items, error=None):
        self.items, self.error = items, error
        self.follower = None

    def run(self, run_config, log_path, federation, on_line):
        for item in self.items:
            if isinstance(item, str):
                on_line(item)
            else:
                self.follower.show_event(item)
        if self.error:
            raise self.error
        return RunOutcome("7248", "finished:completed", log_path)


def _federation(tmp_path, connection, events, clock):
    progress = StartupProgress(Events(events), clock=clock, live=False, thread=False)
    federation = LocalFederation(tmp_path, progress=progress)
    federation.process, federation.connection = object(), connection  # as after start()
    connection.follower = RunProgress(tmp_path, lambda text: events.append(("run", text)), startup=progress)
    progress.start("Flower SuperLink")
    return federation, progress


def test_local_federation_takes_the_simulations_start_from_the_log_then_the_events(tmp_path):
    events, clock = [], Clock()
    connection = FakeConnection([*FLOWER_NOISE[:2], STARTED, FLOWER_NOISE[2], FLOWER_NOISE[3], ROUND_1])
    federation, progress = _federation(tmp_path, connection, events, clock)
    clock.now += 21
    outcome = federation.run({}, num_supernodes=3, on_line=connection.follower.flower_line)
    assert outcome.ok and not progress.active
    assert [text for _, text in events] == [
        "starting the simulation engine (Flower SuperLink)…",
        "still starting the simulation engine (Flower SuperExec): 20 s",  # due at run(): 21 s in
        STARTED_LINE,
        "simulation engine started in 21 s",
        ROUND_1_LINE,
    ]


def test_the_simulation_process_line_moves_the_stage_on(tmp_path):
    events, clock = [], Clock()
    stages = []
    connection = FakeConnection(FLOWER_NOISE)
    federation, progress = _federation(tmp_path, connection, events, clock)
    federation.run({}, num_supernodes=3, on_line=lambda line: stages.append(progress.stage_text))
    assert stages == ["Flower SuperExec", "Flower SuperExec", "ServerApp and Ray", "ServerApp and Ray"]


def test_local_federation_stops_the_progress_when_the_run_fails(tmp_path):
    from fedsilo.shared.flower_cli import FlowerError

    events, clock = [], Clock()
    failing = FakeConnection(FLOWER_NOISE[:2], FlowerError("`flwr run` did not start a run"))
    federation, progress = _federation(tmp_path, failing, events, clock)
    with pytest.raises(FlowerError):
        federation.run({}, num_supernodes=3, on_line=failing.follower.flower_line)
    assert not progress.active
    assert [text for _, text in events] == ["starting the simulation engine (Flower SuperLink)…"]


def test_no_progress_when_asked_for_none(tmp_path):
    assert LocalFederation(tmp_path, progress=False).progress is None
    assert isinstance(LocalFederation(tmp_path).progress, StartupProgress)
