"""The scale and deployment-overhead benchmarks: their instruments and result format, not their timings.

Nothing here starts a simulation or a deployment (``fedsilo bench all --quick``
runs both); what is checked is that the memory sampler sees a whole process
tree, that the plain-loop baseline does the ClientApp's real work (signed,
verifiable ledgers, one ε call per department-round), that the deployment
sampler recognises ClientApp processes and rounds, and that results render.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import flwr
from fedsilo.simulations.bench import deployment_overhead as dep
from fedsilo.simulations.bench import scale
from fedsilo.simulations.bench.common import TreeMemory
from fedsilo.simulations.bench.report import render
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


def test_plain_loop_writes_verifiable_ledgers_with_one_epsilon_per_round(tmp_path):
    from fedsilo.shared import accounting
    from fedsilo.shared.audit import audit_path
    from fedsilo.shared.ledger import read_ledgers

    record = scale.run_plain_loop(3, 2, workers=2, dataset="digits", run_dir=tmp_path)
    assert record["workers"] == 2 and record["trained"] == [3, 3] and record["refused"] == [0, 0]
    assert len(record["seconds"]) == 2 and all(s > 0 for s in record["seconds"])
    # The budget guard's dry run: at most one accountant call per department-round (the ε before comes from
    # the ledger), fewer where departments in one worker share a sample rate and σ (the guard remembers ε).
    assert 1 <= record["epsilon_nonempty_calls"] <= 6
    assert 0 < record["epsilon_calls_per_department_round"] <= 1.0
    assert 0 < record["accounting_share"] < 1
    assert record["clock"]["training"] > 0 and record["clock"]["ledger"] > 0 and record["clock"]["server"] > 0
    assert record["workers_peak_pss_bytes"] > 50 * 2**20  # two interpreters with torch loaded
    assert 0.0 <= record["final_accuracy"] <= 1.0

    ledgers = tmp_path / "ledgers"
    audit = audit_path(ledgers)
    assert audit.ok, [d.problems for d in audit.departments]
    assert sorted(d.id for d in audit.departments) == ["dept-00", "dept-01", "dept-02"]
    assert all(d.rounds == 2 and d.signatures == "valid" for d in audit.departments)
    for name, ledger in read_ledgers(ledgers).items():
        entries = ledger.entries
        assert [e.round for e in entries] == [1, 2]
        assert entries[-1].epsilon == pytest.approx(accounting.epsilon(ledger.history, entries[-1].delta), rel=1e-9)


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


def test_timeline_sees_clientapp_processes_and_rounds(tmp_path):
    fake = tmp_path / "bin" / "flwr-clientapp"
    fake.parent.mkdir()
    fake.write_text("import time\ntime.sleep(1.5)\n")
    summary = tmp_path / "summary.json"
    department = subprocess.Popen(["sh", "-c", f'sleep 0.5; "{sys.executable}" "{fake}"; sleep 5'])
    try:
        with dep.Timeline({"finance": department}, summary, interval=0.05) as timeline:
            summary.write_text(json.dumps({"initial": {"accuracy": 0.1}, "rounds": []}))
            time.sleep(2.5)
            summary.write_text(json.dumps({"initial": {"accuracy": 0.1}, "rounds": [{"seconds": 2.5}]}))
            time.sleep(0.3)
    finally:
        stop_tree(department)
    assert [k for k, _ in timeline.round_marks] == [0, 1]
    apps = list(timeline.clientapps.values())
    assert len(apps) == 1 and apps[0]["department"] == "finance"
    assert 1.0 < apps[0]["last"] - apps[0]["first"] < 2.5


def test_deployment_phases_and_result(tmp_path):
    t0 = 1000.0
    record = {
        "seconds": [10.0, 10.0], "trained": [3, 3], "status": "completed", "run_id": "7", "final_accuracy": 0.8,
        "round_marks": [(0, t0), (1, t0 + 10), (2, t0 + 20)],
        "clientapps": [
            {"department": name, "first": t0 + k * 10 + 2 + i, "last": t0 + k * 10 + 7 + i}
            for k in (0, 1) for i, name in enumerate(dep.DEPARTMENTS)
        ],
        "ledger_times": {name: [(1, t0 + 6 + i), (2, t0 + 16 + i)] for i, name in enumerate(dep.DEPARTMENTS)},
        "coordinator_start_s": 3.0, "departments_online_s": 8.0, "examples": 479,
    }
    split = dep.phases(record)
    assert [r["round"] for r in split["rounds"]] == [1, 2]
    assert split["dispatch"] == pytest.approx(3.0)  # 2, 3, 4 s after each round start
    assert split["clientapp_to_ledger"] == pytest.approx(4.0)
    assert split["ledger_to_exit"] == pytest.approx(1.0)
    assert split["slowest_department_done"] == pytest.approx(8.0)  # sales' ledger entry, 8 s into each round
    assert split["collect"] == pytest.approx(2.0)  # from the last ledger entry to the round's end
    sim = {"status": "completed", "seconds": [4.0, 1.0], "trained": [3, 3], "final_accuracy": 0.8, "wall_s": 40.0}
    alone = {"import_client_app_s": 3.0, "import_opacus_s": 0.0, "read_table_s": 0.1, "epsilon_s": 0.2,
             "train_dp_cold_s": 1.0, "train_dp_warm_s": 0.3, "process_wall_s": 6.0}
    probe = {"median": alone, "together_median": {k: 2 * v for k, v in alone.items()}, "runs": [],
             "together_runs": [], "bare_interpreter_s": 0.05, "repeats": 1, "together": 3}
    result = dep.build_result(record, sim, probe, tmp_path, quick=True, rounds=2)
    saved = json.loads(result.save(tmp_path).read_text())
    assert saved["name"] == "deployment"
    titles = [t["title"] for t in saved["tables"]]
    assert any("Where a round's time goes" in t for t in titles)
    assert saved["tables"][0]["rows"][-2] == ["mean", "10.0", "2.50", "4.0×"]
    assert saved["tables"][0]["rows"][-1] == ["mean of rounds ≥ 2", "10.0", "1.00", "10.0×"]
    where = {row[0]: row for row in saved["tables"][1]["rows"]}
    assert where["slowest ledger entry → round end"][1] == "2.00"
    assert "4.30 s" in where["ClientApp process start → its ledger entry is written"][2]  # 3 + 0.1 + 0.2 + 1
    assert (tmp_path / dep.PLOT).exists()
    assert "Deployment overhead" in render(tmp_path).read_text()


def test_cited_flower_constants_are_in_the_installed_flower():
    root = Path(flwr.__file__).parent
    for path, code, _, _ in dep.FLOWER_POLLS:
        assert code in (root / path).read_text(), f"{code!r} is no longer in flwr/{path}"


def test_fresh_interpreter_probe(tmp_path):
    data = dep.write_data(tmp_path)
    assert sum(1 for _ in open(data["test"])) - 1 == dep.TEST_ROWS
    sizes = [sum(1 for _ in open(data[name])) - 1 for name in dep.DEPARTMENTS]
    assert len(set(sizes)) == 1 and sum(sizes) == 1797 - dep.TEST_ROWS
    result = dep.run_probe(data["finance"], data["test"], repeats=1, together=2)
    assert len(result["runs"]) == 1 and len(result["together_runs"]) == 2
    run = result["runs"][0]
    assert run["examples"] == sizes[0] and run["steps"] > 0
    for key in ("import_client_app_s", "import_opacus_s", "epsilon_s", "train_dp_cold_s", "train_dp_warm_s"):
        assert run[key] > 0
    assert run["process_wall_s"] > run["import_client_app_s"]
