"""The coordinator in a deployment: a TLS SuperLink that admits registered departments.

``start`` runs ``flower-superlink`` with the federation's certificate, SuperNode
authentication and a persistent database (registered departments survive a
restart, and connected departments reconnect).  ``register`` admits a
department's public key under its name.  ``submit`` sends the fedsilo app to the
SuperLink through a connection that trusts only the federation CA.
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedsilo.certs.authority import CertPaths, check_coordinator
from fedsilo.shared.flower_cli import (
    CONNECTION,
    FlowerConnection,
    FlowerError,
    RunOutcome,
    flower_executable,
    offline_env,
)


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port), with a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address '{address}' must be HOST:PORT, e.g. 0.0.0.0:9443")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Coordinator:
    """One coordinator: its certificate folder, listening address and state folder."""

    certs: Path
    address: str
    state: Path

    @property
    def database(self) -> Path:
        return self.state / "superlink.db"

    @property
    def log(self) -> Path:
        return self.state / "superlink.log"

    def command(self) -> list[str]:
        paths = CertPaths(Path(self.certs).resolve())
        host, port = split_address(self.address)
        return [
            flower_executable("flower-superlink"),
            "--ssl-ca-certfile", str(paths.ca_cert),
            "--ssl-certfile", str(paths.coordinator_cert),
            "--ssl-keyfile", str(paths.coordinator_key),
            "--enable-supernode-auth",
            "--database", str(self.database.resolve()),
            "--host", host,
            "--port", str(port),
        ]

    def launch(self, stdout: Any = None) -> subprocess.Popen:
        """Check the certificates, then start the SuperLink (its own session)."""
        check_coordinator(self.certs)
        self.state.mkdir(parents=True, exist_ok=True)
        env = offline_env({"FLWR_HOME": str((self.state / "flwr-home").resolve())})
        return subprocess.Popen(
            self.command(), env=env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True
        )


def connect(certs: Path, address: str, home: Path | None = None) -> FlowerConnection:
    """A control connection to the coordinator that trusts only the federation CA."""
    ca = CertPaths(Path(certs)).ca_cert
    if not ca.exists():
        raise FileNotFoundError(f"'{ca}' does not exist; run `fedsilo certs init` first")
    split_address(address)
    if home is None:
        home = Path(tempfile.mkdtemp(prefix="fedsilo-flwr-"))
        atexit.register(shutil.rmtree, home, True)
    return FlowerConnection(Path(home), address, root_certificates=ca)


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
            f"the coordinator at {address} is unreachable or its certificate is not trusted "
            "by this ca.crt; check that it runs and that --address and --certs are right"
        )
    return text.splitlines()[-1] if text else f"flwr exited with code {result.returncode}"
