"""A real deployment on loopback, for the tests: a coordinator and departments as real processes.

Everything goes through the ``fedsilo`` CLI, as an operator would type it; every
process is ended by its PID (and its descendants), even when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from sklearn.datasets import load_digits

from fedsilo.shared.flower_cli import descendants, free_port, offline_env, terminate

FEDSILO = [sys.executable, "-m", "fedsilo"]

# A row of `fedsilo coordinator departments`: node id, status, online since.
ONLINE_ROW = re.compile(r"^\W*\d+\W+online\W", re.MULTILINE)


def online(departments_output: str) -> int:
    """How many departments `fedsilo coordinator departments` shows online.

    Rows, not the word: the table's header ("online since") has it too, and counting it
    let a wait for N departments end at N - 1, and a wait for one to go offline never end.
    """
    return len(ONLINE_ROW.findall(departments_output))


def cli(*args, timeout=300):
    return subprocess.run([*FEDSILO, *args], capture_output=True, text=True, timeout=timeout, env=offline_env())


def spawn(args, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    proc = subprocess.Popen([*FEDSILO, *args], stdout=handle, stderr=subprocess.STDOUT, env=offline_env())
    handle.close()
    return proc


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, grace: float = 60.0) -> None:
    """End ``proc`` and everything under it: SIGKILL to the whole tree, or a clean stop.

    A clean stop signals ``proc`` alone and waits (up to ``grace`` seconds) for it to end what
    it started: a ``fedsilo department start`` then stops its SuperNode, which tells the
    coordinator it leaves and is counted offline at once.  SIGTERM to the whole tree at once
    reaches that SuperNode twice (from here and from its parent), the second signal cuts its
    goodbye short, and the coordinator counts it online until its heartbeat lapses (~2 min).
    Whatever is left after that (the tree was noted first) is ended by its PID.
    """
    tree = [proc.pid, *descendants(proc.pid)]
    if sig == signal.SIGKILL:
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    else:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    terminate(tree)
    proc.wait(timeout=10)


def digits_tables(root: Path, departments: tuple[str, ...]) -> dict[str, Path]:
    """The coordinator's held-out table and one table per department (CSV, and Parquet for the second)."""
    bunch = load_digits()
    frame = pd.DataFrame(bunch.data, columns=[f"px{i}" for i in range(64)])
    frame["digit"] = bunch.target
    frame = frame.sample(frac=1, random_state=0).reset_index(drop=True)
    data = {"test": root / "test.csv"}
    frame.iloc[:360].to_csv(data["test"], index=False)
    rest = frame.iloc[360:]
    share = len(rest) // max(len(departments), 1)
    for i, name in enumerate(departments):
        part = rest.iloc[i * share : (i + 1) * share]
        if i == 1:
            data[name] = root / f"{name}.parquet"
            part.to_parquet(data[name], index=False)
        else:
            data[name] = root / f"{name}.csv"
            part.to_csv(data[name], index=False)
    return data


class Federation(dict):
    """Paths and processes of one loopback federation."""

    def control(self, *args, timeout=300):
        """A ``fedsilo coordinator`` command run on the coordinator host (it has the state folder)."""
        return cli("coordinator", *args, "--certs", str(self["certs"]), "--address", self["address"],
                   "--state", str(self["state"]), timeout=timeout)

    def start_coordinator(self, timeout: float = 300.0):
        """Start ``fedsilo coordinator start``; wait until it serves (``timeout`` bounds a hang only)."""
        began = time.time()
        self["coordinator"] = spawn(
            ["coordinator", "start", "--certs", str(self["certs"]), "--address", self["address"], "--state", str(self["state"])],
            self["root"] / "coordinator.log",
        )
        record = self["state"] / "coordinator.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # written once the proxy forwards to the SuperLink
            if self["coordinator"].poll() is not None:
                raise AssertionError((self["root"] / "coordinator.log").read_text())
            try:
                info = json.loads(record.read_text())
                if info["started"] >= began:
                    return info
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        raise AssertionError((self["root"] / "coordinator.log").read_text())

    def control_address(self) -> str:
        return json.loads((self["state"] / "coordinator.json").read_text())["control"]

    def start_department(self, name, key: str | None = None, ledger: str | None = None, policy=None,
                         as_name: str | None = None):
        """Start ``name``'s department (optionally with another key, ledger folder, policy or --name).

        The policy defaults to the one given to :func:`federation` for ``name``, else ``--max-epsilon 10``.
        """
        if policy is None:
            policy = self.get("policies", {}).get(name, ("--max-epsilon", "10"))
        self["departments"][name] = spawn(
            ["department", "start", "--coordinator", self["address"], "--ca", str(self["certs"] / "ca.crt"),
             "--key", str(self["certs"] / "departments" / (key or name)), "--data", str(self["data"][name]),
             "--label-column", self.get("label_column", "digit"), "--ledger", str(self["root"] / "ledgers" / (ledger or name)), *policy,
             *(("--name", as_name) if as_name else ())],
            self["root"] / f"{name}.log",
        )

    def wait_online(self, count: int, timeout: float = 300.0) -> None:
        """Until ``count`` departments are online and each running one answers (``timeout`` bounds a hang)."""
        deadline = time.monotonic() + timeout
        result = None
        while time.monotonic() < deadline:
            for name, proc in self["departments"].items():
                if proc.poll() is not None:
                    raise AssertionError(f"department {name} exited {proc.returncode}: "
                                         + (self["root"] / f"{name}.log").read_text()[-3000:])
            result = self.control("departments")
            if online(result.stdout) >= count and all(
                "answering with the fedsilo installed here" in (self["root"] / f"{n}.log").read_text()
                for n, p in self["departments"].items() if p.poll() is None
            ):
                return
            time.sleep(1.0)
        raise AssertionError(f"fewer than {count} departments online: {result.stdout}{result.stderr}")

    def restart_departments(self, names, before=None, **options) -> None:
        """Stop ``names``, call ``before()``, and start them again (``options[name]``: start_department's
        keywords) once the coordinator counts them offline: a restart it still counts online is refused."""
        began = time.monotonic()
        for name in names:
            stop(self["departments"][name])
        stopped = time.monotonic()
        if before is not None:
            before()
        still = len(self["departments"]) - len(names)
        deadline = time.monotonic() + 180  # a stopped SuperNode deactivates; a killed one lapses in 2 x 30 s
        while online(self.control("departments").stdout) > still and time.monotonic() < deadline:
            time.sleep(1.0)
        offline = time.monotonic()
        for name in names:
            self.start_department(name, **options.get(name, {}))
        self.wait_online(len(self["departments"]))
        self.note(f"restarted {', '.join(names)}: stopped in {stopped - began:.1f} s, counted offline "
                  f"{offline - stopped:.1f} s later, online again {time.monotonic() - offline:.1f} s after that")

    def note(self, text: str) -> None:
        """A line in ROOT/federation.log: where a test's time went, for whoever reads a slow run."""
        with open(self["root"] / "federation.log", "a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} {text}\n")

    def run(self, *args, timeout=300):
        # σ = 1 unless a test asks otherwise (the default plans σ to spend each budget in one run,
        # and these tests share their departments' budgets across many runs).
        return self.control("run", "--test-data", str(self["data"]["test"]), "--label-column",
                            self.get("label_column", "digit"), "--noise-multiplier", "1.0",
                            *args, timeout=timeout)

    def ledger(self, name, folder: str | None = None) -> list[dict]:
        """The entries of the one ledger in ``name``'s ledger folder (it is named after the key)."""
        files = sorted((self["root"] / "ledgers" / (folder or name)).glob("*.jsonl"))
        assert len(files) <= 1, files
        return [json.loads(line) for line in files[0].read_text().splitlines()] if files else []

    def stop_all(self) -> None:
        for proc in self["departments"].values():
            if proc.poll() is None:
                stop(proc)
        if "coordinator" in self and self["coordinator"].poll() is None:
            stop(self["coordinator"])


@contextmanager
def federation(root: Path, departments: tuple[str, ...], extra_keys: tuple[str, ...] = (), tables=None,
               label_column: str = "digit", policies: dict | None = None):
    """Certificates, a coordinator, registered and started departments; all stopped after.

    ``tables(root, departments)`` gives ``{"test": path, name: path, ...}`` (default: :func:`digits_tables`),
    with ``label_column`` their label; ``policies[name]``: that department's policy options.
    """
    data = (tables or digits_tables)(root, departments)
    certs = root / "certs"
    assert cli("certs", "init", "--out", str(certs)).returncode == 0
    for name in (*departments, *extra_keys):
        assert cli("certs", "add-department", name, "--dir", str(certs)).returncode == 0
    fed = Federation(root=root, certs=certs, data=data, state=root / "state",
                     address=f"127.0.0.1:{free_port()}", departments={}, label_column=label_column,
                     policies=dict(policies or {}))
    try:
        began = time.monotonic()
        fed.start_coordinator()
        started = time.monotonic()
        registered = fed.control("register", *departments)
        assert registered.returncode == 0, (registered.stdout + registered.stderr + "\ncoordinator.log:\n"
                                            + (root / "coordinator.log").read_text()[-4000:])
        for name in departments:
            fed.start_department(name)
        fed.wait_online(len(departments))
        fed.note(f"coordinator up in {started - began:.1f} s, {len(departments)} department(s) online "
                 f"{time.monotonic() - started:.1f} s later")
        yield fed
    finally:
        fed.stop_all()


def run_ledgers(run_dir: Path) -> dict[str, list[dict]]:
    """Entries of every ledger of a simulated run, by the department name written in it (files are named after the key)."""
    out = {}
    for p in sorted((Path(run_dir) / "ledgers").glob("*.jsonl")):
        entries = [json.loads(line) for line in p.read_text().splitlines()]
        out[entries[-1]["department"]] = entries
    return out
