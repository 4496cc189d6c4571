"""The scale and deployment-overhead benchmarks: their instruments and result format, not their timings.

Nothing here starts a simulation or a deployment (``fedsilo bench all --quick``
runs both); what is checked is that the memory sampler sees a whole process
tree, that the plain-loop baseline does the ClientApp's real work (signed,
verifiable ledgers, one ε call per department-round), that the deployment
benchmark's instruments read what the processes really log (Flower's own
logger, the SuperLink's own schema, summary.json written as the ServerApp
writes it), that its breakdown tiles each round, that results render, and that a
saved result (the stored references included) re-renders from its raw numbers alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import flwr
from fedsilo.benchmarks.deployment_overhead import data as dep_data
from fedsilo.benchmarks.deployment_overhead import measure as dep_measure
from fedsilo.benchmarks.deployment_overhead import phases as dep_phases
from fedsilo.benchmarks.deployment_overhead import polls as dep_polls
from fedsilo.benchmarks.deployment_overhead import present as dep_present
from fedsilo.benchmarks.deployment_overhead import processes as dep_processes
from fedsilo.benchmarks import scale
from fedsilo.benchmarks.prose import TEMPLATES
from fedsilo.benchmarks.common import TreeMemory
from fedsilo.benchmarks.report import render
from fedsilo.shared.flower_cli import stop_tree

ALLOCATE = textwrap.dedent(
    """
    import sys, time
    block = bytearray(200 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1  # touch every page: resident, not just reserved
    print("ready", flush=True)
    time.sleep(float(sys.argv[1]))
    """
)


def test_tree_memory_counts_a_grandchild_allocation(tmp_path):
    script = tmp_path / "allocate.py"
    script.write_text(ALLOCATE)
    # sh -> python: the allocation is in a grandchild of the process being watched.
    proc = subprocess.Popen(["sh", "-c", f'"{sys.executable}" "{script}" 2'], stdout=subprocess.PIPE, text=True)
    try:
        with TreeMemory(proc.pid, interval=0.1) as memory:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.5)
        proc.wait(timeout=30)
    finally:
        stop_tree(proc)
    assert memory.peak > 190 * 2**20, memory.peak  # sh alone is a few hundred KiB


def _fake_sim(n: int, seconds: list[float], peak_gib: float, wall: float) -> dict:
    return {
        "departments": n, "rounds": len(seconds), "status": "completed", "seconds": seconds,
        "trained": [n] * len(seconds), "refused": [0] * len(seconds), "failed": [0] * len(seconds),
        "mean_round_s": sum(seconds) / len(seconds), "steady_round_s": sum(seconds[1:]) / len(seconds[1:]),
        "department_rounds_per_s": n * len(seconds) / sum(seconds), "wall_s": wall, "run_wall_time_s": wall - 5,
        "startup_s": wall - sum(seconds), "peak_pss_bytes": int(peak_gib * 2**30), "peak_pss_gib": peak_gib,
        "max_processes": 20, "processes_at_max": {"ray::ClientAppActor": 2}, "ray_client_workers": 2,
        "final_accuracy": 0.9, "max_epsilon": 8.4, "run_dir": "x", "command": [],
    }


def _fake_plain(n: int, seconds: list[float], workers: int) -> dict:
    return {
        "departments": n, "rounds": len(seconds), "workers": workers, "dataset": "mnist5k", "setup_s": 12.0,
        "seconds": seconds, "trained": [n] * len(seconds), "refused": [0] * len(seconds),
        "mean_round_s": sum(seconds) / len(seconds), "steady_round_s": sum(seconds[1:]) / len(seconds[1:]),
        "department_rounds_per_s": n * len(seconds) / sum(seconds), "final_accuracy": 0.9,
        "clock": {"setup": 1.0, "guard": 2.0, "training": 5.0, "ledger": 1.0, "server": 1.0},
        "worker_seconds": 9.0, "epsilon_calls": n * len(seconds), "epsilon_nonempty_calls": n * len(seconds),
        "epsilon_seconds": 2.0, "epsilon_calls_per_department_round": 1.0, "accounting_share": 0.2,
        "workers_peak_pss_bytes": 2**30, "ledger_dir": None,
    }


def test_scale_result_targets_plot_and_report(tmp_path):
    rows = [
        {"departments": n, "simulation": _fake_sim(n, sim, peak, wall),
         "plain_parallel": _fake_plain(n, par, 2), "plain_sequential": _fake_plain(n, seq, 1)}
        for n, sim, peak, wall, par, seq in (
            (10, [20.0, 5.0, 5.0], 2.5, 60.0, [5.0, 5.0, 5.0], [9.0, 9.0, 9.0]),
            (100, [30.0, 12.0, 12.0], 3.0, 90.0, [10.0, 10.0, 10.0], [19.0, 19.0, 19.0]),
            (1000, [150.0, 140.0, 140.0], 5.5, 480.0, [100.0, 100.0, 100.0], [190.0, 190.0, 190.0]),
        )
    ]
    result = scale.build_result(rows, tmp_path, quick=False, rounds=3)
    saved = json.loads(result.save(tmp_path).read_text())
    assert {"name", "title", "quick", "text", "tables", "plots", "targets", "raw", "machine"} <= set(saved)
    assert saved["name"] == "scale" and saved["raw"]["rows"][2]["departments"] == 1000
    targets = {t["target"].split(" ")[0]: t for t in saved["targets"]}
    assert targets["1,000"]["met"] is True  # 480 s end to end
    assert targets["…"]["met"] is True and targets["…"]["measured"] == "5.50 GiB"
    overhead = targets["orchestration"]
    assert overhead["met"] is False and overhead["measured"].startswith("+80%")  # 18 s vs 10 s per round
    assert targets["privacy"]["met"] is True
    assert (tmp_path / scale.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [len(t["rows"]) for t in saved["tables"]] == [3, 6, 3]
    markdown = render(tmp_path).read_text()
    assert "Simulation scale" in markdown and "| scale | 1,000 departments" in markdown

    quick = scale.build_result(rows[:2], tmp_path / "quick", quick=True, rounds=3)
    assert [t.met for t in quick.targets][:3] == [None, None, False]  # 1,000 not run; overhead at 100 measured


def test_timeline_sees_department_processes_and_summary_writes(tmp_path):
    fake = tmp_path / "bin" / "flower-supernode"
    fake.parent.mkdir()
    fake.write_text("import time\ntime.sleep(1.5)\n")
    summary = tmp_path / "summary.json"

    def write(rounds: int) -> float:  # as the ServerApp writes it: a temporary file, then os.replace
        tmp = tmp_path / ".summary.json.tmp"
        tmp.write_text(json.dumps({"initial": {"accuracy": 0.1}, "rounds": [{"seconds": 1.0}] * rounds}))
        os.replace(tmp, summary)
        return os.stat(summary).st_mtime

    department = subprocess.Popen(["sh", "-c", f'sleep 0.6; "{sys.executable}" "{fake}"; sleep 5'])
    try:
        time.sleep(0.2)  # sh has started its first `sleep` before the first sample
        with dep_processes.Timeline({"finance": department}, summary, interval=0.05) as timeline:
            time.sleep(0.2)
            written = {0: write(0)}
            time.sleep(1.0)
            written[1] = write(1)
            time.sleep(0.3)
            written[3] = write(3)  # two rounds in one version: round 2's own write was never seen
            time.sleep(0.6)
    finally:
        stop_tree(department)
    assert [k for k, *_ in timeline.round_ends] == [0, 1, 3]
    assert [mtime for _, mtime, _ in timeline.round_ends] == [written[0], written[1], written[3]]
    processes = list(timeline.processes.values())
    assert all(p["department"] == "finance" for p in processes)
    assert any(p["name"] == "sleep" and p["at_start"] for p in processes)
    supernode = [p for p in processes if p["name"] == "flower-supernode"]
    assert len(supernode) == 1 and supernode[0]["at_start"] is False
    assert 1.0 < supernode[0]["last"] - supernode[0]["first"] < 2.5


FLOWER_LIKE_DEPARTMENT = textwrap.dedent(
    """
    import time
    from logging import INFO
    from flwr.common import log
    log(INFO, "")
    log(INFO, "[RUN %s]", 7)
    log(INFO, "Receiving: %s message (ID: %s)", "train", "abc")
    log(INFO, "Received successfully")
    time.sleep(0.3)
    log(INFO, "[%s] round %s: ε=%.3f (δ=%g)", "finance", 1, 0.512, 1e-5)
    log(INFO, "")
    log(INFO, "[RUN %s]", 7)
    log(INFO, "Sending: %s message (ID: %s)", "train", "def")
    log(INFO, "Sent successfully")
    """
)


def test_stamped_output_reads_flowers_own_log_lines(tmp_path):
    script = tmp_path / "department.py"
    script.write_text(FLOWER_LIKE_DEPARTMENT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, encoding="utf-8", errors="replace", env=env)
    reader = dep_processes.StampedOutput(proc.stdout, tmp_path / "finance.log")
    reader.start()
    assert proc.wait(timeout=120) == 0
    reader.join(timeout=10)
    stamps = [t for t, _ in reader.lines]
    assert stamps == sorted(stamps) and len(stamps) >= 9
    events = dep_processes.department_events(reader.lines)
    assert [len(events[k]) for k in ("receiving", "received", "sending", "sent")] == [1, 1, 1, 1]
    assert [r for r, _ in events["epsilon_lines"]] == [1]
    assert events["receiving"][0] <= events["received"][0] <= events["epsilon_lines"][0][1] <= events["sending"][0]
    assert events["sending"][0] - events["received"][0] >= 0.3  # the child slept between them
    logged = (tmp_path / "finance.log").read_text(encoding="utf-8")
    assert "\x1b" not in logged and "Receiving: train message (ID: abc)" in logged
    first = logged.splitlines()[0].split(" ", 1)[0]
    assert float(first) == pytest.approx(stamps[0], abs=1e-3)
    # Nothing before `since` counts: a run's events only.
    assert dep_processes.department_events(reader.lines, since=stamps[-1] + 1) == {
        "receiving": [], "received": [], "sending": [], "sent": [], "epsilon_lines": []}


def test_the_parsed_lines_are_the_ones_flower_and_fedsilo_log():
    supernode = (Path(flwr.__file__).parent / "supernode" / "start_client_internal.py").read_text()
    for code in ('"Receiving: %s message (ID: %s)"', '"Received successfully"', '"Sending: %s message (ID: %s)"',
                 '"Sent successfully"'):
        assert code in supernode, f"{code} is no longer logged by flwr/supernode/start_client_internal.py"
    import fedsilo

    guard = (Path(fedsilo.__file__).parent / "client" / "budget_guard.py").read_text(encoding="utf-8")
    assert '"[%s] round %s: ε=%.3f (δ=%g)"' in guard
    assert dep_processes.EPSILON_LINE.search("INFO :      [hr] round 12: ε=0.512 (δ=1e-05)").group("round") == "12"
    assert dep_processes.EPSILON_LINE.search("WARNING :   [hr] round 12 refused: budget") is None


def test_department_events_pairs_each_message_with_its_success_line():
    lines = [
        (1.0, "Received successfully"),  # before any message: not an event
        (2.0, "INFO :      Receiving: train message (ID: a)"),
        (2.5, "INFO :      Received successfully"),
        (3.0, "INFO :      [sales] round 1: ε=0.100 (δ=1e-05)"),
        (3.1, "12/01/2026 09:56:47:INFO:[sales] round 1: ε=0.100 (δ=1e-05)"),  # a second handler's copy
        (4.0, "INFO :      Sending: train message (ID: b)"),
        (4.2, "INFO :      Sent successfully"),
        (5.0, "INFO :      Receiving: evaluate message (ID: c)"),  # not a train message
        (9.0, "INFO :      Receiving: train message (ID: d)"),
        (9.1, "INFO :      Received successfully"),
        (9.2, "INFO :      Received successfully"),  # a second one: only the first counts
    ]
    events = dep_processes.department_events(lines)
    assert events == {"receiving": [2.0, 9.0], "received": [2.5, 9.1], "sending": [4.0], "sent": [4.2],
                      "epsilon_lines": [[1, 3.0]]}


def test_clientapp_runtime_reads_the_superlink_schema(tmp_path):
    from sqlalchemy import create_engine, insert

    from flwr.supercore.state.schema.linkstate_models import LinkStateBase, Run

    database = tmp_path / "superlink.db"
    engine = create_engine(f"sqlite:///{database}")
    LinkStateBase.metadata.create_all(engine, tables=[Run.__table__])
    run_id = 2**63 + 5  # a uint64 run id, stored as sint64
    with engine.begin() as conn:
        conn.execute(insert(Run.__table__).values(run_id=run_id - 2**64, primary_task_id=1, clientapp_runtime=4.5))
    engine.dispose()
    assert dep_measure.clientapp_runtime(database, str(run_id)) == pytest.approx(4.5)
    assert dep_measure.clientapp_runtime(database, "17") is None
    assert dep_measure.clientapp_runtime(tmp_path / "missing.db", str(run_id)) is None


def _deployment_record() -> dict:
    """Two rounds, three departments: stamps chosen so that every phase is known (see the comments)."""
    t0 = 1000.0
    names = dep_data.DEPARTMENTS
    departments, ledgers = {}, {}
    for i, name in enumerate(names):
        # Round 1 starts at t0: messages received 1 + 0.5 i s in, 0.2 s download, the ledger entry
        # 3.2 + 0.5 i s later, the reply check (7 + i) × 0.5 s after "Received", 0.1 s upload.
        recv1 = t0 + 1 + 0.5 * i
        ok1, led1 = recv1 + 0.2, recv1 + 0.2 + 3.2 + 0.5 * i
        send1 = ok1 + 3.5 + 0.5 * i
        sent1 = send1 + 0.1
        # Round 2: one 3 s idle sleep (+ 0.02 s of pulls) after the reply, 0.1 s download, 1.2 s to the
        # ledger, 3 reply checks, 0.1 s upload.
        recv2 = sent1 + 3.02
        ok2, led2 = recv2 + 0.1, recv2 + 0.1 + 1.2
        send2 = ok2 + 1.5
        sent2 = send2 + 0.1
        departments[name] = {"receiving": [recv1, recv2], "received": [ok1, ok2], "sending": [send1, send2],
                             "sent": [sent1, sent2], "epsilon_lines": [[1, led1 + 0.004], [2, led2 + 0.004]]}
        ledgers[name] = [[1, led1], [2, led2]]
    return {
        "seconds": [7.1, 4.75], "trained": [3, 3], "status": "completed", "run_id": "7", "final_accuracy": 0.8,
        # sales' replies leave last: 1006.8 and 1011.52; the summary is written 0.4 s and 0.48 s later.
        "round_ends": [[0, t0, t0], [1, 1007.2, 1007.25], [2, 1012.0, 1012.05]],
        "departments": departments, "ledger_times": ledgers,
        "processes": [{"department": n, "pid": 10 + i, "name": "flower-supernode", "first": t0 - 5, "last": 1012.0,
                       "at_start": True} for i, n in enumerate(names)],
        "clientapp_runtime_s": 6.0, "control": "127.0.0.1:5000",
        "coordinator_start_s": 3.0, "departments_online_s": 8.0, "examples": 479,
    }


def test_deployment_phases_tile_each_round():
    split = dep_phases.phases(_deployment_record())
    assert split["complete"] and split["incomplete"] == [] and split["complete_rounds"] == 2
    one, two = split["rounds"]
    assert one["critical"] == two["critical"] == "sales"
    assert one["start_from"] == "previous summary write"
    for key, value in {"wait": 2.0, "download": 0.2, "clientapp": 4.2, "reply_wait": 0.3, "upload": 0.1,
                       "collect": 0.4, "span": 7.2, "between_rounds": 0.1}.items():
        assert one[key] == pytest.approx(value), key
    for key, value in {"wait": 2.62, "download": 0.1, "clientapp": 1.2, "reply_wait": 0.3, "upload": 0.1,
                       "collect": 0.48, "span": 4.8, "between_rounds": 0.05}.items():
        assert two[key] == pytest.approx(value), key
    for r in (one, two):  # the critical path's phases add up to the round's span
        assert sum(r[key] for key in dep_phases.PHASES) == pytest.approx(r["span"])
    assert split["first"]["wait"] == pytest.approx(2.0) and split["steady"]["wait"] == pytest.approx(2.62)
    assert split["departments"]["download"]["count"] == 6
    ev = split["evidence"]
    assert ev["since_previous_reply"]["mean"] == pytest.approx(3.02) and ev["idle_sleeps"] == {1: 3}
    assert ev["since_previous_reply_minus_sleeps"]["mean"] == pytest.approx(0.02)
    assert ev["reply_checks"] == {3: 3, 7: 1, 8: 1, 9: 1}
    assert ev["received_to_sending_minus_checks"]["max"] == pytest.approx(0.0, abs=1e-9)
    assert ev["log_lag"]["mean"] == pytest.approx(0.004)
    assert ev["clientapp_runtime_per_message"] == pytest.approx(1.0) and ev["replies_sent"] == 6
    assert ev["processes_started_during_run"] == 0
    assert ev["processes_under_departments"] == [("flower-supernode", 3)]


def test_deployment_phases_name_incomplete_rounds():
    record = _deployment_record()
    record["departments"]["sales"]["sent"].pop()  # sales' round-2 reply never logged as sent
    split = dep_phases.phases(record)
    assert not split["complete"] and split["incomplete"] == [2] and split["complete_rounds"] == 1
    assert split["rounds"][1]["critical"] == "hr" and len(split["rounds"][1]["departments"]) == 2
    record = _deployment_record()
    record["round_ends"] = [[0, 1000.0, 1000.0], [2, 1012.0, 1012.05]]  # round 1's write was not seen
    split = dep_phases.phases(record)
    assert split["incomplete"] == [1] and split["rounds"][0]["round"] == 2
    assert split["rounds"][0]["start_from"] == "clock" and split["rounds"][0]["span"] == pytest.approx(4.75)


def _probe() -> dict:
    alone = {"import_client_app_s": 3.0, "import_opacus_s": 0.0, "read_table_s": 0.1, "epsilon_s": 0.2,
             "train_dp_cold_s": 1.0, "train_dp_warm_s": 0.3, "evaluate_s": 0.01, "process_wall_s": 6.0}
    return {"median": alone, "together_median": {k: 2 * v for k, v in alone.items()}, "runs": [],
            "together_runs": [], "bare_interpreter_s": 0.05, "repeats": 1, "together": 3}


def test_deployment_result_tables_targets_and_report(tmp_path):
    sim = {"status": "completed", "seconds": [4.0, 1.25], "trained": [3, 3], "final_accuracy": 0.8, "wall_s": 40.0}
    result = dep_present.build_result(_deployment_record(), sim, _probe(), tmp_path, quick=False, rounds=2)
    saved = json.loads(result.save(tmp_path).read_text())
    assert saved["name"] == "deployment"
    tables = {t["title"].split(" (")[0].split(":")[0]: t for t in saved["tables"]}
    for table in saved["tables"]:
        assert table["rows"] and all(len(row) == len(table["columns"]) for row in table["rows"]), table["title"]
    assert saved["tables"][0]["rows"][-1] == ["mean of rounds ≥ 2", "4.75", "1.25", "+3.50", "3.8×"]
    where = {row[0]: row for row in tables["Where a deployed round's time goes"]["rows"]}
    assert where[dep_present.PHASE_LABELS["wait"]][1:3] == ["2.00", "2.62"]
    assert where[dep_present.PHASE_LABELS["collect"]][1:3] == ["0.40", "0.48"]
    assert "1.00 s per message" in where[dep_present.PHASE_LABELS["clientapp"]][3]  # Flower's runtime, 6.0 s / 6 replies
    assert where["sum: previous summary.json write → this round's"][1:3] == ["7.20", "4.80"]
    evidence = {row[0]: row for row in tables["Evidence for the intervals"]["rows"]}
    assert "whole 3 s sleeps: 1 (3×)" in evidence[
        "a SuperNode's previous reply sent → its next message received (rounds ≥ 2)"][1]
    assert evidence["processes under the departments during the run"][1] == "flower-supernode ×3"
    assert evidence["rounds with every event found"][1] == "2 of 2"
    polls = {row[0] for row in tables["Polling on a deployed round's path"]["rows"]}
    assert "fedsilo/client/executor.py" in polls and "flwr/supernode/start_client_internal.py" in polls
    slower, accounted = saved["targets"]
    assert slower["met"] is False and slower["measured"].endswith("+3.50 s per round")  # 4.75 s vs 1.25 s
    assert "2.62 s waiting for its message" in slower["note"] and "+0.88 s" in slower["note"]  # 4.75 − 2.62 − 1.25
    assert accounted["met"] is True and accounted["measured"].startswith("2 of 2 rounds")
    assert (tmp_path / dep_present.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = render(tmp_path).read_text()
    assert "Deployment overhead" in markdown and "| deployment | a deployed round at most 3 s slower" in markdown

    quick = dep_present.build_result(_deployment_record(), sim, _probe(), tmp_path / "quick", quick=True, rounds=2)
    assert quick.targets[0].met is None and quick.targets[1].met is True
    within = {**sim, "seconds": [4.0, 2.0]}
    assert dep_present.build_result(_deployment_record(), within, _probe(), tmp_path / "within", quick=False,
                            rounds=2).targets[0].met is True  # 4.75 s vs 2.0 s


def _secure_cell(seconds: list[float], up: int, down: int, bits: int) -> dict:
    return {"rounds": len(seconds), "round_seconds": seconds, "median_round_seconds": seconds[-1],
            "model_bytes": 38_440, "upload_bytes": up, "download_bytes": 38_440 + down, "protocol_download_bytes": down,
            "setup_bytes": 30_000, "setup_seconds": 2.5, "vector_length": 9_611, "modulus_bits": bits,
            "threshold": 3, "wall_time_s": 30.0, "accuracy": 0.9, "args": ["--secure-aggregation"], "run_wall_s": 31.0}


def test_deployment_result_has_the_secure_modes_table_when_they_ran(tmp_path):
    sim = {"status": "completed", "seconds": [4.0, 1.25], "trained": [3, 3], "final_accuracy": 0.8, "wall_s": 40.0}
    secure = {"departments": 3, "rounds": 2,
              "modes": {"secagg": _secure_cell([5.0, 2.5], 49_997, 6_755, 41), "ddp": _secure_cell([6.0, 3.0], 78_569, 13_370, 38)}}
    plain = dep_present.build_result(_deployment_record(), sim, _probe(), None, quick=False, rounds=2)
    result = dep_present.build_result(_deployment_record(), sim, _probe(), None, quick=False, rounds=2, secure=secure)
    assert len(result.tables) == len(plain.tables) + 1 and result.raw["secure"] == secure and "secure" not in plain.raw
    table = result.tables[-1]
    assert table.title.startswith("Secure aggregation and distributed DP deployed") and "2 round(s)" in table.title
    rows = {row[0]: row for row in table.rows}
    assert list(rows) == ["plain FedAvg (local DP)", "--secure-aggregation (local DP)", "--distributed-dp"]
    assert rows["plain FedAvg (local DP)"][1:5] == ["2", "4.75", "38,440", "38,440"]  # the deployment's own rounds
    assert rows["--secure-aggregation (local DP)"][2:8] == ["2.50", "49,997", "45,195", "2.50", "30,000", "9,611 × 41 bits"]
    assert rows["--distributed-dp"][3] == "78,569" and rows["--distributed-dp"][7] == "9,611 × 38 bits"
    # A saved result re-renders it from raw alone.
    again = dep_present.from_raw(result.raw, quick=False)
    assert again.tables[-1] == table


def test_cited_flower_constants_are_in_the_installed_flower():
    root = Path(flwr.__file__).parent
    for path, code, _, _ in dep_polls.FLOWER_POLLS:
        assert code in (root / path).read_text(), f"{code!r} is no longer in flwr/{path}"


def test_cited_fedsilo_intervals_are_in_the_code():
    import fedsilo

    root = Path(fedsilo.__file__).parent
    for path, code, _, _ in dep_polls.FEDSILO_POLLS:
        assert code in (root / path).read_text(encoding="utf-8"), f"{code!r} is no longer in fedsilo/{path}"


# --------------------------------------------------------------------------- re-rendering saved results

REFERENCE = TEMPLATES.parent / "reference"
SHOWN = ("title", "text", "tables", "targets")  # what BENCHMARKS.md shows of a result


def _normalised(value):
    """Whitespace-normalised strings, lists for tuples: a saved result and a rebuilt one compare equal."""
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("module", [dep_present, scale], ids=["deployment", "scale"])
def test_reference_results_rerender_from_their_raw_numbers(module):
    """The stored reference result, rebuilt from its ``raw`` alone: the same text, tables and targets."""
    path = REFERENCE / f"{module.NAME}.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    rebuilt = asdict(module.rerender(path, draw_plots=False))  # nothing written beside the reference
    for key in SHOWN:
        assert _normalised(rebuilt[key]) == _normalised(saved[key]), key


def test_a_saved_result_rerenders_to_itself(tmp_path):
    """Through JSON (int keys become strings, tuples lists) and back: raw holds everything the summary shows.

    Also what ``fedsilo bench report`` relies on: ``rerender(path)`` reads the saved file.
    """
    sim = {"status": "completed", "seconds": [4.0, 1.25], "trained": [3, 3], "final_accuracy": 0.8, "wall_s": 40.0}
    rows = [{"departments": n, "simulation": _fake_sim(n, [20.0, 5.0, 5.0], 2.5, 60.0),
             "plain_parallel": _fake_plain(n, [5.0, 5.0, 5.0], 2)} for n in (10, 100)]
    for quick in (False, True):
        for module, result in (
            (dep_present, dep_present.build_result(_deployment_record(), sim, _probe(), None, quick, rounds=2)),
            (scale, scale.build_result(rows, None, quick, rounds=3)),
        ):
            path = result.save(tmp_path)
            saved = json.loads(path.read_text(encoding="utf-8"))
            assert not (tmp_path / module.PLOT).exists()  # built without a folder: no plot
            rebuilt = asdict(module.rerender(path))
            for key in SHOWN:
                assert _normalised(rebuilt[key]) == _normalised(saved[key]), (module.NAME, quick, key)
            assert (tmp_path / module.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn beside it
            (tmp_path / module.PLOT).unlink()
