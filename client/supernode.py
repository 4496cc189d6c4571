"""A department in a deployment: ``flower-supernode`` over TLS with its own identity.

Everything that can be checked is checked before anything is sent: the CA file,
the department's private key (EC P-384, OpenSSH, mode 0600), its data table, its
ledger, and a TLS handshake proving the coordinator's certificate chains to the
CA this department trusts.  The ledger and the budget stay on this host.

The SuperNode runs with ``--isolation process``: it starts no ClientApp of its
own.  Its loopback Runtime API is protected by a SuperExec shared secret, and
the department's executor (:mod:`fedsilo.client.executor`) answers its tasks
with the fedsilo installed here.  The SuperNode is given no node config: the
data path, ledger and identity key go only to the executor, in this process.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedsilo.certs.authority import CertError, load_certificate, load_department_key
from fedsilo.shared.data import count_rows, load_table
from fedsilo.shared.pretrained import schema_with_own_tokenizer
from fedsilo.shared.schema import DataSchema
from fedsilo.shared.flower_cli import flower_executable, free_port, offline_env, write_runtime_secret
from fedsilo.shared.ledger import PrivacyLedger, find_identity_ledger
from fedsilo.shared.signing import Signer

from .policy import DepartmentPolicy


class DepartmentStartError(RuntimeError):
    """The department cannot start; the message says what to fix."""


@dataclass(frozen=True)
class DepartmentNode:
    name: str
    coordinator: str  # host:port
    ca: Path
    key: Path
    data: Path
    label_column: str
    ledger: Path
    policy: DepartmentPolicy  # the department's own: the runs only ask
    local_port: int | None = None
    feature_columns: tuple[str, ...] = ()
    schema: Path | None = None  # the coordinator's published schema, to check the table against before joining

    @property
    def home(self) -> Path:
        """Flower's working folder for this department (installed app bundles)."""
        return self.ledger / ".flower"

    def preflight(self, timeout: float = 10.0) -> int:
        """Validate everything locally and the coordinator's certificate; returns rows of data."""
        try:
            load_certificate(self.ca)
            load_department_key(self.key)
        except CertError as err:
            raise DepartmentStartError(str(err)) from None
        rows = count_rows(self.data, self.label_column, self.feature_columns)  # DataError names file/column
        over = self.policy.limits.check_table(rows)
        if over:
            raise DepartmentStartError("; ".join(over))
        if self.schema is not None:  # encoded here, on this host, as every run with that schema will
            schema = DataSchema.load(self.schema).with_label_column(self.label_column)
            load_table(self.data, self.label_column, schema=schema_with_own_tokenizer(schema, self.policy.base_models))
        for factory in self.policy.models:
            from fedsilo.shared.model_factory import load_factory  # torch: only for a policy that allows a factory

            load_factory(factory)  # ModelError: an allowed factory must be installed here
        self.policy.check_records(rows)  # PolicyError: δ must be below 1/records
        self.ledger.mkdir(parents=True, exist_ok=True, mode=0o700)
        # LedgerError if unreadable, broken, forked or not signed by this department's key
        PrivacyLedger(self.ledger_file, self.name, Signer.from_file(self.key))
        check_coordinator_certificate(self.coordinator, self.ca, timeout)
        return rows

    @property
    def identity(self) -> str:
        """The key fingerprint the ledger belongs to."""
        return Signer.from_file(self.key).fingerprint

    @property
    def ledger_file(self) -> Path:
        """This identity's ledger in --ledger, whatever the file or the department is called."""
        return find_identity_ledger(self.ledger, self.identity, self.name)

    @property
    def secret(self) -> Path:
        """The SuperExec shared secret between this SuperNode and the executor (0600)."""
        return self.home / "runtime.secret"

    def local_config(self) -> dict:
        """The department's own settings, for the installed ClientApp in the executor."""
        config = {
            "department": self.name,
            "data-path": str(self.data.resolve()),
            "label-column": self.label_column,
            "ledger-dir": str(self.ledger.resolve()),
            "identity-key": str(self.key.resolve()),  # signs the ledger, in the executor's process
            "policy": self.policy.to_json(),
        }
        return config

    def command(self, port: int) -> list[str]:
        return [
            flower_executable("flower-supernode"),
            "--superlink", self.coordinator,
            "--root-certificates", str(self.ca.resolve()),
            "--auth-supernode-private-key", str(self.key.resolve()),
            # No ClientApp process of Flower's: the department's executor takes the tasks.
            "--isolation", "process",
            "--superexec-auth-secret-file", str(self.secret.resolve()),
            # Each SuperNode on a host needs its own local port (loopback only).
            "--host", "127.0.0.1",
            "--port", str(port),
        ]

    def launch(self) -> tuple[subprocess.Popen, str]:
        """Start the SuperNode with a fresh secret; returns it and its Runtime API address."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)
        write_runtime_secret(self.secret)
        port = self.local_port or free_port()
        proc = subprocess.Popen(
            self.command(port),
            env=offline_env({"FLWR_HOME": str(self.home.resolve())}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        return proc, f"127.0.0.1:{port}"


def check_coordinator_certificate(address: str, ca: Path, timeout: float = 10.0) -> None:
    """TLS handshake with the coordinator, trusting only ``ca``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DepartmentStartError(f"coordinator address '{address}' must be HOST:PORT")
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host.strip("[]")):
                return
    except ssl.SSLCertVerificationError as err:
        raise DepartmentStartError(
            f"the coordinator at {address} presented a certificate that '{ca}' does not "
            f"vouch for ({err.verify_message}); get the federation's ca.crt from the "
            "platform team, and check that the address is the coordinator's"
        ) from None
    except ssl.SSLError as err:
        raise DepartmentStartError(
            f"TLS with the coordinator at {address} failed ({err.reason}); is it a fedsilo coordinator?"
        ) from None
    except OSError as err:
        raise DepartmentStartError(
            f"the coordinator at {address} is unreachable ({err.strerror or err}); "
            "check the address and that the coordinator is running"
        ) from None


def explain_exit(output: str, name: str) -> str:
    """Turn flower-supernode's last words into what the department should do."""
    if "No SuperNode found with the given public key" in output or "Failed to activate SuperNode" in output:
        return (
            f"the coordinator refused department '{name}': its public key is not registered, or the "
            "coordinator still counts an earlier start of it online (for up to a minute after a crash). "
            f"Ask the platform team to run `fedsilo coordinator register {name}` with {name}.pub, "
            "or start it again in a minute"
        )
    if "CERTIFICATE_VERIFY_FAILED" in output:
        return "the coordinator's certificate is not signed by this --ca; use the federation's ca.crt"
    if "Unable to parse the private key" in output:
        return "the private key could not be read by Flower; create it with `fedsilo certs add-department`"
    lines = [line for line in output.splitlines() if line.strip()]
    return "flower-supernode stopped: " + (" | ".join(lines[-3:]) if lines else "no output")
