"""A private simulation SuperLink on this machine, for ``fedsilo simulate``.

``flwr run`` on its own starts a shared local SuperLink on fixed ports and leaves
it running.  :class:`LocalFederation` instead starts one in simulation mode on a
free loopback port, with its own ``FLWR_HOME`` (the user's Flower configuration
is untouched), submits runs through :class:`~fedsilo.shared.flower_cli.FlowerConnection`,
and stops the SuperLink and everything it spawned (simulation, Ray), whatever
happened.  Its API is plain HTTP bound to 127.0.0.1: it never leaves the machine.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Callable

from fedsilo.shared.flower_cli import (
    FlowerConnection,
    FlowerError,
    RunOutcome,
    flower_executable,
    free_port,
    stop_tree,
    wait_for_port,
)



class LocalFederation:
    """A private simulation SuperLink; use as a context manager.

    Parameters
    ----------
    workdir : Path
        Folder for the SuperLink's ``FLWR_HOME`` and log.
    startup_timeout : float
        Seconds to wait for the SuperLink to answer.
    """

    def __init__(self, workdir: Path, startup_timeout: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.connection: FlowerConnection | None = None

    def __enter__(self) -> "LocalFederation":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        port = free_port()
        self.connection = FlowerConnection(self.workdir / "flwr-home", f"127.0.0.1:{port}", insecure=True)
        log = self.workdir / "superlink.log"
        with open(log, "ab") as log_file:
            # --insecure: plain HTTP, but bound to loopback and only for this simulation.
            self.process = subprocess.Popen(
                [flower_executable("flower-superlink"), "--insecure", "--simulation",
                 "--host", "127.0.0.1", "--port", str(port)],
                env=self.connection.env, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port("127.0.0.1", port, self.process, self.startup_timeout, log)
        except FlowerError:
            self.stop()
            raise

    def stop(self) -> None:
        """End the SuperLink and every process it spawned."""
        proc, self.process = self.process, None
        stop_tree(proc)

    def run(
        self,
        run_config: dict[str, Any],
        num_supernodes: int,
        cpus_per_department: int = 1,
        on_line: Callable[[str], None] | None = None,
        log_path: Path | None = None,
    ) -> RunOutcome:
        """Submit the fedsilo app to ``num_supernodes`` simulated departments."""
        if self.process is None or self.connection is None:
            raise FlowerError("the local SuperLink is not running; call start() first")
        federation = (
            f"num-supernodes={int(num_supernodes)} client-resources-num-cpus={int(cpus_per_department)} "
            f"init-args-num-cpus={os.cpu_count() or 1}"
        )
        return self.connection.run(
            run_config, log_path or self.workdir / "flower.log", federation, on_line
        )
