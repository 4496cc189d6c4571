"""End to end: `fedsilo simulate --secure-aggregation` on Flower's Simulation Engine, real Ray workers.

The coordinator learns only each round's weighted sum; the departments keep their session state
beside their ledgers; the ledgers, the budget guard and the audit work as in a plain run.
"""

import json
import stat
import subprocess
import sys

import pytest

from federation import run_ledgers
from independent_accounting import pld_epsilon

DEPARTMENTS = [f"dept-{i:02d}" for i in range(4)]
ROUNDS = 2


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("secagg-sim") / "out"
    result = subprocess.run(
        [sys.executable, "-m", "fedsilo", "simulate", "--departments", "4", "--rounds", str(ROUNDS),
         "--dataset", "breast-cancer", "--partition", "iid", "--secure-aggregation", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result, json.loads((out / "latest" / "summary.json").read_text())


def test_every_round_is_a_secure_sum_of_every_department(secure_run):
    _, result, summary = secure_run
    assert summary["status"] == "completed" and len(summary["rounds"]) == ROUNDS
    (session,) = summary["secure_aggregation"]  # one key agreement for the whole run
    assert session["participants"] == session["dealt"] == DEPARTMENTS
    assert session["threshold"] == 3 and session["window"] == ROUNDS and session["setup_bytes"] > 0
    for rnd in summary["rounds"]:
        assert sorted(rnd["trained"]) == DEPARTMENTS and not rnd["rejected"] and not rnd["failed"]
        facts = rnd["secagg"]
        assert facts["u2"] == facts["u3"] == DEPARTMENTS and not facts["consistency"]
        assert facts["dropped_before_masking"] == facts["dropped_after_masking"] == []
        # Each department sent one masked vector, k bits a coordinate, never its float update.
        for name in DEPARTMENTS:
            packed = (session["vector_length"] * session["modulus_bits"] + 7) // 8
            assert packed <= facts["bytes_sent"][name] < packed + 4096
    assert summary["final_accuracy"] > summary["initial"]["accuracy"] + 0.2
    said = " ".join(result.stdout.split())
    assert "The coordinator saw only each round's weighted sum" in said


def test_the_ledgers_charge_each_round_once_and_the_audit_verifies_them(secure_run):
    out, _, summary = secure_run
    ledgers = run_ledgers(out)
    assert sorted(ledgers) == DEPARTMENTS
    for name, entries in ledgers.items():
        assert [e["round"] for e in entries] == list(range(1, ROUNDS + 1))
        assert entries[-1]["epsilon"] == pytest.approx(pld_epsilon(entries, entries[-1]["delta"]), rel=1e-6)
        assert summary["rounds"][-1]["epsilon"][name] == pytest.approx(entries[-1]["epsilon"])
    audit = subprocess.run([sys.executable, "-m", "fedsilo", "audit", str(out / "latest"), "--json"],
                           capture_output=True, text=True, timeout=300)
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"], audit.stdout + audit.stderr
    assert sorted(d["id"] for d in report["departments"]) == DEPARTMENTS


def test_each_department_keeps_its_session_state_private_beside_its_ledger(secure_run):
    out, _, _ = secure_run
    folder = out / "ledgers" / ".secagg"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    states = sorted(folder.glob("*.state"))
    assert len(states) == len(DEPARTMENTS)  # one per department and run
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in states)
    # Nothing of a session reached the coordinator's run folder.
    assert not list((out / "latest").resolve().rglob("*.state"))
