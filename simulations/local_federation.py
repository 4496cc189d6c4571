"""A private simulation SuperLink on this machine, for ``fedsilo simulate``.

``flwr run`` on its own starts a shared local SuperLink on fixed ports and leaves
it running.  :class:`LocalFederation` instead starts one in simulation mode on a
free loopback port, with its own ``FLWR_HOME`` (the user's Flower configuration
is untouched), submits runs through :class:`~fedsilo.shared.flower_cli.FlowerConnection`,
and stops the SuperLink and everything it spawned (simulation, Ray), whatever
happened.  Its API is plain HTTP bound to 127.0.0.1: it never leaves the machine.

Ray, which the SuperLink's simulation starts, listens on loopback only too, and
asks a fresh token of every caller (:func:`ray_environment`): by default its
control plane has no authentication, and anyone who reaches it runs code beside
the departments' tables.  Unless the user pointed Ray at a cluster of their own
(``--ray-address`` or ``RAY_ADDRESS``): then that cluster's security is theirs
(:mod:`fedsilo.simulations.ray_resources`).

Starting all that takes a while (on 2 cores: ~3 s the SuperLink, ~8 s the ServerApp,
~10 s Ray's workers and the first round): :class:`StartupProgress` says so meanwhile.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Mapping

from fedsilo.shared.flower_cli import (
    FlowerConnection,
    FlowerError,
    RunOutcome,
    flower_executable,
    free_port,
    stop_tree,
    wait_for_port,
    write_runtime_secret,
)
from fedsilo.server.events import Event, RunResumed, RunStarted

from .ray_resources import SimulationResources


# Ray binds its gRPC servers (GCS, raylet, object manager, every worker), the
# runtime-env and dashboard agents to 127.0.0.1 only when its node IP is exactly
# "127.0.0.1"; any other node IP and they listen on every interface.  Flower's
# federation config passes only num-cpus, num-gpus, logging-level and log-to-driver
# on to ``ray.init`` (not ``_node_ip_address``), so the node IP is set through Ray's
# own switch: with clusters disabled (its default on macOS and Windows), the node IP
# is what "localhost" resolves to.  ``RAY_ADDRESS=local``: a fresh private instance,
# never one found running on this machine (``ray start`` writes its address where
# ``ray.init()`` looks).  Flower keeps the dashboard off (``include_dashboard=False``).
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": "local"}
RAY_TOKEN_FILE = "ray-auth-token"


def ray_environment(token_path: Path) -> dict[str, str]:
    """What the simulation's processes need in their environment so that a private Ray is theirs alone.

    Loopback keeps the network out; loopback is open to every local user, so Ray's
    token authentication (Ray 2.52 and later; older versions ignore it) keeps them
    out too: every RPC must carry a fresh secret, written here to ``token_path``
    (0600).  Not for a cluster of the user's own (:class:`SimulationResources`): a
    driver bound to loopback could not be reached from its other nodes, and its
    authentication is its operators' to set.

    Raises
    ------
    FlowerError
        If "localhost" does not resolve to 127.0.0.1 first: Ray's node IP would
        then be another address and it would listen on every interface.
    """
    try:  # the resolution Ray's get_localhost_ip() makes
        localhost = socket.getaddrinfo("localhost", None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        localhost = ""
    if localhost != "127.0.0.1":
        raise FlowerError(
            f"'localhost' resolves to {localhost or 'nothing'} here, not 127.0.0.1, so Ray would listen on "
            "every network interface; map localhost to 127.0.0.1 (/etc/hosts) to simulate on this machine"
        )
    token = write_runtime_secret(Path(token_path)).resolve()
    # RAY_AUTH_TOKEN would take precedence over the file: empty, Ray ignores it.
    return {**RAY_LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_AUTH_TOKEN": ""}


# Ray reads a job's config from this variable at ``ray.init`` (its job manager sets it), merging
# its runtime_env with the driver's own (Flower's: PYTHONPATH).
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_environment(flwr_home: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What carries the simulation's ``FLWR_HOME`` to the workers of a Ray cluster of the user's own.

    The simulated departments read the simulation's own settings (data, ledger
    folder, policy: :func:`fedsilo.shared.config.publish`) from ``FLWR_HOME``.  A
    private Ray's workers inherit it from the simulation's processes (this is not
    needed there); a cluster's were started by its own raylets, so the job's
    runtime environment hands it over (merged into any job config already set in
    ``environ``).  On another node of a cluster the folder must be there too (a
    shared file system), as the data and ledger paths must.
    """
    env = os.environ if environ is None else environ
    try:
        job = json.loads(env.get(RAY_JOB_CONFIG) or "{}")
    except ValueError:
        job = {}
    job = job if isinstance(job, dict) else {}
    runtime = dict(job.get("runtime_env") or {})
    runtime["env_vars"] = {**dict(runtime.get("env_vars") or {}), "FLWR_HOME": str(flwr_home)}
    return {RAY_JOB_CONFIG: json.dumps({**job, "runtime_env": runtime})}


# What Flower's simulation process logs first (flwr/simulation/app.py), and the stage it begins.
SIMULATION_STARTED = "Starting Flower Simulation"
SIMULATION_STAGE = "ServerApp and Ray"
SUBMIT_STAGE = "Flower SuperExec"  # the run submitted; the SuperExec starts the simulation process


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class StartupProgress:
    """What the user sees while the simulation engine starts, until the run's first progress line.

    On a terminal, one line redrawn in place (a rich spinner, erased when it stops)::

        ⠋ starting the simulation engine (Flower SuperLink)… 2 s

    Elsewhere (CI logs, pipes) a line at the start, one every ``every`` seconds,
    and one at the end::

        starting the simulation engine (Flower SuperLink)…
        still starting the simulation engine (ServerApp and Ray): 10 s
        still starting the simulation engine (4 departments in Ray, first round): 20 s
        simulation engine started in 23 s

    It draws on ``stream`` (stderr: stdout stays the run's own output).  Until
    the ServerApp exists its stages come from the processes and Flower's log:
    the SuperLink answering on its port, then the simulation process's first
    log line (:meth:`log_line`).  From then on the run's events drive it
    (:class:`~fedsilo.server.progress.RunProgress` calls :meth:`around_event`
    and :meth:`around_log_line`): the run's first event moves it to its last
    stage, :attr:`set_up`, the next ends it.  ``clock``, ``live`` and
    ``thread=False`` (then call :meth:`tick` yourself) are for tests.
    """

    WHAT = "starting the simulation engine"

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        every: float = 10.0,
        live: bool | None = None,
        thread: bool = True,
        interval: float = 0.5,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        # In place only when both streams are the terminal: a line printed to a piped
        # stdout would reach the screen behind the redrawn one.
        self.live = (_isatty(self.stream) and _isatty(sys.stdout)) if live is None else live
        self.clock = clock
        self.every = every
        self.interval = interval
        self.threaded = thread
        self.active = False
        self.stage_text = ""
        self.set_up = "the departments in Ray, first round"  # the stage after the run's first event
        self._started_at = 0.0
        self._reported = 0.0  # the last multiple of `every` written (plain lines)
        self._spinner = None  # the rich Spinner while drawn (live)
        self._live = None
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what it says
    def elapsed(self) -> int:
        return int(self.clock() - self._started_at)

    def text(self) -> str:
        return f"{self.WHAT} ({self.stage_text})… {self.elapsed()} s"

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    # -- its life
    def start(self, stage: str) -> None:
        with self._lock:
            if self.active:
                self.stage(stage)
                return
            self.active, self.stage_text = True, stage
            self._started_at, self._reported = self.clock(), 0.0
            if self.live:
                self._draw()
            else:
                self._write(f"{self.WHAT} ({stage})…")
        if self.threaded:
            self._done.clear()
            self._thread = threading.Thread(target=self._tick_until_done, name="startup-progress", daemon=True)
            self._thread.start()

    def stage(self, stage: str) -> None:
        """What is starting now (the elapsed time counts on from :meth:`start`)."""
        with self._lock:
            self.stage_text = stage
            self.tick()

    def tick(self) -> None:
        """Redraw the line (terminal), or write the next ``still …`` line when one is due."""
        with self._lock:
            if not self.active:
                return
            if self._spinner is not None:
                self._spinner.update(text=self.text())  # the Live redraws it
                return
            if self.live:
                return  # paused
            due = (self.clock() - self._started_at) // self.every * self.every
            if due > self._reported:
                self._reported = due
                self._write(f"still {self.WHAT} ({self.stage_text}): {due:g} s")

    def pause(self) -> None:
        """Step aside while someone else prints a line (terminal: the line is erased)."""
        with self._lock:
            live, self._live, self._spinner = self._live, None, None
            if live is not None:
                live.stop()

    def resume(self) -> None:
        with self._lock:
            if self.active and self.live and self._spinner is None:
                self._draw()

    def stop(self, done: bool = False) -> None:
        """End it; ``done``: the run has said its first word, write how long starting took."""
        with self._lock:
            if not self.active:
                return
            self.pause()
            self.active = False
            if done:
                self._write(f"simulation engine started in {self.elapsed()} s")
        self._done.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def log_line(self, line: str) -> None:
        """One line of Flower's streamed log: the simulation process has started, ServerApp and Ray next.

        This stage must come from the log: the SuperExec, not fedsilo, starts that
        process, and the ServerApp in it has written no event yet (no event can
        say that the ServerApp is about to exist).
        """
        with self._lock:  # never back from a later stage (an event may be shown before this line comes)
            if self.active and self.stage_text == SUBMIT_STAGE and SIMULATION_STARTED in line:
                self.stage(SIMULATION_STAGE)

    def around_event(self, event: Event, show: Callable[[], None]) -> None:
        """Show one of the run's events (``show`` prints its line) with the progress out of the way.

        The ServerApp's first event (the run started, or resumed: its data and model
        are loaded) moves the progress on to :attr:`set_up`; any other event (the
        first round, a notice, the end) ends it, having said how long starting took.
        """
        if self.active and isinstance(event, (RunStarted, RunResumed)):
            self.pause()
            show()
            self.stage(self.set_up)
            self.resume()
            return
        self.stop(done=True)
        show()

    def around_log_line(self, show: Callable[[], None]) -> None:
        """A line of Flower's own log is shown (``--verbose``, or an error): the progress ends.

        Not "started": the full log speaks for itself, and an error means it did not.
        """
        self.stop()
        show()

    def _draw(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.spinner import Spinner

        console = Console(file=self.stream, force_terminal=True, highlight=False)
        self._spinner = Spinner("dots", self.text())
        # Transient: erased when it stops.  What this process writes to stderr meanwhile
        # (a warning) is printed above it; stdout is left alone.
        self._live = Live(self._spinner, console=console, transient=True, refresh_per_second=12.5,
                          redirect_stdout=False, redirect_stderr=True)
        self._live.start()

    def _tick_until_done(self) -> None:
        while not self._done.wait(self.interval):
            self.tick()


class LocalFederation:
    """A private simulation SuperLink; use as a context manager.

    Parameters
    ----------
    workdir : Path
        Folder for the SuperLink's ``FLWR_HOME`` and log.
    startup_timeout : float
        Seconds to wait for the SuperLink to answer.
    progress : StartupProgress or bool
        What to show while the engine starts, until the run's first progress
        line: ``True`` (default) a :class:`StartupProgress` on stderr, ``False`` nothing.
    resources : SimulationResources, optional
        What Ray reserves per department, and on which Ray (default: one core
        each, on a private Ray here).
    """

    def __init__(
        self, workdir: Path, startup_timeout: float = 60.0, progress: StartupProgress | bool = True,
        resources: SimulationResources | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.resources = resources or SimulationResources()
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.connection: FlowerConnection | None = None
        self.progress: StartupProgress | None = (
            StartupProgress() if progress is True else (progress or None)
        )

    def __enter__(self) -> "LocalFederation":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        # Before anything starts: either may refuse.
        if self.resources.on_cluster:
            self.resources.check_reachable()
            ray_env = self.resources.environment()
        else:
            ray_env = ray_environment(self.workdir / RAY_TOKEN_FILE)
        if self.progress is not None:
            self.progress.start("Flower SuperLink")
        port = free_port()
        self.connection = FlowerConnection(self.workdir / "flwr-home", f"127.0.0.1:{port}", insecure=True)
        if self.resources.on_cluster:
            ray_env.update(job_environment(self.connection.home))
        log = self.workdir / "superlink.log"
        with open(log, "ab") as log_file:
            # --insecure: plain HTTP, but bound to loopback and only for this simulation.
            # Ray inherits the environment: SuperLink -> SuperExec -> flwr-simulation -> ray.init.
            self.process = subprocess.Popen(
                [flower_executable("flower-superlink"), "--insecure", "--simulation",
                 "--host", "127.0.0.1", "--port", str(port)],
                env={**self.connection.env, **ray_env},
                stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port("127.0.0.1", port, self.process, self.startup_timeout, log)
        except FlowerError:
            self.stop()
            raise
        if self.progress is not None:
            self.progress.stage(SUBMIT_STAGE)

    def stop(self) -> None:
        """End the SuperLink and every process it spawned."""
        if self.progress is not None:
            self.progress.stop()
        proc, self.process = self.process, None
        stop_tree(proc)
        (self.workdir / RAY_TOKEN_FILE).unlink(missing_ok=True)

    def run(
        self,
        run_config: dict[str, Any],
        num_supernodes: int,
        on_line: Callable[[str], None] | None = None,
        log_path: Path | None = None,
    ) -> RunOutcome:
        """Submit the fedsilo app to ``num_supernodes`` simulated departments."""
        if self.process is None or self.connection is None:
            raise FlowerError("the local SuperLink is not running; call start() first")
        federation = self.resources.federation_config(num_supernodes)
        progress = self.progress
        if progress is None:
            return self.connection.run(run_config, log_path or self.workdir / "flower.log", federation, on_line)
        progress.start(SUBMIT_STAGE)  # already running since start(): only the stage
        where = "on the Ray cluster" if self.resources.on_cluster else "in Ray"
        progress.set_up = f"{int(num_supernodes)} departments {where}, first round"

        def handle(line: str) -> None:
            progress.log_line(line)
            if on_line is not None:
                on_line(line)

        try:
            return self.connection.run(run_config, log_path or self.workdir / "flower.log", federation, handle)
        finally:
            progress.stop()  # the run ended (or failed) before its first progress line
