"""The processes a deployment is made of: started through the fedsilo CLI, their output stamped, their tree sampled."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..common import Sampler

FEDSILO = [sys.executable, "-m", "fedsilo"]


def progress(text: str) -> None:
    print(f"  [deployment] {text}", flush=True)


def env() -> dict[str, str]:
    from fedsilo.shared.flower_cli import offline_env

    return offline_env()


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDSILO, *args], capture_output=True, text=True, timeout=timeout, env=env())


def must(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"{what} exited {result.returncode}: {(result.stdout + result.stderr)[-2000:]}")


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen([*FEDSILO, *args], stdout=handle, stderr=subprocess.STDOUT, env=env())


def stop(proc: subprocess.Popen | None) -> None:
    """End ``proc`` and its whole tree (snapshot taken first: children may be re-parented)."""
    from fedsilo.shared.flower_cli import descendants, terminate

    if proc is None:
        return
    terminate([proc.pid, *descendants(proc.pid)])
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------- stamped output and its events

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
EPSILON_LINE = re.compile(r"\[(?P<name>[^\]]+)\] round (?P<round>\d+): \S+=\d")


class StampedOutput(threading.Thread):
    """Reads a process's output line by line, stamping each with ``time.time()`` on arrival.

    The lines (ANSI colours removed) are kept in :attr:`lines` and written to
    ``log`` as ``EPOCH LINE``.
    """

    def __init__(self, stream, log: Path) -> None:
        super().__init__(daemon=True)
        self.stream, self.log = stream, Path(log)
        self.lines: list[tuple[float, str]] = []

    def run(self) -> None:
        with open(self.log, "w", encoding="utf-8") as sink:
            for raw in self.stream:
                stamp = time.time()
                line = ANSI.sub("", raw.rstrip("\r\n"))
                self.lines.append((stamp, line))
                sink.write(f"{stamp:.3f} {line}\n")
                sink.flush()


def spawn_stamped(args: list[str], log: Path) -> tuple[subprocess.Popen, StampedOutput]:
    # Unbuffered: a line leaves each Python process as soon as it is logged.
    stamped_env = {**env(), "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen([*FEDSILO, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=stamped_env,
                            text=True, encoding="utf-8", errors="replace")
    reader = StampedOutput(proc.stdout, log)
    reader.start()
    return proc, reader


def department_events(lines: list[tuple[float, str]], since: float = 0.0) -> dict[str, list]:
    """The stamps of one department's train messages, in order (the n-th message is round n).

    ``receiving``/``received``: the SuperNode pulled the message / stored its
    objects; ``sending``/``sent``: it found the reply / pushed it.
    ``epsilon_lines``: ``[round, stamp]`` of the budget guard's first ε line for each round.
    """
    events: dict[str, list] = {"receiving": [], "received": [], "sending": [], "sent": [], "epsilon_lines": []}
    pending: str | None = None  # which success line comes next
    for stamp, line in lines:
        if stamp < since:
            continue
        if "Receiving: train message" in line:
            events["receiving"].append(stamp)
            pending = "received"
        elif "Sending: train message" in line:
            events["sending"].append(stamp)
            pending = "sent"
        elif pending == "received" and "Received successfully" in line:
            events["received"].append(stamp)
            pending = None
        elif pending == "sent" and "Sent successfully" in line:
            events["sent"].append(stamp)
            pending = None
        elif (match := EPSILON_LINE.search(line)) is not None:
            k = int(match.group("round"))
            if all(r != k for r, _ in events["epsilon_lines"]):  # the first, where two handlers print it
                events["epsilon_lines"].append([k, stamp])
    return events


# --------------------------------------------------------------------------- the sampler


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def process_name(args: list[str]) -> str:
    """``flower-supernode`` for ``[.../python, .../flower-supernode, ...]``; the program's name otherwise."""
    if not args:
        return "?"
    if Path(args[0]).name.startswith("python") and len(args) > 1:
        if args[1] == "-m" and len(args) > 2:
            return args[2]
        return Path(args[1]).name
    return Path(args[0]).name


class Timeline(Sampler):
    """Samples, every ``interval`` s: the processes under each department, and the run's summary.json.

    ``round_ends``: ``[K, mtime, seen]`` for the version of summary.json that
    first held K rounds (0: the initial evaluation); when one version adds two
    rounds at once only the later one is kept (the earlier one's write was missed).
    ``processes``: every process seen under a department, with when it was
    first and last seen and whether it was already there at the first sample.
    """

    def __init__(self, departments: dict[str, subprocess.Popen], summary: Path, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.departments, self.summary = departments, Path(summary)
        self.processes: dict[int, dict[str, Any]] = {}
        self.round_ends: list[list[float]] = []
        self._seen_rounds = -1
        self._samples = 0

    def sample(self) -> None:
        from fedsilo.shared.flower_cli import alive, descendants

        now = time.time()
        first = self._samples == 0
        self._samples += 1
        for name, proc in self.departments.items():
            for pid in descendants(proc.pid):
                if not alive(pid):
                    continue
                known = self.processes.get(pid)
                if known is not None:
                    known["last"] = now
                    continue
                self.processes[pid] = {"department": name, "pid": pid, "name": process_name(_cmdline(pid)),
                                       "first": now, "last": now, "at_start": first}
        try:
            with open(self.summary, "rb") as handle:  # one version: stat and content of the same file
                mtime = os.fstat(handle.fileno()).st_mtime
                data = json.loads(handle.read())
        except (OSError, ValueError):
            return
        if not data.get("initial"):
            return
        done = len(data.get("rounds", []))
        if done > self._seen_rounds:
            self.round_ends.append([done, mtime, now])
            self._seen_rounds = done
