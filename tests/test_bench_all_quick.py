"""`fedsilo bench all --quick`, as CI runs it: every benchmark runs end to end and
writes outputs that exist and parse.  Timings are never asserted here."""

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
from fedsilo.simulations.bench.cli import SUITE
from fedsilo.simulations.bench.report import render


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    log = out / "bench.log"
    with log.open("w") as sink:
        # Its own session, so that whatever it starts (Flower, Ray, department
        # processes) is ended with it even when this test fails or times out.
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedsilo", "bench", "all", "--quick", "--out", str(out)],
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            code = proc.wait(timeout=1500)
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


def test_every_benchmark_writes_a_complete_json_result(quick_bench):
    results = _results(quick_bench)
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


def test_every_plot_is_a_real_png(quick_bench):
    for name, r in _results(quick_bench).items():
        assert r["plots"], f"{name} drew no plot"
        for plot in r["plots"]:
            image = imread(quick_bench / plot)
            assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, plot
            assert image.std() > 0, f"{plot} is blank"


def test_benchmarks_md_has_every_target_table_and_plot(quick_bench):
    text = (quick_bench / "BENCHMARKS.md").read_text()
    assert "**Quick mode**" in text
    for r in _results(quick_bench).values():
        assert f"## {r['title']}" in text
        for target in r["targets"]:
            assert f"| {r['name']} | {target['target']} |" in text
        for table in r["tables"]:
            assert f"**{table['title']}**" in text
        for plot in r["plots"]:
            assert f"]({plot})" in text and (quick_bench / plot).exists()


def test_report_rerenders_the_same_summary(quick_bench, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in quick_bench.glob("*.json"):
        (copy / path.name).write_text(path.read_text())
    result = CliRunner().invoke(app, ["bench", "report", "--out", str(copy)])
    assert result.exit_code == 0, result.output
    # The same summary, except for the folder it names as the results' home.
    expected = (quick_bench / "BENCHMARKS.md").read_text().replace(str(quick_bench), str(copy))
    assert (copy / "BENCHMARKS.md").read_text() == expected
    assert render(copy) == copy / "BENCHMARKS.md"


def test_bad_bench_input_is_named(tmp_path):
    result = CliRunner().invoke(app, ["bench", "run", "speed", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown benchmark(s) speed" in result.output
    result = CliRunner().invoke(app, ["bench", "report", "--out", str(tmp_path)])
    said = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2 and "no results" in said and "fedsilo bench all" in said


def test_report_elsewhere_links_the_plots_relative_to_itself(quick_bench, tmp_path):
    summary = tmp_path / "docs" / "BENCHMARKS.md"
    summary.parent.mkdir()
    result = CliRunner().invoke(app, ["bench", "report", "--out", str(quick_bench), "--to", str(summary)])
    assert result.exit_code == 0, result.output
    text = summary.read_text()
    for r in _results(quick_bench).values():
        for plot in r["plots"]:
            link = next(line for line in text.splitlines() if line.startswith(f"![{plot}]("))
            assert (summary.parent / link[len(f"![{plot}]("):-1]).resolve() == (quick_bench / plot).resolve()
