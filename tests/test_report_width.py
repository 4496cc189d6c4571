"""The terminal tables stay readable at 80 columns: every department name, ε and status whole, no ``…``.

A run folder is built from real, signed ledgers (as ``test_audit`` does) with long
department names, then the run's privacy report and the audit are rendered at 80
and 120 columns.
"""

import io
import json
import math

import pytest
from rich.console import Console

from fedsilo.server.central_dp import coordinator_ledger
from fedsilo.audit.terminal import print_audit
from fedsilo.server.report import print_run_report
from fedsilo.shared.terminal import Column, fitted_table
from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism
from fedsilo.audit import audit_path
from fedsilo.shared.ledger import PrivacyLedger, ledger_path, read_ledgers
from fedsilo.shared.signing import simulated_identity

RUN_ID = "4242"
# Long names, and a short one; each with its own mechanisms over four rounds.
DEPARTMENTS = {
    "north-america-retail": Mechanism(1.1, 0.3333, 6),
    "department-07": Mechanism(0.9, 0.125, 16),
    "hr": Mechanism(2.5, 1.0, 2),
}
ROUNDS = 4
BUDGET = 12.0


def _run_folder(folder, central: bool = False):
    """A simulated run's folder: ``summary.json`` and one real ledger per department
    (plus the coordinator's client-level ledger when ``central``)."""
    ledgers = folder / "ledgers"
    summary_rounds = [{"round": r, "trained": sorted(DEPARTMENTS), "epsilon": {}, "accuracy": 0.5, "loss": 1.0}
                      for r in range(1, ROUNDS + 1)]
    departments = {}
    for name, mechanism in DEPARTMENTS.items():
        ledger = PrivacyLedger(ledger_path(ledgers, name), name, simulated_identity(ledgers, name))
        history = []
        for rnd in range(1, ROUNDS + 1):
            history.append(mechanism)
            eps = accounting.epsilon(history, 1e-5, "pld")
            ledger.append(run_id=RUN_ID, round=rnd, mechanism=mechanism, max_grad_norm=1.0, delta=1e-5,
                          accountant="pld", epsilon=eps, num_examples=400, budget=BUDGET)
            summary_rounds[rnd - 1]["epsilon"][name] = eps
        departments[name] = {"epsilon": eps, "rounds_trained": ROUNDS, "rounds_refused": 1 if name == "hr" else 0,
                             "steps": ROUNDS * mechanism.steps, "max_epsilon": BUDGET, "delta": 1e-5}
    summary = {
        "run_id": RUN_ID, "status": "completed", "stop_reason": "", "dp": True, "delta": 1e-5,
        "max_epsilon": BUDGET, "final_accuracy": 0.5, "rounds": summary_rounds, "departments": departments,
        "dataset": {"name": "digits", "num_test": 360},
    }
    if central:
        ledger = coordinator_ledger(folder / "central")
        q, history = 0.5, []
        for rnd in range(1, ROUNDS + 1):
            history.append(Mechanism(1.5, q, 1))
            eps = accounting.epsilon(history, 1e-3, "pld")
            ledger.append(run_id=RUN_ID, round=rnd, mechanism=history[-1], max_grad_norm=1.0, delta=1e-3,
                          accountant="pld", epsilon=eps, num_examples=len(DEPARTMENTS), budget=10.0)
            summary_rounds[rnd - 1]["central"] = {"epsilon": eps, "sampled": 2, "population": len(DEPARTMENTS)}
        summary["central"] = {
            "level": "client", "noise_multiplier": 1.5, "clip_norm": 1.0, "sample_rate": q, "delta": 1e-3,
            "max_epsilon": 10.0, "accountant": "pld", "ledger": "central/coordinator.jsonl", "epsilon": eps,
        }
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


def _render(width, draw) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    draw(console)
    return console.export_text()


def _table_lines(text):
    """The lines of the tables (their borders and rows)."""
    return [line for line in text.splitlines() if line[:1] in set("┏┃┡│└├┠┣┗┌━─")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _run_folder(tmp_path_factory.mktemp("width"), central=True)


@pytest.mark.parametrize("width", [80, 120])
def test_the_run_report_keeps_names_epsilons_and_budgets_whole(run, width):
    text = _render(width, lambda console: print_run_report(run, console))
    assert "…" not in text
    assert all(len(line) <= width for line in _table_lines(text)), text
    ledgers = read_ledgers(run / "ledgers")
    rows = {line.split("│")[1].strip(): line for line in _table_lines(text) if line.startswith("│")}
    assert sorted(rows) == sorted(DEPARTMENTS), text  # each name whole, on its own row
    for name, ledger in ledgers.items():
        assert f" {ledger.epsilon:.3f} " in rows[name], text  # its whole-history ε, on its row
        assert f" {BUDGET - ledger.epsilon:.3f} " in rows[name], text  # what is left of its budget
        assert " 1e-05 " in rows[name], text  # the δ of that ε
    assert "ε=" in text and "client-level" in text.lower()  # the coordinator's guarantee is still stated
    if width == 80:
        assert "Hidden to fit 80 columns" in text, text  # what was left out is named
    else:
        assert "Hidden" not in text and " q " in text and "refused" in text, text


@pytest.mark.parametrize("width", [80, 120])
def test_the_audit_table_keeps_names_epsilons_and_statuses_whole(run, width):
    result = audit_path(run)
    assert result.ok, result.to_json()
    text = _render(width, lambda console: print_audit(result, console))
    assert "…" not in text
    assert all(len(line) <= width for line in _table_lines(text)), text
    rows = [line for line in _table_lines(text) if line.startswith("│")]
    for row in result.rows:
        line = next((line for line in rows if line.split("│")[1].strip().startswith(row.id)), None)
        assert line is not None, f"{row.id} not whole in\n{text}"
        assert f" {row.epsilon:.3f} " in line and " valid " in line and " yes " in line, text
        assert f" {row.delta:g} " in line, text
        if width == 120:
            assert f" {row.epsilon_pld:.3f} " in line and f" {row.epsilon_prv:.3f} " in line, text
    assert "(client-level)" in text  # the coordinator's row: its label may wrap, whole words only
    assert "All ledgers verified" in text


def test_a_failed_verification_says_so_in_full(run, tmp_path):
    """Statuses other than the happy ones (`INVALID`, `NO`) are not cut either."""
    import shutil

    tampered = tmp_path / "run"
    shutil.copytree(run, tampered)
    path = ledger_path(tampered / "ledgers", "north-america-retail")
    lines = path.read_text(encoding="utf-8").splitlines()
    entry = json.loads(lines[0])
    entry["noise_multiplier"] *= 5
    lines[0] = json.dumps(entry, sort_keys=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = audit_path(tampered)
    assert not result.ok
    text = _render(80, lambda console: print_audit(result, console))
    assert "…" not in text
    line = next(line for line in _table_lines(text) if "north-america-retail" in line)
    assert " INVALID " in line and " NO " in line, text
    assert "Verification FAILED" in text


def test_a_table_narrower_than_its_names_folds_them_and_cuts_nothing():
    """Below what even the columns always shown need, long cells fold onto more lines."""
    columns = [Column("department", "left", wrap=True), Column("ε"), Column("σ", drop=1)]
    rows = [["a-department-with-a-very-long-name-indeed", "3.142", "1.000"], ["hr", "∞", "-"]]
    console = Console(width=30, record=True, file=io.StringIO(), color_system=None)
    console.print(fitted_table(console, "narrow", columns, rows))
    text = console.export_text()
    assert "…" not in text and "3.142" in text and "∞" in text
    assert "Hidden to fit 30 columns: σ" in text
    assert all(len(line) <= 30 for line in _table_lines(text)), text
    folded = "".join(line.split("│")[1].strip() for line in _table_lines(text) if line.startswith("│"))
    assert "a-department-with-a-very-long-name-indeed" in folded


def test_a_wide_terminal_gets_every_column_with_one_line_headers():
    columns = [Column("department", "left", wrap=True), Column("rounds (ledger)", drop=2), Column("ε")]
    rows = [["north-america-retail", "20", f"{math.pi:.3f}"]]
    console = Console(width=200, record=True, file=io.StringIO(), color_system=None)
    console.print(fitted_table(console, "wide", columns, rows))
    text = console.export_text()
    assert "rounds (ledger)" in text and "Hidden" not in text
