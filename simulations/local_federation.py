"""Run the fedsilo Flower app on Flower's Simulation Engine, on this machine only.

``flwr run`` on its own starts a shared local SuperLink on fixed ports, leaves it
running, and exits 0 even when the run failed.  :class:`LocalFederation` instead
starts a private SuperLink in simulation mode on a free loopback port (with its
own ``FLWR_HOME``, so the user's Flower configuration is untouched), submits the
run with ``flwr run --stream``, reads the run's final status back with
``flwr ls --format json``, and stops the SuperLink — and everything it spawned —
by process group, whatever happened.

The SuperLink's API is plain HTTP on 127.0.0.1: it never leaves the machine, and
every process started here gets runtime dependency installation and telemetry
turned off.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tomli_w

from fedsilo import __version__
from fedsilo.shared.config import RUN_CONFIG_DEFAULTS

CONNECTION = "fedsilo-local"
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


class FederationError(RuntimeError):
    """The local federation could not start or the run did not complete."""


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    status: str  # e.g. "finished:completed", "finished:failed"
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def flower_executable(name: str) -> str:
    """A Flower console script from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def offline_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with Flower's network-reaching features off.

    This interpreter's ``bin`` folder goes first on PATH: Flower starts its own
    helpers (``flower-superexec``, ``flwr-simulation``) by name, and a venv that
    was not activated must still be the one used.
    """
    env = os.environ.copy()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(OFFLINE_ENV)
    env.update(extra or {})
    return env


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid``, read from /proc (children first seen first)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def terminate(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            return


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_app(app_dir: Path) -> Path:
    """A minimal Flower app whose components are the installed ``fedsilo`` package.

    Works the same from a source checkout or a wheel install: the FAB carries only
    ``pyproject.toml``; the code is imported from the environment.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {
            "name": "fedsilo-simulation",
            "version": __version__,
            "description": "fedsilo departments on Flower's Simulation Engine",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedsilo",
                    "components": {
                        "serverapp": "fedsilo.server.app:app",
                        "clientapp": "fedsilo.client.app:app",
                    },
                    "config": dict(RUN_CONFIG_DEFAULTS),
                }
            }
        },
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return app_dir


def _toml_value(value: Any) -> str:
    """One ``--run-config`` value in TOML syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


class LocalFederation:
    """A private simulation SuperLink; use as a context manager.

    Parameters
    ----------
    workdir : Path
        Folder for the SuperLink's ``FLWR_HOME``, log and the generated app.
    startup_timeout : float
        Seconds to wait for the SuperLink to answer.
    """

    def __init__(self, workdir: Path, startup_timeout: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.startup_timeout = startup_timeout
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    def __enter__(self) -> "LocalFederation":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "superlink": {
                "default": CONNECTION,
                CONNECTION: {"address": f"127.0.0.1:{self.port}", "insecure": True},
            }
        }
        (home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
        self.env = offline_env({"FLWR_HOME": str(home)})
        log_file = open(self.workdir / "superlink.log", "ab")
        superlink = flower_executable("flower-superlink")
        # --insecure: plain HTTP, but bound to loopback and only for this simulation.
        command = [superlink, "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends all it spawns
        )
        log_file.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FederationError(
                    f"flower-superlink exited with code {self.process.returncode}; "
                    f"see {self.workdir / 'superlink.log'}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise FederationError(f"flower-superlink did not answer on 127.0.0.1:{self.port} in time")

    def stop(self) -> None:
        """End the SuperLink and every process it spawned (simulation, Ray).

        Flower's SuperExec starts the simulation in a session of its own, so the
        process group is not enough: the whole descendant tree is collected first.
        """
        proc, self.process = self.process, None
        if proc is None:
            return
        tree = [proc.pid, *descendants(proc.pid)]
        terminate(tree)
        try:
            proc.wait(timeout=5)  # reap it
        except subprocess.TimeoutExpired:
            pass

    def run(
        self,
        run_config: dict[str, Any],
        num_supernodes: int,
        cpus_per_department: int = 1,
        on_line: Callable[[str], None] | None = None,
        log_path: Path | None = None,
    ) -> RunOutcome:
        """Submit the fedsilo app, stream its log, and return its final status."""
        if self.process is None:
            raise FederationError("the local SuperLink is not running; call start() first")
        app_dir = write_app(Path(tempfile.mkdtemp(prefix="app-", dir=self.workdir)))
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        federation = (
            f"num-supernodes={int(num_supernodes)} client-resources-num-cpus={int(cpus_per_department)} "
            f"init-args-num-cpus={os.cpu_count() or 1}"
        )
        command = [
            flower_executable("flwr"), "run", str(app_dir), CONNECTION,
            "--run-config", overrides, "--federation-config", federation, "--stream",
        ]
        log_path = log_path or self.workdir / "flower.log"
        run_id = ""
        with open(log_path, "w", encoding="utf-8") as log_file:
            proc = subprocess.Popen(
                command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                if not run_id and "Successfully started run" in line:
                    run_id = line.rsplit(" ", 1)[-1].strip()
                if on_line:
                    on_line(line.rstrip("\n"))
            proc.wait()
        if not run_id:
            raise FederationError(f"`flwr run` did not start a run (exit {proc.returncode}); see {log_path}")
        return RunOutcome(run_id, self.status(run_id), log_path)

    def status(self, run_id: str, timeout: float = 30.0) -> str:
        """The run's status as ``flwr ls`` reports it (``flwr run`` exits 0 regardless)."""
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            result = subprocess.run(
                [flower_executable("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
                env=self.env, capture_output=True, text=True, timeout=60,
            )
            try:
                runs = json.loads(result.stdout).get("runs", [])
                status = str(runs[0]["status"]) if runs else "unknown"
            except (ValueError, KeyError, IndexError):
                status = "unknown"
            if status.startswith("finished"):
                return status
            time.sleep(0.5)
        return status
