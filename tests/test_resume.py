"""Runs that survive, in a real simulation: a SIGKILLed run resumes, never charging a round twice.

The whole ``fedsilo simulate`` process tree (the CLI, Flower's SuperLink, the
ServerApp, Ray and its workers) is killed with SIGKILL while a round is in
flight — after at least one department trained it and charged its ledger, before
the coordinator finished it — and ``fedsilo simulate --resume`` continues it to
the planned round count.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from federation import FEDSILO, run_ledgers, stop
from fedsilo.shared.flower_cli import offline_env

# A simulation killed mid-round and resumed: two simulations; `make test-all`.
pytestmark = pytest.mark.slow

ROUNDS = 5


def _rounds_done(out: Path) -> int:
    try:
        return len(json.loads((out / "latest" / "summary.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def _most_entries(out: Path) -> int:
    return max((sum(1 for _ in path.open()) for path in (out / "ledgers").glob("*.jsonl")), default=0)


@pytest.fixture(scope="module")
def killed_mid_round(tmp_path_factory):
    """A run SIGKILLed (whole tree) while round k+1 is in flight, k >= 2; returns (out, k)."""
    out = tmp_path_factory.mktemp("resume") / "OUT"
    log = open(out.parent / "first.log", "w")
    proc = subprocess.Popen(
        [*FEDSILO, "simulate", "--departments", "4", "--rounds", str(ROUNDS), "--out", str(out)],
        stdout=log, stderr=subprocess.STDOUT, env=offline_env(),
    )
    done = 0
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            done = _rounds_done(out)
            if done >= 2 and _most_entries(out) > done:  # a department charged round done+1
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"never caught a round in flight (exit {proc.poll()}); see {log.name}")
    finally:
        stop(proc, __import__("signal").SIGKILL)  # the CLI and every process under it
        log.close()
    return out, done


def test_killed_run_is_resumable_and_left_consistent(killed_mid_round):
    out, done = killed_mid_round
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "running" and len(summary["rounds"]) in (done, done + 1)
    assert (out / "latest" / "checkpoint.safetensors").exists()
    assert not (out / "latest" / "model.safetensors").exists()  # it never finished
    audit = subprocess.run([*FEDSILO, "audit", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr  # what was charged is consistent so far


@pytest.fixture(scope="module")
def resumed(killed_mid_round):
    out, done = killed_mid_round
    before = {name: len(entries) for name, entries in run_ledgers(out).items()}
    result = subprocess.run([*FEDSILO, "simulate", "--resume", str(out)], capture_output=True, text=True,
                            timeout=600, env=offline_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return out, done, before, result


def test_resume_completes_the_planned_rounds_with_one_charge_per_round(resumed):
    out, done, before, result = resumed
    runs = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("run-")]
    assert len(runs) == 1  # the same run folder, continued
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    assert len(summary["flower_run_ids"]) == 2 and summary["resumes"][0]["after_round"] == done
    assert f"resumed from its checkpoint after round {done}/{ROUNDS}" in result.stdout
    assert (out / "latest" / "flower.1.log").stat().st_size > 0  # the killed attempt's log is kept
    for name, entries in run_ledgers(out).items():
        # Exactly one ledger entry per round of this run: the in-flight round was not charged twice.
        assert sorted(e["round"] for e in entries) == list(range(1, ROUNDS + 1)), name
        assert {e["run_id"] for e in entries} == {summary["run_id"]}
        assert entries[-1]["epsilon"] <= 10.0 + 1e-9
        assert summary["rounds"][-1]["epsilon"][name] == pytest.approx(entries[-1]["epsilon"])


def test_departments_that_had_trained_the_interrupted_round_replayed_it(resumed):
    out, done, before, _ = resumed
    summary = json.loads((out / "latest" / "summary.json").read_text())
    in_flight = summary["rounds"][done]  # round done + 1
    charged = sorted(name for name, count in before.items() if count > done)
    assert charged, "the kill came after a department charged the in-flight round"
    assert sorted(in_flight["replayed"]) == charged
    for name in charged:
        assert in_flight["replayed"][name] == done + 1  # the entry that charged it, counted from 1
    assert summary["resumes"][0]["replayed"] == charged
    assert sorted(summary["resumes"][0]["trained"]) == sorted(set(in_flight["trained"]) - set(charged))
    assert "replayed=" in _round_line(resumed[3].stdout, done + 1)


def test_resumed_run_passes_the_audit_with_its_card(resumed):
    out = resumed[0]
    audit = subprocess.run([*FEDSILO, "audit", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    card = json.loads((out / "latest" / "model-card.json").read_text())
    assert card["rounds"] == ROUNDS and card["status"] == "completed"


def test_a_finished_run_is_not_resumed_and_a_spent_federation_is_not_started(resumed, tmp_path):
    out = resumed[0]
    again = subprocess.run([*FEDSILO, "simulate", "--resume", str(out)], capture_output=True, text=True,
                           timeout=120, env=offline_env())
    assert again.returncode == 2 and "nothing to resume" in again.stderr
    # The departments spent (almost) all of ε ≤ 10: with σ = 1 no round fits, so nothing starts.
    runs_before = sorted(p.name for p in out.iterdir())
    spent = subprocess.run(
        [*FEDSILO, "simulate", "--departments", "4", "--rounds", "3", "--noise-multiplier", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=offline_env(),
    )
    assert spent.returncode == 2, spent.stdout + spent.stderr
    assert "no department can train a single round, so nothing was started" in " ".join(spent.stderr.split())
    assert "new --out" in spent.stderr
    assert sorted(p.name for p in out.iterdir()) == runs_before  # no run folder, no Flower started


def _round_line(stdout: str, rnd: int) -> str:
    return next(line for line in stdout.splitlines() if f"round {rnd}/{ROUNDS}" in line)
