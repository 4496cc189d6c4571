"""The two runs compared: a TLS deployment on loopback started with the fedsilo CLI, and ``fedsilo simulate``."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from fedsilo.shared.runs import LATEST, resolve_run_dir
from fedsilo.shared.summary_format import read_summary

from .data import DEPARTMENTS, LABEL
from .processes import (FEDSILO, StampedOutput, Timeline, cli, department_events, env, must, progress, spawn,
                        spawn_stamped, stop)

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
            result = cli("coordinator", "departments", "--certs", str(certs), "--address", address,
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


def certificates(root: Path) -> tuple[Path, Path, str]:
    """A CA, the coordinator's and every department's keys under ``root/certs``; the state folder; a free loopback address."""
    from fedsilo.shared.flower_cli import free_port

    certs, state = root / "certs", root / "state"
    must(cli("certs", "init", "--out", str(certs)), "fedsilo certs init")
    for name in DEPARTMENTS:
        must(cli("certs", "add-department", name, "--dir", str(certs)), f"fedsilo certs add-department {name}")
    return certs, state, f"127.0.0.1:{free_port()}"


def run_deployment(root: Path, data: dict[str, Path], rounds: int, logs: Path) -> dict[str, Any]:
    """Certificates, a TLS coordinator and three departments on loopback; one run of ``rounds``; all stopped after."""
    certs, state, address = certificates(root)
    coordinator: subprocess.Popen | None = None
    departments: dict[str, subprocess.Popen] = {}
    readers: dict[str, StampedOutput] = {}
    run_dir = root / "run"
    record: dict[str, Any] = {"address": address, "rounds_requested": rounds}
    try:
        started = time.perf_counter()
        coordinator = spawn(["coordinator", "start", "--certs", str(certs), "--address", address,
                              "--state", str(state)], logs / "coordinator.log")
        info = wait_coordinator(state, coordinator, logs / "coordinator.log")
        check_port(address)
        record["coordinator_start_s"] = time.perf_counter() - started
        record["control"] = info.get("control")
        must(cli("coordinator", "register", *DEPARTMENTS, "--certs", str(certs), "--address", address,
                   "--state", str(state)), "fedsilo coordinator register")
        started = time.perf_counter()
        for name in DEPARTMENTS:
            departments[name], readers[name] = spawn_stamped(
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
            result = cli("coordinator", "run", "--certs", str(certs), "--address", address, "--state", str(state),
                          "--test-data", str(data["test"]), "--label-column", LABEL, "--rounds", str(rounds),
                          "--min-departments", str(len(DEPARTMENTS)), "--out", str(run_dir), timeout=1800)
        record["run_wall_s"] = time.perf_counter() - started
        (logs / "coordinator-run.log").write_text(result.stdout + result.stderr)
        must(result, "fedsilo coordinator run")
    finally:
        for proc in departments.values():
            stop(proc)
        stop(coordinator)
        for reader in readers.values():
            reader.join(timeout=10)
    run_dir = resolve_run_dir(run_dir)
    summary = read_summary(run_dir)
    if (run_dir / "flower.log").exists():
        shutil.copy(run_dir / "flower.log", logs / "coordinator-flower.log")
    for name in ("superlink.log", "superexec.log"):
        if (state / name).exists():
            shutil.copy(state / name, logs / f"coordinator-{name}")
    ledgers = {}
    for name in DEPARTMENTS:
        # A department's ledger file is named after its key (NAME-<fingerprint>.jsonl): the folder holds one.
        paths = sorted((root / "ledgers" / name).glob("*.jsonl"))
        ledgers[name] = [json.loads(line) for path in paths for line in path.read_text().splitlines()]
    record.update(
        status=summary.status,
        run_id=summary.run_id,
        seconds=[float(r.seconds) for r in summary.rounds],
        trained=[len(r.trained) for r in summary.rounds],
        final_accuracy=summary.final_accuracy,
        run_wall_time_s=summary.wall_time_s,
        round_ends=timeline.round_ends,
        processes=sorted(timeline.processes.values(), key=lambda p: p["first"]),
        departments={name: department_events(readers[name].lines, since=record["run_started"])
                     for name in DEPARTMENTS},
        ledger_times={n: [[e["round"], e["timestamp"]] for e in entries if e["run_id"] == summary.run_id]
                      for n, entries in ledgers.items()},
        clientapp_runtime_s=clientapp_runtime(state / "superlink.db", summary.run_id),
    )
    return record



# --------------------------------------------------------------------------- the simulation


def run_simulation(data: dict[str, Path], rounds: int, run_dir: Path, log: Path) -> dict[str, Any]:
    from fedsilo.shared.flower_cli import stop_tree

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [*FEDSILO, "simulate", "--departments", str(len(DEPARTMENTS)), "--rounds", str(rounds),
           "--dataset", str(data["all"]), "--label-column", LABEL, "--partition", "iid", "--out", str(run_dir)]
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env())
    try:
        proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            stop_tree(proc)
    wall = time.perf_counter() - started
    run_dir = resolve_run_dir(run_dir)  # the output folder's latest (only) run
    if proc.returncode != 0 or not (run_dir / "summary.json").exists():
        raise RuntimeError(f"fedsilo simulate exited {proc.returncode}; log {log}: {log.read_text()[-2000:]}")
    summary = read_summary(run_dir)
    return {
        "status": summary.status,
        "seconds": [float(r.seconds) for r in summary.rounds],
        "trained": [len(r.trained) for r in summary.rounds],
        "final_accuracy": summary.final_accuracy,
        "wall_s": wall,
        "command": cmd[1:],
    }


# --------------------------------------------------------------------------- secure modes, deployed

# The secure runs, keyed as bench secagg's cost cells: what each adds to `coordinator run`.  σ 3 keeps
# their ε small; distributed DP takes one DP-SGD step a round at q 0.1 over the three departments' records.
SECURE_MODES = {
    "secagg": ("--secure-aggregation", "--noise-multiplier", "3"),
    "ddp": ("--distributed-dp", "--sample-rate", "0.1", "--noise-multiplier", "3", "--learning-rate", "2"),
}


def model_bytes(run_dir: Path) -> int:
    """Bytes of the global model's arrays, as the run saved them (what a plain round sends each way)."""
    from safetensors import safe_open

    summary = read_summary(run_dir)
    with safe_open(str(run_dir / summary.model), framework="numpy") as weights:
        return sum(weights.get_tensor(key).nbytes for key in weights.keys())


def run_secure_deployment(root: Path, data: dict[str, Path], rounds: int, logs: Path) -> dict[str, Any]:
    """A second TLS deployment on loopback whose departments hold each other's public keys (``--peers``).

    Each mode of :data:`SECURE_MODES` runs ``rounds`` rounds on it; their per-round seconds and bytes
    per department come from the run's summary, as the simulated ones do (``bench secagg``).
    """
    from fedsilo.benchmarks.secure_aggregation import round_costs

    certs, state, address = certificates(root)
    coordinator: subprocess.Popen | None = None
    departments: dict[str, subprocess.Popen] = {}
    modes: dict[str, Any] = {}
    try:
        coordinator = spawn(["coordinator", "start", "--certs", str(certs), "--address", address,
                              "--state", str(state)], logs / "secure-coordinator.log")
        wait_coordinator(state, coordinator, logs / "secure-coordinator.log")
        must(cli("coordinator", "register", *DEPARTMENTS, "--certs", str(certs), "--address", address,
                   "--state", str(state)), "fedsilo coordinator register")
        for name in DEPARTMENTS:
            departments[name] = spawn(
                ["department", "start", "--coordinator", address, "--ca", str(certs / "ca.crt"),
                 "--key", str(certs / "departments" / name), "--data", str(data[name]), "--label-column", LABEL,
                 "--ledger", str(root / "ledgers" / name), "--max-epsilon", "10",
                 "--peers", str(certs / "departments")],
                logs / f"secure-{name}.log",
            )
        wait_online(certs, address, state, len(DEPARTMENTS))
        for mode, args in SECURE_MODES.items():
            progress(f"  {' '.join(args[:1])}, {rounds} round(s) …")
            run_dir = root / "runs" / mode
            started = time.perf_counter()
            result = cli("coordinator", "run", "--certs", str(certs), "--address", address, "--state", str(state),
                          "--test-data", str(data["test"]), "--label-column", LABEL, "--rounds", str(rounds),
                          "--min-departments", str(len(DEPARTMENTS)), "--round-timeout", "120", *args,
                          "--out", str(run_dir), timeout=1800)
            wall = time.perf_counter() - started
            (logs / f"secure-{mode}-run.log").write_text(result.stdout + result.stderr)
            must(result, f"fedsilo coordinator run {args[0]}")
            resolved = resolve_run_dir(run_dir)
            modes[mode] = {"args": list(args), "run_wall_s": wall,
                           **round_costs(resolved, model_bytes(resolved))}
    finally:
        for proc in departments.values():
            stop(proc)
        stop(coordinator)
    return {"departments": len(DEPARTMENTS), "rounds": rounds, "modes": modes}

