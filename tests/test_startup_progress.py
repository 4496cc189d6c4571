"""The progress line while the simulation engine starts: driven by a fake clock and fake streams, no Ray.

``fedsilo simulate`` used to print nothing for ~20 s between its settings line and
round 1.  :class:`StartupProgress` says what is starting and for how long, steps
aside for the ServerApp's first line, and ends at the first round's line.
"""

import io
import sys
import time

import pytest

from fedsilo.shared.flower_cli import ProgressFilter, RunOutcome, progress_filter
from fedsilo.simulations.local_federation import LocalFederation, StartupProgress

GREEN, RESET = "\x1b[92m", "\x1b[0m"
# What `flwr run --stream` prints, as in a real run's flower.log (each record twice).
HEADER = f"{GREEN}INFO {RESET}:      fedsilo: run 7248 -> /tmp/run (multiclass, model auto; initial accuracy 0.0333)"
HEADER_AGAIN = "12/01/2026 18:55:09:INFO:fedsilo: run 7248 -> /tmp/run (multiclass, model auto; initial accuracy 0.0333)"
ROUND_1 = f"{GREEN}INFO {RESET}:      fedsilo: round 1/2 accuracy=0.4917 loss=2.0368 trained=3 refused=0 failed=0"
ROUND_1_AGAIN = "12/01/2026 18:55:19:INFO:fedsilo: round 1/2 accuracy=0.4917 loss=2.0368 trained=3 refused=0 failed=0"
ROUND_2 = f"{GREEN}INFO {RESET}:      fedsilo: round 2/2 accuracy=0.7333 loss=1.6444 trained=3 refused=0 failed=0"
FLOWER_NOISE = [
    "Using SuperLink: fedsilo (127.0.0.1:50787)",
    "Successfully started run 7248",
    f"{GREEN}INFO {RESET}:      Starting Flower Simulation",
    f"{GREEN}INFO {RESET}:      configure_train: Sampled 3 nodes (out of 3)",
]


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
    show = progress_filter(lambda text: events.append(("run", text)))
    return progress, show, clock, events


def test_plain_lines_every_ten_seconds_until_the_first_round(plain):
    progress, show, clock, events = plain
    handle = progress.handler(show, set_up="3 departments in Ray, first round")
    progress.start("Flower SuperLink")
    assert events == [("progress", "starting the simulation engine (Flower SuperLink)…")]
    clock.now += 2.7
    progress.stage("ServerApp and Ray")
    progress.tick()
    for line in FLOWER_NOISE[:3]:
        handle(line)  # Flower's own lines: not shown, the progress goes on
    clock.now += 7.5  # 10.2 s
    progress.tick()
    progress.tick()  # once per 10 s, however often it ticks
    assert events[1:] == [("progress", "still starting the simulation engine (ServerApp and Ray): 10 s")]
    clock.now += 4.0
    handle(HEADER)  # the ServerApp is set up: its line shows, the progress moves on to Ray
    handle(HEADER_AGAIN)
    assert progress.active and progress.stage_text == "3 departments in Ray, first round"
    clock.now += 6.0  # 20.2 s
    handle(FLOWER_NOISE[3])
    progress.tick()
    clock.now += 3.2  # 23.4 s
    handle(ROUND_1)
    handle(ROUND_1_AGAIN)
    handle(ROUND_2)
    clock.now += 30
    progress.tick()  # stopped: nothing more
    assert events[2:] == [
        ("run", "  run 7248 -> /tmp/run (multiclass, model auto; initial accuracy 0.0333)"),
        ("progress", "still starting the simulation engine (3 departments in Ray, first round): 20 s"),
        ("progress", "simulation engine started in 23 s"),  # before round 1's line, not after
        ("run", "  round 1/2 accuracy=0.4917 loss=2.0368 trained=3 refused=0 failed=0"),
        ("run", "  round 2/2 accuracy=0.7333 loss=1.6444 trained=3 refused=0 failed=0"),
    ]
    assert not progress.active


def test_a_run_that_fails_before_its_first_line_stops_the_progress_quietly(plain):
    progress, show, clock, events = plain
    handle = progress.handler(show)
    progress.start("Flower SuperLink")
    for line in FLOWER_NOISE:
        handle(line)
    clock.now += 12
    progress.stop()  # what LocalFederation.run does when `flwr run` returns or raises
    progress.tick()
    assert [text for _, text in events] == ["starting the simulation engine (Flower SuperLink)…"]
    assert not progress.active


def test_verbose_output_ends_the_progress_at_flowers_first_line(plain):
    progress, _, clock, events = plain
    verbose = ProgressFilter(lambda text: events.append(("run", text)), verbose=True)
    handle = progress.handler(verbose)
    progress.start("Flower SuperLink")
    clock.now += 3
    handle(FLOWER_NOISE[0])
    clock.now += 20
    progress.tick()
    # The full log speaks for itself; "started" would be untrue this early.
    assert events == [("progress", "starting the simulation engine (Flower SuperLink)…"), ("run", FLOWER_NOISE[0])]


def test_shows_does_not_consume_a_line():
    got = []
    show = progress_filter(got.append)
    assert show.shows(ROUND_1) and show.shows(ROUND_1)
    show(ROUND_1)
    assert not show.shows(ROUND_1_AGAIN) and not show.shows(FLOWER_NOISE[0]) and show.shows(ROUND_2)
    assert got == ["  round 1/2 accuracy=0.4917 loss=2.0368 trained=3 refused=0 failed=0"]


def test_on_a_terminal_one_line_is_redrawn_then_erased():
    stream, clock = io.StringIO(), Clock()
    progress = StartupProgress(stream, clock=clock, live=True, thread=False)
    shown = []
    handle = progress.handler(progress_filter(shown.append))
    stderr = sys.stderr
    progress.start("Flower SuperLink")
    clock.now += 12.6
    progress.tick()
    progress._live.refresh()
    handle(HEADER)
    assert progress.active and progress._live is not None  # drawn again after the header line
    handle(ROUND_1)
    assert not progress.active and progress._live is None and sys.stderr is stderr
    out = stream.getvalue()
    assert "starting the simulation engine (Flower SuperLink)… 12 s" in out
    assert out.rstrip().endswith("simulation engine started in 12 s")
    assert shown == ["  run 7248 -> /tmp/run (multiclass, model auto; initial accuracy 0.0333)",
                     "  round 1/2 accuracy=0.4917 loss=2.0368 trained=3 refused=0 failed=0"]


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
    """Stands in for `flwr run --stream`: hands the lines to the handler, or fails."""

    def __init__(self, lines, error=None):
        self.lines, self.error = lines, error

    def run(self, run_config, log_path, federation, on_line):
        for line in self.lines:
            on_line(line)
        if self.error:
            raise self.error
        return RunOutcome("7248", "finished:completed", log_path)


def _federation(tmp_path, connection, events, clock):
    progress = StartupProgress(Events(events), clock=clock, live=False, thread=False)
    federation = LocalFederation(tmp_path, progress=progress)
    federation.process, federation.connection = object(), connection  # as after start()
    progress.start("Flower SuperLink")
    return federation, progress


def test_local_federation_wraps_the_runs_handler(tmp_path):
    events, clock = [], Clock()
    show = progress_filter(lambda text: events.append(("run", text)))
    federation, progress = _federation(tmp_path, FakeConnection([*FLOWER_NOISE, HEADER, ROUND_1]), events, clock)
    clock.now += 21
    outcome = federation.run({}, num_supernodes=3, on_line=show)
    assert outcome.ok and not progress.active
    assert [text for _, text in events] == [
        "starting the simulation engine (Flower SuperLink)…",
        "still starting the simulation engine (ServerApp and Ray): 20 s",  # due at run(): 21 s in
        "  run 7248 -> /tmp/run (multiclass, model auto; initial accuracy 0.0333)",
        "simulation engine started in 21 s",
        "  round 1/2 accuracy=0.4917 loss=2.0368 trained=3 refused=0 failed=0",
    ]


def test_local_federation_stops_the_progress_when_the_run_fails(tmp_path):
    from fedsilo.shared.flower_cli import FlowerError

    events, clock = [], Clock()
    failing = FakeConnection(FLOWER_NOISE[:2], FlowerError("`flwr run` did not start a run"))
    federation, progress = _federation(tmp_path, failing, events, clock)
    with pytest.raises(FlowerError):
        federation.run({}, num_supernodes=3, on_line=progress_filter(lambda text: events.append(("run", text))))
    assert not progress.active
    assert [text for _, text in events] == ["starting the simulation engine (Flower SuperLink)…"]


def test_no_progress_when_asked_for_none(tmp_path):
    assert LocalFederation(tmp_path, progress=False).progress is None
    assert isinstance(LocalFederation(tmp_path).progress, StartupProgress)
