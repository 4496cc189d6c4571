"""What ``fedsilo simulate`` and ``fedsilo coordinator run`` show while a run is in flight.

The run's progress comes from its events (``RUN_DIR/events.jsonl``, written by
the ServerApp: :mod:`fedsilo.server.events`), followed in a thread: each
event's :meth:`~fedsilo.server.events.Event.describe` line, in order, once.
Flower's own log still streams through :meth:`RunProgress.flower_line` (and
into ``RUN_DIR/flower.log``): all of it with ``--verbose``, else only its
ERROR records, because a failure before the ServerApp is up (an import error, a
crash in Ray) writes no event at all and the user must still see it.

Before the ServerApp exists there are no events; a simulation's
:class:`~fedsilo.simulations.local_federation.StartupProgress` covers that
time and is told here when the run says its first word (:class:`Startup`).
"""

from __future__ import annotations

import re
import threading
from collections import deque
from pathlib import Path
from typing import Callable, Protocol

from fedsilo.shared.safe_read import UnreadableFile

from .events import ECHO_TAG, EVENTS_FILE, Event, follow

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# With --verbose the ServerApp's log echo of each event is left out of the streamed log;
# the event itself is shown (once, from events.jsonl).
EVENT_ECHO = ECHO_TAG + " "
# Flower renders every record twice: its console handler ("ERROR :  text", maybe with a
# timestamp) and, for what the ServerApp or simulation logged, "MM/DD/YYYY HH:MM:SS:ERROR:text".
_CONSOLE_ERROR = re.compile(r"^(?:ERROR|CRITICAL) (?:\d{4}-\d\d-\d\d [\d:,.]+)?\s*: *(.*)$")
_UPLOADED_ERROR = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:(?:ERROR|CRITICAL):(.*)$")


def flower_error(line: str) -> str | None:
    """The text of a Flower ERROR (or CRITICAL) record's first line, else None."""
    plain = ANSI.sub("", line).strip()
    match = _CONSOLE_ERROR.match(plain) or _UPLOADED_ERROR.match(plain)
    return match.group(1).strip() if match else None


def print_log_tail(log_path: Path, say: Callable[[str], None], lines: int = 25) -> None:
    """The last ``lines`` lines of a Flower log, colours removed (nothing if it cannot be read)."""
    try:
        tail = Path(log_path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return
    for line in tail:
        say(ANSI.sub("", line))


class Startup(Protocol):
    """Whoever draws on the terminal until the run's first word (a simulation's startup progress)."""

    def around_event(self, event: Event, show: Callable[[], None]) -> None: ...

    def around_log_line(self, show: Callable[[], None]) -> None: ...


class RunProgress:
    """Follows a run's events in a thread and shows them; filters Flower's streamed log.

    Use as a context manager around the run's submission; on exit the events
    written so far are still shown (the follower drains the file), then it stops.
    Lines are shown one at a time, from either thread.

    Parameters
    ----------
    run_dir : Path
        The run's folder, where the ServerApp writes ``events.jsonl``.  Only events
        appended from now on are shown (a resumed run's earlier ones were shown then).
    say : callable
        Prints one progress line (stdout).
    warn : callable, optional
        Prints one line about a problem (stderr); default ``say``.
    verbose : bool
        Show all of Flower's log, not only its ERROR records.
    startup : Startup, optional
        Told before each line is shown, so that it can step aside (or end).
    poll : float
        Seconds between looks at ``events.jsonl``.
    """

    def __init__(
        self,
        run_dir: Path,
        say: Callable[[str], None],
        warn: Callable[[str], None] | None = None,
        verbose: bool = False,
        startup: Startup | None = None,
        poll: float = 0.2,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.say = say
        self.warn = warn or say
        self.verbose = verbose
        self.startup = startup
        self.poll = poll
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: deque[str] = deque(maxlen=64)  # each Flower ERROR once (it comes twice)
        path = self.run_dir / EVENTS_FILE
        self._start = path.stat().st_size if path.exists() else 0

    def __enter__(self) -> "RunProgress":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, name="run-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Show what the ServerApp has written so far, then stop following."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def flower_line(self, line: str) -> None:
        """One line of Flower's streamed log (``FlowerConnection.run``'s ``on_line``)."""
        if self.verbose:
            if EVENT_ECHO not in line:
                self._show_log_line(line, self.say)
            return
        text = flower_error(line)
        if text is None or text in self._errors:
            return
        self._errors.append(text)
        self._show_log_line(f"  Flower error: {text}", self.warn)

    def _show_log_line(self, line: str, printer: Callable[[str], None]) -> None:
        with self._lock:
            if self.startup is not None:
                self.startup.around_log_line(lambda: printer(line))
            else:
                printer(line)

    def show_event(self, event: Event) -> None:
        """Show one event's line (what the follower thread does with each)."""
        line = f"  {event.describe()}"
        with self._lock:
            if self.startup is not None:
                self.startup.around_event(event, lambda: self.say(line))
            else:
                self.say(line)

    def _follow(self) -> None:
        try:
            for event in follow(self.run_dir, self._stop, self.poll, self._start):
                self.show_event(event)
        except (UnreadableFile, OSError, ValueError, KeyError, TypeError) as err:
            # The run goes on; only its progress lines stop.
            self._show_log_line(f"  (progress stopped: {err}; the run goes on, see {self.run_dir / 'flower.log'})",
                                self.warn)
