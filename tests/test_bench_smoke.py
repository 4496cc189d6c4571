"""`fedsilo bench all --smoke`, as CI runs it: every benchmark runs end to end, at its
smallest size and in quick mode, and writes outputs that exist and parse.  Timings are
never asserted here (the sizes are too small to mean anything: `--quick` and the full
run are for numbers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from fedsilo.cli import app
from fedsilo.benchmarks.cli import SUITE
from fedsilo.benchmarks.report import render


@pytest.fixture(scope="module")
def smoke_bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    log = out / "bench.log"
    with log.open("w") as sink:
        # Its own session, so that whatever it starts (Flower, Ray, department
        # processes) is ended with it even when this test fails or times out.
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedsilo", "bench", "all", "--smoke", "--out", str(out)],
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            code = proc.wait(timeout=1500)  # a bound on a hang: the smoke run takes minutes
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    assert code == 0, log.read_text()[-4000:]
    return out


def _results(out: Path) -> dict[str, dict]:
    return {name: json.loads((out / f"{name}.json").read_text()) for name in SUITE}


@pytest.mark.slow
def test_every_benchmark_writes_a_complete_json_result(smoke_bench):
    results = _results(smoke_bench)
    for name, r in results.items():
        assert r["name"] == name and r["quick"] is True and r["title"] and r["text"]
        assert r["seconds"] > 0 and r["machine"]["cores"] >= 1 and r["machine"]["torch"]
        assert r["load_before"] is None or len(r["load_before"]) == 3
        assert r["tables"], f"{name} has no table"
        for table in r["tables"]:
            assert table["rows"], f"{name}: table '{table['title']}' is empty"
            assert all(len(row) == len(table["columns"]) for row in table["rows"]), table["title"]
        assert r["targets"], f"{name} judges no target"
        for target in r["targets"]:
            assert target["met"] in (True, False, None) and target["target"] and target["measured"]
        assert r["raw"], f"{name} kept no raw data"


@pytest.mark.slow
def test_every_plot_is_a_real_png(smoke_bench):
    for name, r in _results(smoke_bench).items():
        assert r["plots"], f"{name} drew no plot"
        for plot in r["plots"]:
            image = imread(smoke_bench / plot)
            assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, plot
            assert image.std() > 0, f"{plot} is blank"


@pytest.mark.slow
def test_benchmarks_md_has_every_target_table_and_plot(smoke_bench):
    text = (smoke_bench / "BENCHMARKS.md").read_text()
    assert "**Quick mode**" in text
    for r in _results(smoke_bench).values():
        assert f"## {r['title']}" in text
        for target in r["targets"]:
            assert f"| {r['name']} | {target['target']} |" in text
        for table in r["tables"]:
            assert f"**{table['title']}**" in text
        for plot in r["plots"]:
            assert f"]({plot})" in text and (smoke_bench / plot).exists()


@pytest.mark.slow
def test_report_rerenders_the_same_summary(smoke_bench, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in smoke_bench.glob("*.json"):
        (copy / path.name).write_text(path.read_text())
    result = CliRunner().invoke(app, ["bench", "report", "--out", str(copy)])
    assert result.exit_code == 0, result.output
    # The same summary, except for the folder it names as the results' home.
    expected = (smoke_bench / "BENCHMARKS.md").read_text().replace(str(smoke_bench), str(copy))
    assert (copy / "BENCHMARKS.md").read_text() == expected
    assert render(copy) == copy / "BENCHMARKS.md"


@pytest.mark.slow
def test_the_deployment_probe_timed_a_departments_own_work_in_fresh_interpreters(smoke_bench):
    """The probe of the deployment benchmark: one department's table, one after the other, then together."""
    from fedsilo.benchmarks.deployment_overhead import data as dep_data

    raw = _results(smoke_bench)["deployment"]["raw"]
    examples = raw["deployment"]["examples"]  # each department's third of digits, less the held-out rows
    assert examples * len(dep_data.DEPARTMENTS) == 1797 - dep_data.TEST_ROWS
    probe = raw["probe"]
    assert len(probe["runs"]) == probe["repeats"] == 1 and len(probe["together_runs"]) == probe["together"] >= 2
    for run in probe["runs"] + probe["together_runs"]:
        assert run["examples"] == examples and run["steps"] > 0
        for key in ("import_client_app_s", "import_opacus_s", "epsilon_s", "train_dp_cold_s", "train_dp_warm_s",
                    "evaluate_s"):
            assert run[key] > 0, key
        assert run["process_wall_s"] > run["import_client_app_s"]


@pytest.mark.slow
def test_the_deployment_benchmark_found_every_departments_ledger_entry(smoke_bench):
    """The round split needs each department's ledger entry of each round: the files are read as departments name them."""
    from fedsilo.benchmarks.deployment_overhead import data as dep_data

    raw = _results(smoke_bench)["deployment"]["raw"]
    rounds = len(raw["deployment"]["seconds"])
    times = raw["deployment"]["ledger_times"]
    assert sorted(times) == sorted(dep_data.DEPARTMENTS)
    for name, entries in times.items():
        assert [r for r, _ in entries] == list(range(1, rounds + 1)), (name, entries)
    assert "secure" not in raw  # the secure modes deployed are left out of the smoke run


@pytest.mark.slow
def test_the_scale_plain_loop_wrote_verifiable_ledgers_with_one_epsilon_per_round(smoke_bench):
    """The plain-loop baseline does the federation's real work: signed ledgers the audit verifies."""
    from fedsilo.audit import audit_path
    from fedsilo.benchmarks import scale
    from fedsilo.shared import accounting
    from fedsilo.shared.ledger import read_ledgers

    (row,) = _results(smoke_bench)["scale"]["raw"]["rows"]
    n, rounds = row["departments"], scale.SMOKE_ROUNDS
    record = row["plain_parallel"]
    assert record["workers"] == 2 and record["trained"] == [n] * rounds and record["refused"] == [0] * rounds
    assert len(record["seconds"]) == rounds and all(s > 0 for s in record["seconds"])
    # The budget guard's dry run: at most one accountant call per department-round (the ε before comes from
    # the ledger), fewer where departments in one worker share a sample rate and σ (the guard remembers ε).
    assert 1 <= record["epsilon_nonempty_calls"] <= n * rounds
    assert 0 < record["epsilon_calls_per_department_round"] <= 1.0
    assert 0 < record["accounting_share"] < 1
    assert record["clock"]["training"] > 0 and record["clock"]["ledger"] > 0 and record["clock"]["server"] > 0
    assert record["workers_peak_pss_bytes"] > 50 * 2**20  # two interpreters with torch loaded
    assert 0.0 <= record["final_accuracy"] <= 1.0

    ledgers = Path(record["ledger_dir"])
    assert ledgers.is_relative_to(smoke_bench)  # kept beside the results
    audit = audit_path(ledgers)
    assert audit.ok, [d.problems for d in audit.departments]
    assert sorted(d.id for d in audit.departments) == [f"dept-{i:02d}" for i in range(n)]
    assert all(d.rounds == rounds and d.signatures == "valid" for d in audit.departments)
    for ledger in read_ledgers(ledgers).values():
        entries = ledger.entries
        assert [e.round for e in entries] == list(range(1, rounds + 1))
        assert entries[-1].epsilon == pytest.approx(accounting.epsilon(ledger.history, entries[-1].delta), rel=1e-9)


def test_bad_bench_input_is_named(tmp_path):
    result = CliRunner().invoke(app, ["bench", "run", "speed", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown benchmark(s) speed" in result.output
    result = CliRunner().invoke(app, ["bench", "report", "--out", str(tmp_path)])
    said = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2 and "no results" in said and "fedsilo bench all" in said


@pytest.mark.slow
def test_report_elsewhere_links_the_plots_relative_to_itself(smoke_bench, tmp_path):
    summary = tmp_path / "docs" / "BENCHMARKS.md"
    summary.parent.mkdir()
    result = CliRunner().invoke(app, ["bench", "report", "--out", str(smoke_bench), "--to", str(summary)])
    assert result.exit_code == 0, result.output
    text = summary.read_text()
    for r in _results(smoke_bench).values():
        for plot in r["plots"]:
            link = next(line for line in text.splitlines() if line.startswith(f"![{plot}]("))
            assert (summary.parent / link[len(f"![{plot}]("):-1]).resolve() == (smoke_bench / plot).resolve()


def test_smoke_is_each_benchmark_in_quick_mode_at_no_larger_a_size(tmp_path, monkeypatch):
    """What the slow tests above rely on: `--smoke` reaches every benchmark, which then runs in quick mode."""
    import importlib
    import inspect

    from fedsilo.benchmarks import cli as bench_cli
    from fedsilo.benchmarks import dp_cost, robustness, scale, utility

    for module in SUITE.values():
        run = importlib.import_module(f"fedsilo.benchmarks.{module}").run
        assert inspect.signature(run).parameters["smoke"].default is False, module
    assert scale.SMOKE_SIZES[-1] <= scale.QUICK_SIZES[-1] and scale.SMOKE_ROUNDS <= scale.QUICK_ROUNDS
    assert utility.SMOKE.rounds <= utility.QUICK.rounds and utility.SMOKE.departments <= utility.QUICK.departments
    assert utility.SMOKE.datasets == utility.QUICK.datasets and utility.SMOKE.epsilons == utility.QUICK.epsilons
    assert robustness.SMOKE.rounds <= robustness.QUICK.rounds and robustness.SMOKE.repeats <= robustness.QUICK.repeats
    assert robustness.SMOKE.attacks == robustness.QUICK.attacks and robustness.SMOKE.rules == robustness.QUICK.rules

    calls = []

    def fake_child(config, variant, examples, reps, timeout):
        calls.append((config, examples, reps))
        return {"config": config, "variant": variant, "ok": False, "error": "not run"}

    monkeypatch.setattr(dp_cost, "run_child", fake_child)
    monkeypatch.setattr(dp_cost, "build_result", lambda records, out, quick, reps, jobs: quick)
    assert dp_cost.run(tmp_path, quick=False, smoke=True) is True  # a smoke result says quick
    assert {c for c, *_ in calls} == {c for c, spec in dp_cost.CONFIGS.items() if spec.in_quick}
    assert {(e, r) for _, e, r in calls} == {(dp_cost.SMOKE_EXAMPLES, 1)}

    ran = []
    monkeypatch.setattr(importlib, "import_module", lambda name: type("M", (), {
        "run": staticmethod(lambda out, quick, smoke=False: ran.append((name, quick, smoke)) or _Saved())}))
    monkeypatch.setattr(bench_cli, "render", lambda out: None)
    bench_cli.run_benchmarks(list(SUITE), tmp_path, quick=False, smoke=True)
    assert [(n.rsplit(".", 1)[1], q, s) for n, q, s in ran] == [(m, True, True) for m in SUITE.values()]


class _Saved:
    """A stand-in result: what run_benchmarks sets and saves."""

    def save(self, out):
        return out / "x.json"
