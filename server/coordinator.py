"""The coordinator in a deployment: a loopback SuperLink behind nginx, as one unit.

``start`` runs three processes in one process group, all on this host:

* ``flower-superlink`` on **127.0.0.1** only (TLS with the coordinator's
  certificate, SuperNode authentication, a persistent database so registered
  departments survive a restart, ``--isolation process`` and a SuperExec shared
  secret on its Runtime API);
* ``flower-superexec``, which runs the ServerApp tasks, signing its requests with
  that secret;
* nginx (:mod:`fedsilo.server.proxy`) on the public address, serving the
  departments' Fleet routes and nothing else.

It records where Control listens in ``STATE/coordinator.json``: ``register``,
``departments`` and ``run`` read it and talk to Control on loopback only.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedsilo.certs.authority import CertPaths, check_coordinator
from fedsilo.shared.flower_cli import (
    CONNECTION,
    FlowerConnection,
    FlowerError,
    RunOutcome,
    alive,
    flower_executable,
    free_port,
    offline_env,
    stop_group,
    stop_tree,
    wait_for_port,
    write_runtime_secret,
)

from .proxy import FleetProxy, ProxyError

STATE_FILE = "coordinator.json"
LOOPBACK = "127.0.0.1"


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port), with a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address '{address}' must be HOST:PORT, e.g. 0.0.0.0:9443")
    return host.strip("[]"), int(port)



def superexec_home(state: Path) -> Path:
    """The FLWR_HOME that `coordinator start --state STATE` gives its SuperExec (where run settings are kept)."""
    return (Path(state).expanduser() / "flwr-home").resolve()

class CoordinatorStateError(FileNotFoundError):
    """No running coordinator is recorded in the state folder."""


@dataclass(frozen=True)
class Coordinator:
    """One coordinator: its certificate folder, public address and state folder.

    Parameters
    ----------
    certs : Path
        Folder from ``fedsilo certs init`` (ca.crt, coordinator.crt/.key).
    address : str
        Public ``HOST:PORT`` the departments reach (served by nginx).
    state : Path
        Database, logs, proxy configuration, the SuperExec secret and
        ``coordinator.json``.
    control_port : int, optional
        The SuperLink's loopback port (Control, Runtime, Fleet); free by default.
    """

    certs: Path
    address: str
    state: Path
    control_port: int | None = None

    @property
    def database(self) -> Path:
        return self.state / "superlink.db"

    @property
    def log(self) -> Path:
        return self.state / "superlink.log"

    @property
    def secret(self) -> Path:
        return self.state / "superexec.secret"

    @property
    def record(self) -> Path:
        return self.state / STATE_FILE

    def superlink_command(self, port: int) -> list[str]:
        paths = CertPaths(Path(self.certs).resolve())
        return [
            flower_executable("flower-superlink"),
            "--ssl-ca-certfile", str(paths.ca_cert),
            "--ssl-certfile", str(paths.coordinator_cert),
            "--ssl-keyfile", str(paths.coordinator_key),
            "--enable-supernode-auth",
            "--database", str(self.database.resolve()),
            "--isolation", "process",
            "--superexec-auth-secret-file", str(self.secret.resolve()),
            "--disable-runtime-dependency-installation",
            "--host", LOOPBACK,
            "--port", str(port),
        ]

    def superexec_command(self, port: int, parent: int) -> list[str]:
        return [
            flower_executable("flower-superexec"),
            "--runtime-api-address", f"{LOOPBACK}:{port}",
            "--root-certificates", str(CertPaths(Path(self.certs).resolve()).ca_cert),
            "--superexec-auth-secret-file", str(self.secret.resolve()),
            "--parent-pid", str(parent),
        ]

    def proxy(self, port: int) -> FleetProxy:
        host, public_port = split_address(self.address)
        paths = CertPaths(Path(self.certs).resolve())
        return FleetProxy(self.state / "proxy", host, public_port, port,
                          paths.coordinator_cert, paths.coordinator_key, paths.ca_cert)

    def launch(self, startup_timeout: float = 60.0) -> "CoordinatorUnit":
        """Check everything, start the three processes, wait until the public port works.

        Raises
        ------
        CertError, ValueError, ProxyError, FlowerError
            With a message that says what to fix; nothing is left running.
        """
        check_coordinator(self.certs)
        host, public_port = split_address(self.address)
        _refuse_running(self.record)
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)  # the secret, the database and the logs are the operators' alone
        if self.control_port == public_port:
            raise ValueError(f"--control-port {public_port} is the public port of --address {self.address}; "
                             "choose another (or leave it out for a free one)")
        port = self.control_port or free_port(LOOPBACK, avoid={public_port})
        proxy = self.proxy(port)
        proxy.write()
        proxy.check()  # before anything starts: a clear error for a missing binary or a bad config
        _refuse_busy(host, public_port)
        write_runtime_secret(self.secret)
        env = offline_env({
            "FLWR_HOME": str(superexec_home(self.state)),
            # the ServerApp task starts within 0.2 s of a submitted run (default 1 s)
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        })
        unit = CoordinatorUnit(self)
        try:
            with open(self.log, "ab") as log:
                # The leader of a new process group that the SuperExec and nginx join.
                unit.superlink = subprocess.Popen(self.superlink_command(port), env=env, stdout=log,
                                                  stderr=subprocess.STDOUT, process_group=0)
            wait_for_port(LOOPBACK, port, unit.superlink, startup_timeout, self.log)
            with open(self.state / "superexec.log", "ab") as log:
                unit.superexec = subprocess.Popen(
                    self.superexec_command(port, unit.superlink.pid), env=env, stdout=log,
                    stderr=subprocess.STDOUT, process_group=unit.superlink.pid,
                )
            with open(proxy.folder / "nginx.out", "ab") as log:
                unit.proxy = proxy.launch(unit.superlink.pid, stdout=log)
            wait_for_port(_dial(host), public_port,
                          unit.proxy, startup_timeout, proxy.error_log)
            probe_fleet(self.address, CertPaths(self.certs).ca_cert)
            for name, proc in (("flower-superexec", unit.superexec), ("flower-superlink", unit.superlink)):
                if proc.poll() is not None:
                    raise FlowerError(f"{name} exited with code {proc.returncode}; see {self.state}")
        except BaseException:
            unit.stop()
            raise
        self.record.write_text(json.dumps({
            "control": f"{LOOPBACK}:{port}",
            "public": self.address,
            "ca": str(CertPaths(Path(self.certs).resolve()).ca_cert),
            "pids": {"superlink": unit.superlink.pid, "superexec": unit.superexec.pid, "proxy": unit.proxy.pid},
            "started": time.time(),
        }, indent=2), encoding="utf-8")
        return unit


@dataclass
class CoordinatorUnit:
    """The running SuperLink, SuperExec and proxy; stopped together."""

    coordinator: Coordinator
    superlink: subprocess.Popen | None = None
    superexec: subprocess.Popen | None = None
    proxy: subprocess.Popen | None = None

    def wait(self) -> tuple[str, int | None]:
        """Block until one of the three exits; returns its name and exit code."""
        named = [("nginx", self.proxy), ("flower-superlink", self.superlink), ("flower-superexec", self.superexec)]
        while True:
            for name, proc in named:
                if proc is not None and proc.poll() is not None:
                    return name, proc.returncode
            time.sleep(0.5)

    def stop(self, grace: float = 10.0) -> None:
        """Proxy first (no new requests), then the SuperExec and its ServerApps, then the SuperLink."""
        for proc in (self.proxy, self.superexec, self.superlink):
            if proc is not None:
                stop_tree(proc, grace)
        if self.superlink is not None:
            stop_group(self.superlink.pid, grace)
        self.coordinator.record.unlink(missing_ok=True)


def _dial(host: str) -> str:
    """The address to connect to for a listener on ``host`` (a wildcard is reached on loopback)."""
    return LOOPBACK if host in ("0.0.0.0", "::") else host


def _refuse_running(record: Path) -> None:
    """One coordinator per state folder: two SuperLinks must never share a database."""
    try:
        pids = json.loads(record.read_text(encoding="utf-8")).get("pids", {})
    except (OSError, ValueError):
        return  # none recorded, or a record left by a crash: nothing runs from here
    running = {name: pid for name, pid in pids.items() if alive(int(pid))}
    if running:
        raise ValueError(
            f"a coordinator from '{record.parent}' is already running ({', '.join(f'{n} pid {p}' for n, p in running.items())}); "
            "stop it first, or give this one another --state folder"
        )


def _refuse_busy(host: str, port: int) -> None:
    """A clear error when the public port is taken (nginx's own is cryptic)."""
    probe = _dial(host)
    with socket.socket(socket.AF_INET6 if ":" in probe else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        if sock.connect_ex((probe, port)) == 0:
            raise ValueError(f"{host}:{port} is already in use; stop what listens there or choose another --address")


def probe_fleet(address: str, ca: Path, timeout: float = 10.0) -> None:
    """One unauthenticated Fleet call through the proxy: the SuperLink, not nginx, must answer.

    A 502/504 means nginx is up but cannot reach (or verify) the SuperLink.
    """
    host, port = split_address(address)
    target = _dial(host)
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        status = _post_status(context, target, port, "/v1/fleet/send-node-heartbeat")
        if status and status not in (502, 503, 504):
            return
        time.sleep(0.3)
    raise ProxyError(f"nginx on {address} could not reach the SuperLink (HTTP {status}); see the proxy's error.log")


def _post_status(context: ssl.SSLContext, host: str, port: int, path: str) -> int:
    try:
        conn = http.client.HTTPSConnection(host, port, context=context, timeout=5)
        conn.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        status = conn.getresponse().status
        conn.close()
        return status
    except (OSError, http.client.HTTPException):
        return 0


def control_endpoint(state: Path) -> dict:
    """Where the coordinator started from ``state`` serves Control (loopback), or a clear error."""
    record = Path(state) / STATE_FILE
    if not record.exists():
        raise CoordinatorStateError(
            f"no running coordinator is recorded in '{state}' ({STATE_FILE} is missing); start it on "
            f"this host with `fedsilo coordinator start --state {state}`, or pass the --state folder it uses"
        )
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
        host, _ = split_address(str(info["control"]))
    except (ValueError, KeyError) as err:
        raise CoordinatorStateError(f"'{record}' is damaged ({err}); restart the coordinator") from None
    if host != LOOPBACK:
        raise CoordinatorStateError(f"'{record}' names a Control endpoint off loopback ({info['control']}); refusing")
    pid = int(info.get("pids", {}).get("superlink", 0))
    if pid and not alive(pid):
        raise CoordinatorStateError(
            f"the coordinator recorded in '{state}' is not running (SuperLink pid {pid} is gone); "
            f"start it with `fedsilo coordinator start --state {state}`"
        )
    return info


def connect(certs: Path, state: Path, home: Path | None = None) -> FlowerConnection:
    """A Control connection to the coordinator on this host's loopback, trusting only the federation CA."""
    ca = CertPaths(Path(certs)).ca_cert
    if not ca.exists():
        raise FileNotFoundError(f"'{ca}' does not exist; run `fedsilo certs init` first")
    info = control_endpoint(state)
    if home is None:
        home = Path(tempfile.mkdtemp(prefix="fedsilo-flwr-"))
        atexit.register(shutil.rmtree, home, True)
    return FlowerConnection(Path(home), str(info["control"]), root_certificates=ca)


def registered(connection: FlowerConnection) -> list[dict]:
    """Departments (SuperNodes) the coordinator knows: node id and status."""
    result = connection.flwr("supernode", "list", CONNECTION, "--format", "json")
    try:
        payload = json.loads(result.stdout)
    except ValueError:
        raise FlowerError(_flwr_problem(result, connection.address)) from None
    if not payload.get("success", True):
        raise FlowerError(payload.get("error-message", _flwr_problem(result, connection.address)))
    return [
        {"node_id": n.get("node-id"), "status": n.get("status", ""), "online_at": n.get("online-at", "")}
        for n in payload.get("nodes", [])
    ]


def register(connection: FlowerConnection, name: str, public_key: Path) -> str:
    """Register one department's public key under its name; returns what happened."""
    if not public_key.exists():
        raise FileNotFoundError(f"public key '{public_key}' does not exist; run `fedsilo certs add-department {name}`")
    result = connection.flwr("supernode", "register", str(public_key.resolve()), CONNECTION, "--name", name, "--format", "json")
    try:
        payload = json.loads(result.stdout)
    except ValueError:
        raise FlowerError(_flwr_problem(result, connection.address)) from None
    if payload.get("success"):
        return f"registered as node {payload.get('node-id', '?')}"
    message = str(payload.get("error-message", ""))
    if "already in use" in message:
        return "already registered"
    raise FlowerError(f"could not register '{name}': {message or _flwr_problem(result, connection.address)}")


def submit(
    connection: FlowerConnection,
    run_config: dict[str, Any],
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Submit the fedsilo app to the coordinator and wait for its final status."""
    return connection.run(run_config, log_path, on_line=on_line)


def _flwr_problem(result: subprocess.CompletedProcess, address: str) -> str:
    text = (result.stdout + result.stderr).strip()
    if "unavailable" in text.lower():
        return (
            f"the coordinator's Control API at {address} (this host's loopback) is unreachable or its "
            "certificate is not trusted by this ca.crt; check that `fedsilo coordinator start` runs on "
            "this host with the same --state, and that --certs is the federation's folder"
        )
    return text.splitlines()[-1] if text else f"flwr exited with code {result.returncode}"
