"""End to end: `fedsilo simulate --distributed-dp` on Flower's Simulation Engine, real Ray workers.

Each round is one DP-SGD step whose noise the departments add in shares under secure aggregation;
every department's ledger charges one Skellam round per round, and the audit re-derives them.
"""

import json
import subprocess
import sys

import pytest

from federation import run_ledgers

# A second real simulation beside tests/test_secagg_simulation.py's, over a minute: `make test-all`.
pytestmark = pytest.mark.slow

DEPARTMENTS = [f"dept-{i:02d}" for i in range(4)]
ROUNDS = 8


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-sim") / "out"
    result = subprocess.run(
        [sys.executable, "-m", "fedsilo", "simulate", "--departments", "4", "--rounds", str(ROUNDS),
         "--dataset", "digits", "--partition", "iid", "--distributed-dp", "--target-epsilon", "4",
         "--max-epsilon", "8", "--batch-size", "128", "--learning-rate", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result, json.loads((out / "latest" / "summary.json").read_text())


def test_every_round_is_one_noisy_step_from_every_department(distributed_run):
    _, result, summary = distributed_run
    assert summary["status"] == "completed" and len(summary["rounds"]) == ROUNDS
    (session,) = summary["secure_aggregation"]
    assert session["participants"] == DEPARTMENTS and session["vector_length"] == 16384 + 1
    for rnd in summary["rounds"]:
        assert sorted(rnd["trained"]) == DEPARTMENTS and not rnd["rejected"]
    assert summary["final_accuracy"] > summary["initial"]["accuracy"] + 0.3
    assert f"Distributed DP: each of the {ROUNDS} rounds is one DP-SGD step" in " ".join(result.stdout.split())


def test_the_ledgers_charge_skellam_rounds_within_the_target_and_the_audit_re_derives_them(distributed_run):
    out, _, _ = distributed_run
    ledgers = run_ledgers(out)
    assert sorted(ledgers) == DEPARTMENTS
    for entries in ledgers.values():
        assert [e["round"] for e in entries] == list(range(1, ROUNDS + 1))
        assert all(e["kind"] == "skellam" and e["steps"] == 1 and e["version"] == 4 for e in entries)
        assert entries[-1]["epsilon"] <= 4.0 + 1e-9 and entries[-1]["epsilon"] > 3.5
    audit = subprocess.run([sys.executable, "-m", "fedsilo", "audit", str(out / "latest"), "--json"],
                           capture_output=True, text=True, timeout=300)
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"], audit.stdout + audit.stderr
    for row in report["departments"]:
        assert row["epsilon_rdp"] == pytest.approx(row["epsilon"], rel=1e-6)
        assert any("distributed DP" in f for f in row["findings"])


def test_client_level_dp_under_secure_aggregation_is_noise_the_departments_add(tmp_path):
    """`--central-dp --secure-aggregation`: each department clips its whole update and adds its Skellam share;
    the coordinator's signed ledger charges a Skellam release per round (q = 1), which the audit re-derives."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "fedsilo", "simulate", "--departments", "4", "--rounds", "2", "--dataset",
         "breast-cancer", "--partition", "iid", "--secure-aggregation", "--central-dp",
         "--central-noise-multiplier", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["central"]["distributed"] is True
    assert summary["central"]["accountant"] == "rdp-skellam"
    assert "the coordinator saw only the noisy sum" in " ".join(result.stdout.split())
    central = [json.loads(line) for line in (out / "central" / "coordinator.jsonl").read_text().splitlines()]
    assert [e["round"] for e in central] == [1, 2]
    assert all(e["kind"] == "skellam" and e["sample_rate"] == 1.0 and e["participants"] == 4 for e in central)
    assert central[-1]["epsilon"] == pytest.approx(summary["central"]["epsilon"])
    for entries in run_ledgers(out).values():  # record level stays each department's own DP-SGD
        assert [e.get("kind", "gaussian") for e in entries] == ["gaussian", "gaussian"] and entries[0]["version"] == 3
    audit = subprocess.run([sys.executable, "-m", "fedsilo", "audit", str(out / "latest"), "--json"],
                           capture_output=True, text=True, timeout=300)
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"], audit.stdout + audit.stderr
    assert report["central"]["verified"] and report["central"]["epsilon_rdp"] == pytest.approx(
        central[-1]["epsilon"], rel=1e-6)
