"""Driving Flower's own tools — ``flower-superlink``, ``flwr run``, ``flwr ls`` — safely.

Both the simulation (a private, loopback SuperLink) and the coordinator (a TLS
SuperLink) submit the fedsilo app the same way: through a named SuperLink
connection in a private ``FLWR_HOME``, streaming Flower's log (to a file, and to a
line handler), then reading the run's final status back, because ``flwr run``
exits 0 even when the run failed.  What the user sees of a run's progress comes
from its events, not from this log (:mod:`fedsilo.server.progress`).

Every process started from here runs with runtime dependency installation and
telemetry off, and processes are ended with their whole descendant tree.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import tomli_w

from fedsilo import __version__

from .config import RUN_CONFIG_DEFAULTS
from .protocol import APP_NAME, APP_PUBLISHER, CLIENTAPP, PROTOCOL_VERSION, SERVERAPP

CONNECTION = "fedsilo"
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


class FlowerError(RuntimeError):
    """A Flower process could not start, or a run could not be submitted."""


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    status: str  # e.g. "finished:completed", "finished:failed"
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


# ----------------------------------------------------------------------------- processes


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
    for name in _LEGACY_GRPC:
        env.pop(name, None)
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1", avoid: Iterable[int] = ()) -> int:
    """A port free on ``host`` now, other than those in ``avoid``.

    ``avoid`` holds ports chosen but not yet bound (e.g. the coordinator's public
    port): the kernel may hand out a port again as soon as its probe is closed.
    """
    avoid = set(avoid)
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid``, read from /proc.

    Flower's SuperExec starts ServerApps and simulations in sessions of their
    own, so a process group does not reach them: the tree does.
    """
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
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        if not any(alive(p) for p in pids):
            return


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_tree(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """End ``proc`` and everything it spawned, then reap it."""
    if proc is None:
        return
    terminate([proc.pid, *descendants(proc.pid)], grace)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def stop_group(pgid: int, grace: float = 10.0) -> None:
    """End what is left of a process group whose leader may already be gone."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry.name))
    members += [child for pid in members for child in descendants(pid)]
    if members:
        terminate(sorted(set(members)), grace)


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Wait until ``proc`` accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerError(f"{Path(str(proc.args[0])).name} exited with code {proc.returncode}; see {log}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FlowerError(f"nothing answered on {host}:{port} within {timeout:.0f} s; see {log}")


def write_runtime_secret(path: Path) -> Path:
    """A fresh SuperExec shared secret (32 random bytes) in a 0600 file.

    Flower signs every ``acquire-task`` on a Runtime API with an HMAC of this
    secret: without it, a local process cannot take a task (and its inputs) in
    place of the executor.  A new secret at every start leaves none stale.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_hex(32).encode("ascii"))
    return path


# Flower starts legacy gRPC Control/Fleet servers on 0.0.0.0 when these are "1":
# never in a fedsilo process.
_LEGACY_GRPC = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


# ----------------------------------------------------------------------------- the app


def write_app(app_dir: Path) -> Path:
    """A minimal Flower app whose components are the installed ``fedsilo`` package.

    Works the same from a source checkout or a wheel install: the FAB carries only
    ``pyproject.toml``; the code is imported from the environment.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {
            "name": APP_NAME,
            "version": __version__,
            "description": "fedsilo: departments train with DP-SGD and keep privacy ledgers",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": APP_PUBLISHER,
                    "components": {"serverapp": SERVERAPP, "clientapp": CLIENTAPP},
                    "config": dict(RUN_CONFIG_DEFAULTS),
                }
            },
            # Departments check this, and never run the app's code (there is none).
            "fedsilo": {"protocol": PROTOCOL_VERSION},
        },
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return app_dir


def toml_value(value: Any) -> str:
    """One ``--node-config`` value in TOML syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def config_arg(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


# ----------------------------------------------------------------------------- connections


class FlowerConnection:
    """A named SuperLink connection in a private ``FLWR_HOME``.

    Parameters
    ----------
    home : Path
        Folder used as ``FLWR_HOME`` (config, installed FABs).
    address : str
        ``host:port`` of the SuperLink.
    root_certificates : Path, optional
        CA certificate to trust; required unless ``insecure``.
    insecure : bool
        Plain HTTP: only for a SuperLink bound to loopback (local simulation).
    """

    def __init__(
        self, home: Path, address: str, root_certificates: Path | None = None, insecure: bool = False
    ) -> None:
        if not insecure and root_certificates is None:
            raise ValueError("a TLS connection needs root_certificates (the federation's ca.crt)")
        self.home = Path(home)
        self.address = address
        self.home.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {"address": address}
        if insecure:
            entry["insecure"] = True
        else:
            # Flower passes this path on to other processes: it must be absolute.
            entry["root-certificates"] = str(Path(root_certificates).resolve())  # type: ignore[arg-type]
        config = {"superlink": {"default": CONNECTION, CONNECTION: entry}}
        (self.home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
        self.env = offline_env({"FLWR_HOME": str(self.home)})

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run one ``flwr`` command against this connection."""
        return subprocess.run(
            [flower_executable("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def run(
        self,
        run_config: dict[str, Any],
        log_path: Path,
        federation_config: str | None = None,
        on_line: Callable[[str], None] | None = None,
        app_dir: Path | None = None,
    ) -> RunOutcome:
        """Submit the fedsilo app (or the app in ``app_dir``), stream its log to ``log_path``,
        return its final status."""
        own_app = app_dir is None
        if app_dir is None:
            app_dir = write_app(Path(tempfile.mkdtemp(prefix="app-", dir=self.home)))
        # A TOML file, not KEY=VALUE pairs: Flower's pair parser cannot carry quotes
        # (the data schema is JSON).  It sits outside the app folder, off the FAB.
        overrides = self.home / f"{app_dir.name}-run-config.toml"
        overrides.write_text(tomli_w.dumps(run_config), encoding="utf-8")
        command = [flower_executable("flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(overrides)]
        if federation_config:
            command += ["--federation-config", federation_config]
        command.append("--stream")
        run_id = ""
        with open(log_path, "w", encoding="utf-8") as log_file:
            proc = subprocess.Popen(command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                if not run_id and "Successfully started run" in line:
                    run_id = line.rsplit(" ", 1)[-1].strip()
                if on_line:
                    on_line(line.rstrip("\n"))
            proc.wait()
        if own_app:
            shutil.rmtree(app_dir, ignore_errors=True)
        overrides.unlink(missing_ok=True)
        if not run_id:
            raise FlowerError(f"`flwr run` did not start a run (exit {proc.returncode}); see {log_path}")
        return RunOutcome(run_id, self.status(run_id), log_path)

    def status(self, run_id: str, timeout: float = 30.0) -> str:
        """The run's status as ``flwr ls`` reports it."""
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            result = self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json", timeout=60)
            try:
                runs = json.loads(result.stdout).get("runs", [])
                status = str(runs[0]["status"]) if runs else "unknown"
            except (ValueError, KeyError, IndexError):
                status = "unknown"
            if status.startswith("finished"):
                return status
            time.sleep(0.5)
        return status
