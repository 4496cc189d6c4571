"""Deployment overhead: seconds per round of a real TLS deployment on loopback vs the same work simulated.

The deployment is started the way an operator starts one, through the ``fedsilo``
CLI, each part a real process on 127.0.0.1 (free ports): ``certs init``, three
``certs add-department``, ``coordinator start --state STATE`` (flower-superlink
on a loopback port, flower-superexec for the ServerApp, nginx on the public
address forwarding only the Fleet routes), ``coordinator register --state
STATE``, three ``department start`` (finance, hr, sales: a third each of
scikit-learn's digits as CSV tables; each a flower-supernode in process
isolation plus fedsilo's long-lived executor in the ``department start``
process), then ``coordinator run --state STATE --rounds R --min-departments 3``.
Seconds per round come from the run's ``summary.json`` (the ServerApp's own
clock).  The same work is then simulated: ``fedsilo simulate --departments 3
--rounds R --partition iid`` on one CSV of the same digits (the simulation holds
out the same 20 % and gives each department a third of the rest).

Where the time goes is read from events the processes log, stamped on one clock
(everything runs on this machine):

* each department's output is read through a pipe and every line stamped on
  arrival: the SuperNode's ``Receiving: train message`` / ``Received
  successfully`` / ``Sending: train message`` / ``Sent successfully`` and the
  budget guard's ``[NAME] round K: ε=…`` line from the executor;
* each department's ledger entry carries the executor's own timestamp (the ε
  line follows it: their difference is the stamps' relay latency, reported);
* ``summary.json`` is rewritten after every round: the sampler (every 0.1 s)
  keeps the modification time of each version that adds a round; a round runs
  from the previous write to its own, and the ServerApp's ``seconds`` is
  compared with that span;
* the SuperLink's database keeps Flower's own total of the ClientApp runtime
  (from the executor's pull of a message to its push of the reply), read after
  the run;
* the sampler also records every process under each department, which shows
  whether anything is started per message;
* a fresh interpreter (``--probe``) times a department's own work alone: the
  one-off import, its table, one ε, a cold and a warm ``train_dp``, and one
  evaluation of the coordinator's kind;
* the polling intervals are Flower's and fedsilo's constants, cited by file and
  checked against the installed code by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fedsilo.shared.runs import LATEST, resolve_run_dir

from .common import BenchResult, Sampler, Table, Target

NAME = "deployment"
PLOT = "deployment.png"
DEPARTMENTS = ("finance", "hr", "sales")
LABEL = "digit"
TEST_ROWS = 360  # the simulation's 20 % hold-out of digits' 1,797 rows
QUICK_ROUNDS = 1
FULL_ROUNDS = 5
PROBE_MARKER = "DEPLOY-PROBE "
FEDSILO = [sys.executable, "-m", "fedsilo"]
TARGET_EXTRA_S = 3.0  # the issue: a deployed round at most 3 s slower than the same round simulated
IDLE_POLL_S = 3.0  # FLOWER_POLLS[0]
REPLY_POLL_S = 0.5  # FLOWER_POLLS[1]

# Flower 1.41's polling, read from its source (site-packages/flwr/...).
FLOWER_POLLS = [
    ("supernode/start_client_internal.py", "time.sleep(3)", IDLE_POLL_S,
     "an idle SuperNode asks the SuperLink for a message, then sleeps 3 s (no setting changes it)"),
    ("supernode/start_client_internal.py", "time.sleep(0.5)", REPLY_POLL_S,
     "after storing a message the SuperNode checks for the reply every 0.5 s (and waits in 0.5 s steps "
     "for any of the reply's objects not yet handed over) before pushing it"),
    ("supercore/superexec/run_superexec.py", "_DEFAULT_TASK_POLL_INTERVAL_SECONDS = 1.0", 1.0,
     "the coordinator's SuperExec looks for the ServerApp task every 1 s by default "
     "(FLWR_SUPEREXEC_TASK_POLL_INTERVAL; fedsilo sets 0.2 s): once per run, before round 1"),
    ("common/constant.py", "HEARTBEAT_DEFAULT_INTERVAL = 30", 30.0,
     "SuperNode heartbeats every 30 s: liveness only, not on a round's path"),
    ("superlink/grid/inmemory_grid.py", "pull_interval: float = 0.1", 0.1,
     "the simulation's InMemoryGrid pulls replies every 0.1 s"),
    ("server/superlink/fleet/vce/vce_api.py", "f_stop.wait(0.1)", 0.1,
     "the simulation engine checks for new messages every 0.1 s; its Ray actors stay alive between rounds"),
]

# fedsilo's own intervals on a deployed round's path (paths inside the fedsilo package).
FEDSILO_POLLS = [
    ("client/executor.py", "poll_interval: float = 0.1", 0.1,
     "the department's executor asks its SuperNode's Runtime API for a task every 0.1 s while idle"),
    ("server/app.py", "first: float = 0.05, most: float = 0.5", 0.5,
     "the ServerApp pulls replies 0.05 s after pushing, doubling to at most 0.5 s while none arrive "
     "(back to 0.05 s after each arrival)"),
    ("server/coordinator.py", '"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"', 0.2,
     "the coordinator's SuperExec task poll, set by fedsilo (once per run)"),
]


def _log(text: str) -> None:
    print(f"  [deployment] {text}", flush=True)


def _env() -> dict[str, str]:
    from fedsilo.shared.flower_cli import offline_env

    return offline_env()


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDSILO, *args], capture_output=True, text=True, timeout=timeout, env=_env())


def _must(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"{what} exited {result.returncode}: {(result.stdout + result.stderr)[-2000:]}")


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen([*FEDSILO, *args], stdout=handle, stderr=subprocess.STDOUT, env=_env())


def _stop(proc: subprocess.Popen | None) -> None:
    """End ``proc`` and its whole tree (snapshot taken first: children may be re-parented)."""
    from fedsilo.shared.flower_cli import descendants, terminate

    if proc is None:
        return
    terminate([proc.pid, *descendants(proc.pid)])
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------- data


def write_data(root: Path) -> dict[str, Path]:
    """digits as CSV: the coordinator's test table, one table per department, and all rows (for the simulation)."""
    import pandas as pd
    from sklearn.datasets import load_digits

    bunch = load_digits()
    frame = pd.DataFrame(bunch.data, columns=[f"px{i}" for i in range(64)])
    frame[LABEL] = bunch.target
    frame = frame.sample(frac=1, random_state=0).reset_index(drop=True)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"all": root / "digits.csv", "test": root / "test.csv"}
    frame.to_csv(paths["all"], index=False)
    frame.iloc[:TEST_ROWS].to_csv(paths["test"], index=False)
    rest = frame.iloc[TEST_ROWS:]
    third = len(rest) // len(DEPARTMENTS)
    for i, name in enumerate(DEPARTMENTS):
        paths[name] = root / f"{name}.csv"
        rest.iloc[i * third:(i + 1) * third].to_csv(paths[name], index=False)
    return paths


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


def _spawn_stamped(args: list[str], log: Path) -> tuple[subprocess.Popen, StampedOutput]:
    # Unbuffered: a line leaves each Python process as soon as it is logged.
    env = {**_env(), "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen([*FEDSILO, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
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


# --------------------------------------------------------------------------- the deployment


def wait_coordinator(state: Path, proc: subprocess.Popen, log: Path, timeout: float = 600.0) -> dict[str, Any]:
    """Until ``coordinator start`` records its loopback Control endpoint (written once nginx serves Fleet).

    ``timeout`` bounds a hang, it is no expected time: on a busy machine a start takes minutes.
    """
    record = Path(state) / "coordinator.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            return json.loads(record.read_text())
        except (OSError, ValueError):
            time.sleep(0.3)
    raise RuntimeError(f"the coordinator wrote no {record} within {timeout:.0f} s: "
                       f"{log.read_text(errors='replace')[-2000:]}")


def check_port(address: str) -> None:
    host, port = address.rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=5).close()


def wait_online(certs: Path, address: str, state: Path, count: int, timeout: float = 600.0) -> float:
    """Seconds until the coordinator counts ``count`` departments online; ``timeout`` bounds a hang.

    Each ``coordinator departments`` query may take what is left of the wait (a fixed 60 s per query
    failed the benchmark on a busy machine, where one CLI start alone can take that long).
    """
    started = time.monotonic()
    deadline = started + timeout
    output = ""
    while time.monotonic() < deadline:
        try:
            result = _cli("coordinator", "departments", "--certs", str(certs), "--address", address,
                          "--state", str(state), timeout=max(deadline - time.monotonic(), 10.0))
        except subprocess.TimeoutExpired:
            output = "`fedsilo coordinator departments` did not answer before the wait ran out"
            break
        output = result.stdout + result.stderr
        # Rows whose status is online: the header ("online since") has the word too.
        if len(re.findall(r"^\W*\d+\W+online\W", result.stdout, re.MULTILINE)) >= count:
            return time.monotonic() - started
        time.sleep(1.0)
    raise RuntimeError(f"fewer than {count} departments online after {timeout:.0f} s: {output[-1500:]}")


def clientapp_runtime(database: Path, run_id: str) -> float | None:
    """Flower's total ClientApp runtime for ``run_id`` (the SuperLink's ``run.clientapp_runtime``), or None."""
    from fedsilo.shared.flower_internals import clientapp_runtime as read

    return read(database, run_id)


def run_deployment(root: Path, data: dict[str, Path], rounds: int, logs: Path) -> dict[str, Any]:
    """Certificates, a TLS coordinator and three departments on loopback; one run of ``rounds``; all stopped after."""
    from fedsilo.shared.flower_cli import free_port

    certs = root / "certs"
    state = root / "state"
    _must(_cli("certs", "init", "--out", str(certs)), "fedsilo certs init")
    for name in DEPARTMENTS:
        _must(_cli("certs", "add-department", name, "--dir", str(certs)), f"fedsilo certs add-department {name}")
    address = f"127.0.0.1:{free_port()}"
    coordinator: subprocess.Popen | None = None
    departments: dict[str, subprocess.Popen] = {}
    readers: dict[str, StampedOutput] = {}
    run_dir = root / "run"
    record: dict[str, Any] = {"address": address, "rounds_requested": rounds}
    try:
        started = time.perf_counter()
        coordinator = _spawn(["coordinator", "start", "--certs", str(certs), "--address", address,
                              "--state", str(state)], logs / "coordinator.log")
        info = wait_coordinator(state, coordinator, logs / "coordinator.log")
        check_port(address)
        record["coordinator_start_s"] = time.perf_counter() - started
        record["control"] = info.get("control")
        _must(_cli("coordinator", "register", *DEPARTMENTS, "--certs", str(certs), "--address", address,
                   "--state", str(state)), "fedsilo coordinator register")
        started = time.perf_counter()
        for name in DEPARTMENTS:
            departments[name], readers[name] = _spawn_stamped(
                ["department", "start", "--coordinator", address, "--ca", str(certs / "ca.crt"),
                 "--key", str(certs / "departments" / name), "--data", str(data[name]), "--label-column", LABEL,
                 "--ledger", str(root / "ledgers" / name), "--max-epsilon", "10"],
                logs / f"{name}.log",
            )
        wait_online(certs, address, state, len(DEPARTMENTS))
        record["departments_online_s"] = time.perf_counter() - started
        started = time.perf_counter()
        record["run_started"] = time.time()
        with Timeline(departments, run_dir / LATEST / "summary.json") as timeline:
            result = _cli("coordinator", "run", "--certs", str(certs), "--address", address, "--state", str(state),
                          "--test-data", str(data["test"]), "--label-column", LABEL, "--rounds", str(rounds),
                          "--min-departments", str(len(DEPARTMENTS)), "--out", str(run_dir), timeout=1800)
        record["run_wall_s"] = time.perf_counter() - started
        (logs / "coordinator-run.log").write_text(result.stdout + result.stderr)
        _must(result, "fedsilo coordinator run")
    finally:
        for proc in departments.values():
            _stop(proc)
        _stop(coordinator)
        for reader in readers.values():
            reader.join(timeout=10)
    run_dir = resolve_run_dir(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    if (run_dir / "flower.log").exists():
        shutil.copy(run_dir / "flower.log", logs / "coordinator-flower.log")
    for name in ("superlink.log", "superexec.log"):
        if (state / name).exists():
            shutil.copy(state / name, logs / f"coordinator-{name}")
    ledgers = {}
    for name in DEPARTMENTS:
        path = root / "ledgers" / name / f"{name}.jsonl"
        ledgers[name] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    record.update(
        status=summary["status"],
        run_id=summary["run_id"],
        seconds=[float(r["seconds"]) for r in summary["rounds"]],
        trained=[len(r["trained"]) for r in summary["rounds"]],
        final_accuracy=summary.get("final_accuracy"),
        run_wall_time_s=summary.get("wall_time_s"),
        round_ends=timeline.round_ends,
        processes=sorted(timeline.processes.values(), key=lambda p: p["first"]),
        departments={name: department_events(readers[name].lines, since=record["run_started"])
                     for name in DEPARTMENTS},
        ledger_times={n: [[e["round"], e["timestamp"]] for e in entries if e["run_id"] == summary["run_id"]]
                      for n, entries in ledgers.items()},
        clientapp_runtime_s=clientapp_runtime(state / "superlink.db", summary["run_id"]),
    )
    return record


# --------------------------------------------------------------------------- where a round's time goes

# Consecutive intervals between a department's logged events; with the collect
# phase after the last reply they tile a round.
PATH = ("wait", "download", "clientapp", "reply_wait", "upload")
PHASES = (*PATH, "collect")


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "count": len(values)}


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def phases(record: dict[str, Any]) -> dict[str, Any]:
    """Split each deployed round at the logged events of its departments.

    Round K runs from the summary.json write that ended round K-1 (the initial
    evaluation for K = 1) to its own write; where the earlier write was not
    seen, from its own write minus the ServerApp's ``seconds``.  For each
    department, with R/R'/S/S' its SuperNode's Receiving / Received successfully
    / Sending / Sent successfully stamps and L its ledger entry:

    ``wait`` start→R, ``download`` R→R', ``clientapp`` R'→L, ``reply_wait`` L→S,
    ``upload`` S→S'.  The department whose S' is last is the round's critical
    path; ``collect`` is its S' → the round's end.  The phases of the critical
    path add up to the round's span; ``between_rounds`` is that span minus the
    ServerApp's clock (its log line and summary write between two rounds).
    """
    ends = {int(k): float(t) for k, t, *_ in record.get("round_ends", [])}
    seconds = record["seconds"]
    events = record.get("departments", {})
    ledgers = {n: {int(r): float(t) for r, t in v} for n, v in record.get("ledger_times", {}).items()}
    per_round, incomplete = [], []
    for k in range(1, len(seconds) + 1):
        if k not in ends:
            incomplete.append(k)
            continue
        end = ends[k]
        start, start_from = (ends[k - 1], "previous summary write") if k - 1 in ends else (end - seconds[k - 1], "clock")
        rows = []
        for name in sorted(events):
            ev, i = events[name], k - 1
            if min(len(ev[key]) for key in ("receiving", "received", "sending", "sent")) <= i:
                continue
            led = ledgers.get(name, {}).get(k)
            if led is None:
                continue
            recv, ok, send, sent = ev["receiving"][i], ev["received"][i], ev["sending"][i], ev["sent"][i]
            eps_line = next((t for r, t in ev.get("epsilon_lines", []) if int(r) == k), None)
            rows.append({
                "department": name,
                "receiving": recv, "received": ok, "ledger": led, "sending": send, "sent": sent,
                "wait": recv - start,
                "download": ok - recv,
                "clientapp": led - ok,
                "reply_wait": send - led,
                "upload": sent - send,
                "done": sent - start,
                "received_to_sending": send - ok,
                # The SuperNode pulls once right after a reply, then every 3 s.
                "since_previous_reply": recv - ev["sent"][i - 1] if i >= 1 else None,
                "log_lag": eps_line - led if eps_line is not None else None,
            })
        if len(rows) < len(events) or not events:
            incomplete.append(k)
        if not rows:
            continue
        critical = max(rows, key=lambda r: r["sent"])
        span = end - start
        per_round.append({
            "round": k, "start": start, "end": end, "start_from": start_from,
            "seconds_summary": seconds[k - 1], "span": span, "between_rounds": span - seconds[k - 1],
            "critical": critical["department"], "departments": rows,
            **{p: critical[p] for p in PATH}, "collect": end - critical["sent"],
        })
    steady = [r for r in per_round if r["round"] >= 2]
    rows_all = [d for r in per_round for d in r["departments"]]
    keys = (*PHASES, "span", "seconds_summary", "between_rounds")
    since = [d["since_previous_reply"] for d in rows_all if d["since_previous_reply"] is not None]
    sleeps = [round(g / IDLE_POLL_S) for g in since]
    gaps = [d["received_to_sending"] for d in rows_all]
    checks = [round(g / REPLY_POLL_S) for g in gaps]
    sent_replies = sum(len(ev["sent"]) for ev in events.values())
    runtime = record.get("clientapp_runtime_s")
    new_processes = [p for p in record.get("processes", []) if not p.get("at_start")]
    return {
        "rounds": per_round,
        "incomplete": incomplete,
        "complete": bool(per_round) and not incomplete,
        "complete_rounds": sum(1 for r in per_round if r["round"] not in incomplete),
        "first": {key: per_round[0][key] for key in keys} if per_round and per_round[0]["round"] == 1 else None,
        "steady": {key: _mean_of(steady, key) for key in keys} if steady else None,
        "mean": {key: _mean_of(per_round, key) for key in keys} if per_round else None,
        "departments": {key: _stats([d[key] for d in rows_all]) for key in (*PATH, "done")},
        "evidence": {
            "since_previous_reply": _stats(since),
            "idle_sleeps": dict(sorted(Counter(sleeps).items())),
            "since_previous_reply_minus_sleeps": _stats([g - IDLE_POLL_S * n for g, n in zip(since, sleeps)]),
            "received_to_sending": _stats([d["received_to_sending"] for d in rows_all]),
            "reply_checks": dict(sorted(Counter(checks).items())),
            "received_to_sending_minus_checks": _stats([g - REPLY_POLL_S * n for g, n in zip(gaps, checks)]),
            "log_lag": _stats([d["log_lag"] for d in rows_all if d["log_lag"] is not None]),
            "clientapp_runtime_per_message": runtime / sent_replies if runtime is not None and sent_replies else None,
            "replies_sent": sent_replies,
            "processes_under_departments": sorted(Counter(p["name"] for p in record.get("processes", [])).items()),
            "processes_started_during_run": len(new_processes),
            "processes_started_names": sorted({p["name"] for p in new_processes}),
        },
    }


# --------------------------------------------------------------------------- the simulation


def run_simulation(data: dict[str, Path], rounds: int, run_dir: Path, log: Path) -> dict[str, Any]:
    from fedsilo.shared.flower_cli import stop_tree

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [*FEDSILO, "simulate", "--departments", str(len(DEPARTMENTS)), "--rounds", str(rounds),
           "--dataset", str(data["all"]), "--label-column", LABEL, "--partition", "iid", "--out", str(run_dir)]
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=_env())
    try:
        proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            stop_tree(proc)
    wall = time.perf_counter() - started
    run_dir = resolve_run_dir(run_dir)  # the output folder's latest (only) run
    if proc.returncode != 0 or not (run_dir / "summary.json").exists():
        raise RuntimeError(f"fedsilo simulate exited {proc.returncode}; log {log}: {log.read_text()[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "status": summary["status"],
        "seconds": [float(r["seconds"]) for r in summary["rounds"]],
        "trained": [len(r["trained"]) for r in summary["rounds"]],
        "final_accuracy": summary.get("final_accuracy"),
        "wall_s": wall,
        "command": cmd[1:],
    }


# --------------------------------------------------------------------------- a department's own work, alone


def probe(department_csv: Path, test_csv: Path) -> dict[str, float]:
    """In a fresh interpreter: a department's own work, without Flower.

    The import is what ``department start`` pays once before it answers tasks;
    the cold ``train_dp`` is the executor's first round, the warm one its later
    rounds; the evaluation is the ServerApp's per-round one on the test table.
    """
    t0 = time.perf_counter()
    import fedsilo.client.app  # noqa: F401  (the ClientApp the department's executor imports once)

    t1 = time.perf_counter()
    import opacus  # noqa: F401  (train_dp imports it on first use)

    t2 = time.perf_counter()
    import torch

    from fedsilo.client.budget_guard import plan_round
    from fedsilo.client.policy import DepartmentPolicy, RunRequest
    from fedsilo.client.trainer import train_dp
    from fedsilo.shared import accounting
    from fedsilo.shared.config import RunSettings
    from fedsilo.shared.data import load_table, table_schema
    from fedsilo.shared.models import build_model, evaluate

    schema = table_schema(test_csv, LABEL)
    t3 = time.perf_counter()
    data = load_table(department_csv, LABEL, schema=schema)
    t4 = time.perf_counter()
    settings = RunSettings.from_run_config({"model": "mlp"})
    terms, _ = DepartmentPolicy(max_epsilon=10.0).terms_for(RunRequest.from_settings(settings))
    mechanism = plan_round(settings, terms, len(data))
    t5 = time.perf_counter()
    accounting.epsilon([mechanism], terms.delta, terms.accountant)
    t6 = time.perf_counter()
    torch.set_num_threads(1)
    times = []
    for _ in range(2):
        model = build_model("mlp", data.input_shape, data.num_outputs, data.kind, task=data.task)
        started = time.perf_counter()
        train_dp(model, data, mechanism, max_grad_norm=settings.max_grad_norm, learning_rate=settings.learning_rate,
                 momentum=settings.momentum, grad_sample_mode=settings.grad_sample_mode)
        times.append(time.perf_counter() - started)
    test = load_table(test_csv, LABEL, schema=schema)
    started = time.perf_counter()
    evaluate(model, test)
    evaluated = time.perf_counter() - started
    return {
        "import_client_app_s": t1 - t0,
        "import_opacus_s": t2 - t1,
        "read_table_s": t4 - t3,
        "epsilon_s": t6 - t5,
        "train_dp_cold_s": times[0],
        "train_dp_warm_s": times[1],
        "evaluate_s": evaluated,
        "steps": mechanism.steps,
        "examples": len(data),
    }


def _probe_command(department_csv: Path, test_csv: Path) -> list[str]:
    return [sys.executable, "-m", f"{__package__}.deployment_overhead", "--probe", str(department_csv), str(test_csv)]


def _probe_output(proc: subprocess.Popen, started: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=600)
    wall = time.perf_counter() - started
    line = next((l for l in reversed(out.splitlines()) if l.startswith(PROBE_MARKER)), None)
    if line is None:
        raise RuntimeError(f"probe exited {proc.returncode}: {(err or out)[-1500:]}")
    return {**json.loads(line[len(PROBE_MARKER):]), "process_wall_s": wall}


def run_probe(department_csv: Path, test_csv: Path, repeats: int, together: int = len(DEPARTMENTS)) -> dict[str, Any]:
    """Fresh interpreters: ``repeats`` one after the other, then ``together`` at once (as the departments
    train at once in a round); the parent also times each one's whole life, interpreter start included."""
    env = {**_env(), "OMP_NUM_THREADS": "1"}

    def start() -> tuple[subprocess.Popen, float]:
        return (subprocess.Popen(_probe_command(department_csv, test_csv), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env), time.perf_counter())

    alone = []
    for _ in range(repeats):
        alone.append(_probe_output(*start()))
    launched = [start() for _ in range(together)]
    at_once = [_probe_output(*p) for p in launched]
    # An interpreter that imports nothing of ours: the floor of any new process.
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
    bare = time.perf_counter() - started
    keys = [k for k in alone[0] if isinstance(alone[0][k], float)]
    med = lambda runs: {k: statistics.median(r[k] for r in runs) for k in keys}  # noqa: E731
    return {"runs": alone, "together_runs": at_once, "median": med(alone), "together_median": med(at_once),
            "bare_interpreter_s": bare, "repeats": repeats, "together": together}


# --------------------------------------------------------------------------- the result


def _s(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _steady(seconds: list[float]) -> float:
    """Mean of rounds ≥ 2 (round 1 alone when there is only one)."""
    return statistics.mean(seconds[1:]) if len(seconds) > 1 else seconds[0]


def _flower_version() -> str:
    from fedsilo.shared.flower_internals import flower_version

    return flower_version()


def _get(block: dict[str, Any] | None, key: str) -> float | None:
    return None if block is None else block.get(key)


def _counts(counter: dict) -> str:
    """``{1: 8, 2: 1}`` -> ``1 (8×), 2 (1×)``: how often each whole number came up."""
    return ", ".join(f"{k} ({v}×)" for k, v in sorted(counter.items(), key=lambda kv: int(kv[0]))) or "–"


PHASE_LABELS = {
    "wait": "round start → the SuperNode receives the message (`Receiving: train message`)",
    "download": "`Receiving` → `Received successfully`",
    "clientapp": "`Received successfully` → the department's ledger entry",
    "reply_wait": "ledger entry → `Sending: train message`",
    "upload": "`Sending` → `Sent successfully`",
    "collect": "last `Sent successfully` → the round's summary.json write",
    "done": "round start → the department's `Sent successfully`",
}
PHASE_COLOURS = {"wait": "#bbbbbb", "download": "#4c72b0", "clientapp": "#55a868", "reply_wait": "#dd8452",
                 "upload": "#8172b3", "collect": "#c44e52"}
PHASE_SHORT = {"wait": "SuperNode idle wait (3 s sleep)", "download": "download via nginx",
               "clientapp": "executor + ClientApp (guard, DP-SGD, ledger)", "reply_wait": "reply check (0.5 s)",
               "upload": "upload via nginx", "collect": "ServerApp pull, FedAvg, evaluation"}


def plot(deploy: dict[str, Any], sim: dict[str, Any], split: dict[str, Any], path: Path) -> None:
    """Per-round seconds; the critical path's phases vs the simulated round; every department's timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 8))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1])
    left, right, bottom = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    rounds = range(1, len(deploy["seconds"]) + 1)
    width = 0.38
    left.bar([r - width / 2 for r in rounds], deploy["seconds"], width, label="TLS deployment on loopback")
    left.bar([r + width / 2 for r in range(1, len(sim["seconds"]) + 1)], sim["seconds"], width,
             label="fedsilo simulate (same data)")
    left.set_xlabel("round")
    left.set_ylabel("seconds (ServerApp's clock)")
    left.set_xticks(list(rounds))
    left.set_title("Seconds per round, 3 departments")
    left.set_ylim(top=max([*deploy["seconds"], *sim["seconds"]]) * 1.3)
    left.legend(fontsize=8, loc="upper right")

    basis, label = (split.get("steady"), "rounds ≥ 2") if split.get("steady") else (split.get("first"), "round 1")
    if basis:
        bottom_ = 0.0
        for key in PHASES:
            value = max(basis[key], 0.0)
            right.bar([f"deployment\n({label})"], [value], bottom=bottom_, color=PHASE_COLOURS[key],
                      label=f"{PHASE_SHORT[key]}: {value:.2f} s")
            bottom_ += value
        sim_value = _steady(sim["seconds"]) if label == "rounds ≥ 2" else sim["seconds"][0]
        right.bar([f"simulation\n({label})"], [sim_value], color="grey")
        right.set_ylabel("seconds (mean round)")
        right.set_title("A deployed round's critical path (measured)")
        right.set_ylim(top=max(bottom_, sim_value) * 1.6)
        right.legend(fontsize=7, loc="upper right")

    rows = split.get("rounds", [])
    if rows:
        t0 = rows[0]["start"]
        names = [*sorted({d["department"] for r in rows for d in r["departments"]}), "ServerApp"]
        seen = set()
        for r in rows:
            bottom.axvline(r["end"] - t0, color="black", lw=0.8, ls="--")
            bottom.broken_barh([(r["end"] - r["collect"] - t0, max(r["collect"], 0.0))], (len(names) - 1.35, 0.7),
                               color=PHASE_COLOURS["collect"], label=PHASE_SHORT["collect"] if "collect" not in seen else None)
            seen.add("collect")
            for d in r["departments"]:
                y = names.index(d["department"])
                edges = [r["start"], d["receiving"], d["received"], d["ledger"], d["sending"], d["sent"]]
                for key, a, b in zip(PATH, edges, edges[1:]):
                    bottom.broken_barh([(a - t0, max(b - a, 0.0))], (y - 0.35, 0.7), color=PHASE_COLOURS[key],
                                       label=PHASE_SHORT[key] if key not in seen else None)
                    seen.add(key)
        bottom.set_yticks(range(len(names)))
        bottom.set_yticklabels(names)
        bottom.set_xlabel("seconds since round 1 started (dashed: a round's summary.json write)")
        bottom.set_title("Each department's rounds, from its logged events")
        bottom.legend(fontsize=7, loc="upper center", ncol=6, bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PROBE_STEPS = [
    ("import_client_app_s", "import fedsilo.client.app (flwr, torch, Opacus): once, when `department start` starts"),
    ("import_opacus_s", "import opacus afterwards (already loaded by the app)"),
    ("read_table_s", "read the department's table with the run's schema"),
    ("epsilon_s", "one ε with the run's accountant, as the budget guard's dry run (1-round history)"),
    ("train_dp_cold_s", "train_dp, first call in the process (the executor's round 1)"),
    ("train_dp_warm_s", "train_dp, second call (the executor's later rounds)"),
    ("evaluate_s", f"evaluate on the coordinator's {TEST_ROWS} rows (the ServerApp's per-round evaluation)"),
    ("process_wall_s", "the whole process, from the parent (interpreter start included)"),
]


def build_result(deploy: dict[str, Any], sim: dict[str, Any], probe_result: dict[str, Any], out: Path,
                 quick: bool, rounds: int) -> BenchResult:
    split = phases(deploy)
    Path(out).mkdir(parents=True, exist_ok=True)
    plot(deploy, sim, split, Path(out) / PLOT)
    d_mean, s_mean = statistics.mean(deploy["seconds"]), statistics.mean(sim["seconds"])
    d_steady, s_steady = _steady(deploy["seconds"]), _steady(sim["seconds"])
    several = len(deploy["seconds"]) > 1 and len(sim["seconds"]) > 1
    p, p3 = probe_result["median"], probe_result.get("together_median", {})
    together = probe_result.get("together", len(DEPARTMENTS))
    first, steady, ev = split.get("first"), split.get("steady"), split["evidence"]
    basis, basis_label = (steady, "rounds ≥ 2") if several else (first, "round 1")
    flower = _flower_version()

    per_round_rows = []
    for i, d in enumerate(deploy["seconds"]):
        s = sim["seconds"][i] if i < len(sim["seconds"]) else None
        per_round_rows.append([str(i + 1), _s(d), _s(s), f"{d - s:+.2f}" if s else "–", f"{d / s:.1f}×" if s else "–"])
    per_round_rows.append(["mean", _s(d_mean), _s(s_mean), f"{d_mean - s_mean:+.2f}", f"{d_mean / s_mean:.1f}×"])
    if several:
        per_round_rows.append(["mean of rounds ≥ 2", _s(d_steady), _s(s_steady), f"{d_steady - s_steady:+.2f}",
                               f"{d_steady / s_steady:.1f}×"])

    since, rest = ev["since_previous_reply"], ev["since_previous_reply_minus_sleeps"]
    checks, off = ev["reply_checks"], ev["received_to_sending_minus_checks"]
    runtime = ev["clientapp_runtime_per_message"]
    clientapp_all = _get(split["departments"].get("clientapp"), "mean")
    explain = {
        "wait": "the ServerApp pushes the round's messages; an idle SuperNode pulls, then sleeps 3 s (Flower, fixed)"
                + (f". Its previous reply had left {_s(since['mean'])} s before it received the next message "
                   f"(whole 3 s sleeps: {_counts(ev['idle_sleeps'])}; + {_s(_get(rest, 'mean'))} s of pull "
                   "requests), so a message waits out the rest of the sleep in progress when it arrives"
                   if since else ""),
        "download": "the model's objects pulled through nginx (TLS, protobuf over HTTP/1.1) and confirmed; on the "
                    "first message also the run and the app (FAB)",
        "clientapp": "the executor takes the task (it polls every 0.1 s), pulls its input over the SuperNode's "
                     "loopback Runtime API and calls the installed ClientApp: budget guard (ledger read, one ε), "
                     "DP-SGD, signed ledger append"
                     + (f". Flower's own ClientApp runtime (the executor's pull of the message → push of the reply; "
                        f"SuperLink database): {_s(runtime)} s per message" if runtime is not None else "")
                     + f". Alone, train_dp takes {_s(p.get('train_dp_cold_s'))} s cold / "
                       f"{_s(p.get('train_dp_warm_s'))} s warm and one ε {_s(p.get('epsilon_s'))} s"
                     + (f"; {together} at once {_s(p3.get('train_dp_cold_s'))} / {_s(p3.get('train_dp_warm_s'))} "
                        f"and {_s(p3.get('epsilon_s'))} s (probe)" if p3 else " (probe)"),
        "reply_wait": "the reply handed to the SuperNode's Runtime API, then its reply check (every 0.5 s from "
                      f"`Received successfully`; that span held whole 0.5 s checks: {_counts(checks)}, "
                      f"off by {_s(_get(off, 'mean'))} s)",
        "upload": "the reply's objects pushed through nginx to the SuperLink (the SuperNode waits in 0.5 s steps "
                  "for any of them not yet handed over by the executor)",
        "collect": "the ServerApp sees the reply at its next pull (0.05 s, doubling to 0.5 s while none arrive), "
                   f"pulls it over loopback, FedAvg, evaluation on {TEST_ROWS} rows (alone "
                   f"{_s(p.get('evaluate_s'))} s, probe), summary.json",
    }
    where_rows = [[PHASE_LABELS[key], _s(_get(first, key)), _s(_get(steady, key)), explain[key]] for key in PHASES]
    where_rows += [
        ["sum: previous summary.json write → this round's", _s(_get(first, "span")), _s(_get(steady, "span")),
         f"the ServerApp's clock: {_s(_get(first, 'seconds_summary'))} / {_s(_get(steady, 'seconds_summary'))} s; "
         "the difference is spent between its rounds (progress log line, summary write)"],
        ["simulated round, same work", _s(sim["seconds"][0]), _s(s_steady) if several else "–",
         "2 Ray actors stay alive across rounds; the simulation's grid and engine poll every 0.1 s"],
    ]
    spread_rows = [[PHASE_LABELS[key], _s(_get(split["departments"].get(key), "mean")),
                    _s(_get(split["departments"].get(key), "min")), _s(_get(split["departments"].get(key), "max"))]
                   for key in (*PATH, "done")]

    lag = ev["log_lag"]
    evidence_rows = [
        ["a SuperNode's previous reply sent → its next message received (rounds ≥ 2)",
         f"{_s(since['mean'])} s (min {_s(since['min'])}, max {_s(since['max'])}); "
         f"whole 3 s sleeps: {_counts(ev['idle_sleeps'])}" if since else "– (one round)",
         "Flower's idle loop pulls right after a reply, then every 3 s: the gap is whole 3 s sleeps plus the "
         f"pull requests' own time, here {_s(_get(rest, 'mean'))} s on average (min {_s(_get(rest, 'min'))}, "
         f"max {_s(_get(rest, 'max'))})"],
        ["`Received successfully` → `Sending`, every department-round",
         f"{_s(_get(ev['received_to_sending'], 'mean'))} s; whole 0.5 s checks: {_counts(checks)}; "
         f"off those multiples by {_s(_get(off, 'mean'))} s (min {_s(_get(off, 'min'))}, max {_s(_get(off, 'max'))})",
         "the SuperNode checks for the reply every 0.5 s after storing the message"],
        ["Flower's ClientApp runtime per message (SuperLink database, run.clientapp_runtime / replies)",
         f"{_s(runtime)} s ({ev['replies_sent']} replies)" if runtime is not None else "– (not readable)",
         f"vs {_s(clientapp_all)} s from `Received successfully` to the ledger entry: the difference "
         f"({_s(clientapp_all - runtime) if runtime is not None and clientapp_all is not None else '–'} s) is the "
         "executor's pickup (0.1 s poll) and the task's input, less the reply's hand-over that Flower also counts"],
        ["the ε line's stamp − the ledger entry's own timestamp",
         f"{lag['mean'] * 1000:.0f} ms mean, {lag['max'] * 1000:.0f} ms max ({lag['count']})" if lag else "–",
         "how late a line from a department's process is stamped (the executor logs ε right after its ledger "
         "append); the SuperNode's lines pass one more pipe, relayed by `department start`"],
        ["processes under the departments during the run",
         ", ".join(f"{name} ×{n}" for name, n in ev["processes_under_departments"]) or "–",
         f"{ev['processes_started_during_run']} started during the run"
         + (f" ({', '.join(ev['processes_started_names'])}; see raw.deployment.processes)"
            if ev["processes_started_names"] else
            ": the executor answers every message inside `department start`, no process per message")],
        ["rounds with every event found", f"{split['complete_rounds']} of {len(deploy['seconds'])}"
         + (f" (incomplete: {', '.join(map(str, split['incomplete']))})" if split["incomplete"] else ""),
         "4 SuperNode lines and a ledger entry per department, and the summary.json writes before and after"],
    ]
    poll_rows = [[f"flwr/{f}", f"`{c}`", f"{v:g} s", why] for f, c, v, why in FLOWER_POLLS]
    poll_rows += [[f"fedsilo/{f}", f"`{c}`", f"{v:g} s", why] for f, c, v, why in FEDSILO_POLLS]
    probe_rows = [[label, _s(p.get(key)), _s(p3.get(key)) if p3 else "–"] for key, label in PROBE_STEPS]
    probe_rows.append(["an interpreter that imports nothing (python -c pass)", _s(probe_result["bare_interpreter_s"]), "–"])

    text = (
        "A real deployment on loopback, started with the fedsilo CLI: `certs init`, `certs add-department` ×3, "
        "`coordinator start --state STATE` (flower-superlink on loopback"
        + (f" {deploy['control']}" if deploy.get("control") else "")
        + ", flower-superexec for the ServerApp, nginx on the public address forwarding only the Fleet routes), "
        "`coordinator register --state STATE`, `department start` ×3 (finance, hr, sales: "
        f"{deploy.get('examples', 479)} digits rows each as CSV; each a flower-supernode in process isolation whose "
        "tasks fedsilo's executor answers inside `department start`), then `coordinator run --state STATE "
        f"--rounds {rounds} --min-departments 3` (the coordinator evaluates on {TEST_ROWS} held-out rows); every "
        "process was stopped with its whole tree afterwards. Seconds per round: the ServerApp's clock in "
        f"summary.json. Simulated: `fedsilo simulate --departments 3 --rounds {rounds} --partition iid` on a CSV "
        "of the same 1,797 digits rows (the same 20 % hold-out size and thirds of the rest; same MLP, DP-SGD σ=1, "
        f"C=1, batch 64). Deployed rounds took {_s(d_mean)} s on average vs {_s(s_mean)} s simulated "
        f"({d_mean - s_mean:+.2f} s)"
        + (f"; from round 2 on {_s(d_steady)} s vs {_s(s_steady)} s ({d_steady - s_steady:+.2f} s)" if several
           else " (one round: the simulated one includes starting its Ray workers)")
        + ". Where the time goes is read from events, not assumed: every line the departments print was stamped "
        "on arrival (their SuperNode's `Receiving: train message`, `Received successfully`, `Sending: train "
        "message`, `Sent successfully`, and the executor's ε line"
        + (f", which trails the ledger entry's own timestamp by {lag['mean'] * 1000:.0f} ms on average" if lag else "")
        + "), each department's ledger entry has the executor's timestamp, the summary.json writes end the rounds, "
        "the SuperLink's database holds Flower's total ClientApp runtime, and a sampler (every 0.1 s) listed the "
        f"processes under each department ({ev['processes_started_during_run']} started during the run). "
        "A fresh-interpreter probe timed a department's own work alone. What remains of Flower's fixed intervals "
        "on a round's path: the SuperNode's 3 s idle sleep and its 0.5 s reply check; fedsilo's executor polls "
        "every 0.1 s and the ServerApp pulls at 0.05–0.5 s (cited below, checked against the installed code by "
        "the tests). Start-up, not in the rounds: coordinator "
        f"{_s(deploy.get('coordinator_start_s'))} s, departments online {_s(deploy.get('departments_online_s'))} s "
        "(each imports torch, Opacus and the ClientApp once). **Measured on a 2-core machine shared with other "
        "CPU-heavy work: timings are noisy.**"
        + (" Quick mode: 1 round, one probe alone." if quick else "")
    )

    d_basis = d_steady if several else deploy["seconds"][0]
    s_basis = s_steady if several else sim["seconds"][0]
    extra = d_basis - s_basis
    wait = _get(basis, "wait")
    target_note = ""
    if basis:
        target_note = (
            f"{basis_label}, the critical department (whose reply left last): {_s(wait)} s waiting for its message "
            f"(the SuperNode's idle sleep, hard-coded `time.sleep(3)` in Flower {flower}: no setting changes it), "
            f"{_s(basis['download'])} s download, {_s(basis['clientapp'])} s executor and ClientApp, "
            f"{_s(basis['reply_wait'])} s until the 0.5 s reply check, {_s(basis['upload'])} s upload, "
            f"{_s(basis['collect'])} s ServerApp pull, FedAvg and evaluation. The deployed round minus that wait "
            f"is {_s(d_basis - wait)} s, {d_basis - wait - s_basis:+.2f} s against the simulated one."
        )
    if quick:
        target_note += (" Quick mode: one round, so round 1 is compared: the simulated one includes starting Ray's "
                        "workers, the deployed one fetching the app and a cold first train_dp; judged on rounds ≥ 2 "
                        "of the full run.")
    elif extra > TARGET_EXTRA_S:
        target_note += (" What would close it: the idle wait is Flower's SuperNode loop (`time.sleep(3)` between "
                        "pulls while idle, no setting; the evidence table shows how many whole sleeps passed between "
                        "a reply and the next message); the rest is listed in 'Where a deployed round's time goes'.")
    targets = [
        Target(
            "a deployed round at most 3 s slower than the same round simulated",
            f"{basis_label}: deployed {_s(d_basis)} s vs simulated {_s(s_basis)} s: {extra:+.2f} s per round",
            None if quick else extra <= TARGET_EXTRA_S,
            target_note.strip(),
        ),
        Target(
            "where Flower's 3 s idle poll prevents it: every second of a deployed round accounted for",
            f"{split['complete_rounds']} of {len(deploy['seconds'])} rounds split at every department's logged events"
            + (f" (incomplete: rounds {', '.join(map(str, split['incomplete']))})" if split["incomplete"] else "")
            + (f"; the phases add up to {_s(_get(split['mean'], 'span'))} s per round vs the ServerApp's "
               f"{_s(_get(split['mean'], 'seconds_summary'))} s" if split.get("mean") else ""),
            split["complete"],
            "Consecutive spans between events of the same round (summary.json write, the SuperNode's four lines, the "
            "ledger entry, the next summary.json write) tile each round; within a span the parts are given by "
            "Flower's and fedsilo's cited intervals, Flower's ClientApp runtime and the probe. Met when every round "
            "has every event for every department.",
        ),
    ]
    return BenchResult(
        name=NAME,
        title="Deployment overhead: a TLS deployment on loopback vs the same work simulated",
        quick=quick,
        text=text,
        tables=[
            Table("Seconds per round (3 departments)", ["round", "TLS deployment", "simulation", "difference", "ratio"],
                  per_round_rows),
            Table("Where a deployed round's time goes: the critical path (the department whose reply left last), "
                  "between logged events (seconds)",
                  ["phase", "round 1", "rounds ≥ 2 (mean)", "what it is (measured)"], where_rows),
            Table("Every department's phases (seconds over all department-rounds)", ["phase", "mean", "min", "max"],
                  spread_rows),
            Table("Evidence for the intervals (from the stamped logs, the ledgers and the SuperLink)",
                  ["what", "measured", "reading"], evidence_rows),
            Table("A department's own work alone, in a fresh interpreter, without Flower (seconds, medians)",
                  ["step", f"alone ({probe_result['repeats']})", f"{together} at once"], probe_rows),
            Table(f"Polling on a deployed round's path (Flower {flower} and fedsilo)", ["file", "code", "interval", "effect"],
                  poll_rows),
        ],
        plots=[PLOT],
        targets=targets,
        raw={"rounds": rounds, "deployment": deploy, "simulation": sim, "phases": split, "probe": probe_result,
             "flower_polls": [{"file": f, "code": c, "seconds": v, "effect": w} for f, c, v, w in FLOWER_POLLS],
             "fedsilo_polls": [{"file": f, "code": c, "seconds": v, "effect": w} for f, c, v, w in FEDSILO_POLLS]},
    )


def run(out: Path, quick: bool, smoke: bool = False) -> BenchResult:
    """The benchmark; ``smoke`` (the test suite's) is quick mode: one round is already its smallest size."""
    quick = quick or smoke
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    logs = out / "deployment"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    root = Path(tempfile.mkdtemp(prefix="fedsilo-bench-deploy-"))
    try:
        data = write_data(root / "data")
        _log(f"TLS deployment on loopback, 3 departments × {rounds} round(s) …")
        deploy = run_deployment(root, data, rounds, logs)
        deploy["examples"] = sum(1 for _ in open(data[DEPARTMENTS[0]])) - 1
        _log(f"  rounds {', '.join(_s(s) for s in deploy['seconds'])} s")
        _log(f"simulation, 3 departments × {rounds} round(s) …")
        sim = run_simulation(data, rounds, root / "sim", logs / "simulate.log")
        _log(f"  rounds {', '.join(_s(s) for s in sim['seconds'])} s")
        _log("a department's own work in a fresh interpreter …")
        probe_result = run_probe(data[DEPARTMENTS[0]], data["test"], repeats=1 if quick else 3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return build_result(deploy, sim, probe_result, out, quick, rounds)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The deployment benchmark's fresh-interpreter probe.")
    parser.add_argument("--probe", nargs=2, metavar=("DEPARTMENT_CSV", "TEST_CSV"), required=True)
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    print(PROBE_MARKER + json.dumps(probe(Path(args.probe[0]), Path(args.probe[1]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
