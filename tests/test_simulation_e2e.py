"""End to end: the real `fedsilo simulate` CLI on Flower's Simulation Engine."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from federation import run_ledgers
from independent_accounting import pld_epsilon
from opacus.accountants import PRVAccountant, RDPAccountant

from fedsilo.shared.settings import defaults as setting_defaults

REPO = Path(__file__).resolve().parents[1]
FEDSILO = [sys.executable, "-m", "fedsilo"]


def _simulate(*args, timeout=600):
    return subprocess.run(
        [*FEDSILO, "simulate", *args], capture_output=True, text=True, timeout=timeout
    )


def _independent_epsilon(entries, accountant_cls, delta):
    """Re-derive ε from the recorded mechanisms with a fresh Opacus accountant, step by step."""
    acc = accountant_cls()
    for e in entries:
        for _ in range(e["steps"]):
            acc.step(noise_multiplier=e["noise_multiplier"], sample_rate=e["sample_rate"])
    return acc.get_epsilon(delta=delta)


# The demo run is conftest's digits_simulation (4 departments × 3 rounds), shared with test_audit_report.py.


@pytest.fixture
def demo_run(digits_simulation):
    assert (digits_simulation.departments, digits_simulation.rounds) == (4, 3)  # what the tests below check
    return digits_simulation.out, digits_simulation.result


def test_simulation_writes_summary_with_growing_epsilon(demo_run):
    out, result = demo_run
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["delta"] == 1e-5 and 0 < summary["final_accuracy"] <= 1
    assert summary["final_accuracy"] > summary["initial"]["accuracy"] + 0.2
    departments = sorted(summary["rounds"][0]["epsilon"])
    assert len(departments) == 4
    for name in departments:
        eps = [r["epsilon"][name] for r in summary["rounds"]]
        assert eps[0] < eps[1] < eps[2], (name, eps)
    assert (out / "latest" / "model.safetensors").exists() and (out / "latest" / "model-card.json").exists()
    assert "Privacy report" in result.stdout and "round 3/3" in result.stdout


def test_recorded_epsilon_matches_independent_recomputation(demo_run):
    out, _ = demo_run
    ledgers = run_ledgers(out)
    assert len(ledgers) == 4
    summary = json.loads((out / "latest" / "summary.json").read_text())
    for name, entries in ledgers.items():
        assert len(entries) == 3
        for i in range(1, len(entries) + 1):
            recorded = entries[i - 1]["epsilon"]
            assert entries[i - 1]["accountant"] == "pld"  # the default
            pld = pld_epsilon(entries[:i], 1e-5)
            prv = _independent_epsilon(entries[:i], PRVAccountant, 1e-5)
            rdp = _independent_epsilon(entries[:i], RDPAccountant, 1e-5)
            assert recorded == pytest.approx(pld, rel=1e-6), (name, i, recorded, pld)
            # Opacus' PRV agrees to its error term; RDP is the loosest sound bound.
            assert recorded == pytest.approx(prv, rel=0.02) and recorded < rdp
        assert summary["rounds"][-1]["epsilon"][name] == pytest.approx(entries[-1]["epsilon"])


def test_audit_verifies_a_real_run(demo_run):
    out, _ = demo_run
    result = subprocess.run([*FEDSILO, "audit", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads(result.stdout)
    assert payload["ok"] and len(payload["departments"]) == 4
    for row in payload["departments"]:
        assert row["verified"] and row["signatures"] == "valid" and row["rounds"] == 3
        assert row["epsilon"] == pytest.approx(row["epsilon_pld"], rel=1e-9)
        assert oct((out / "ledgers" / f"{row['id']}.key").stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_rerun_in_same_directory_resumes_ledgers_in_a_run_folder_of_its_own(demo_run, tmp_path):
    out = tmp_path / "R"  # a copy: the demo run is shared, and a rerun moves its latest/
    shutil.copytree(demo_run[0], out, symlinks=True)
    before = {k: v[-1]["epsilon"] for k, v in run_ledgers(out).items()}
    first = (out / "latest").resolve()
    first_summary = (first / "summary.json").read_bytes()
    first_model = (first / "model.safetensors").read_bytes()
    result = _simulate("--departments", "4", "--rounds", "1", "--dataset", "digits", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    said = " ".join(result.stdout.split())
    assert "4 department ledger(s) in" in said and "continue: their ε starts from the recorded history" in said
    assert "spent 90 % or more of their budget" in " ".join(result.stderr.split())  # σ grows to fit what is left
    second = (out / "latest").resolve()
    assert second != first and sorted(p.name for p in out.glob("run-*")) == sorted([first.name, second.name])
    # The earlier run's results are untouched.
    assert (first / "summary.json").read_bytes() == first_summary and (first / "model.safetensors").read_bytes() == first_model
    after = run_ledgers(out)
    for name, entries in after.items():
        assert len(entries) == 4 and [e["seq"] for e in entries] == [0, 1, 2, 3]
        assert entries[-1]["epsilon"] > before[name]
        assert entries[-1]["epsilon"] == pytest.approx(pld_epsilon(entries, 1e-5), rel=1e-6)


def test_budget_is_never_exceeded_and_the_run_ends_cleanly(tmp_path, digits_csv):
    """Also the path for a user's own table: the data comes from a CSV file."""
    out = tmp_path / "budget"
    # σ = 1 costs ε 3.6-4.2 a round here: a budget of 2 fits no round, so nothing starts at all.
    nothing = _simulate(
        "--departments", "4", "--rounds", "12", "--dataset", str(digits_csv), "--label-column", "label",
        "--noise-multiplier", "1.0", "--max-epsilon", "2", "--out", str(out),
    )
    assert nothing.returncode == 2, nothing.stdout + nothing.stderr
    said = " ".join(nothing.stderr.split())
    assert "no department can train a single round, so nothing was started" in said
    assert "would pass its budget ε=2" in said and not out.exists()
    result = _simulate(
        "--departments", "4", "--rounds", "12", "--dataset", str(digits_csv), "--label-column", "label",
        "--noise-multiplier", "1.0", "--max-epsilon", "9", "--out", str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "budget-exhausted"
    assert len(summary["rounds"]) < 12
    assert any(r["refused"] for r in summary["rounds"])
    ledgers = run_ledgers(out)
    assert len(ledgers) == 4
    for entries in ledgers.values():
        assert entries and all(e["epsilon"] <= 9.0 for e in entries)
        assert pld_epsilon(entries, 1e-5) <= 9.0 + 1e-9
    last = summary["rounds"][-1]
    assert not last["trained"] and all("past max-epsilon 9" in r for r in last["refused"].values())
    # Said before the start, and what the budget guards then did matches the forecast.
    warned = re.search(r"the plan stops early: 4 of 4 departments can train only (\d+)–(\d+) of the 12 rounds",
                       " ".join(result.stderr.split()))
    assert warned, result.stderr
    trained = sorted(d["rounds_trained"] for d in summary["departments"].values())
    assert (trained[0], trained[-1]) == (int(warned[1]), int(warned[2]))


def test_bad_input_is_a_clear_error_without_traceback(tmp_path):
    result = _simulate("--dataset", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    bad_partition = _simulate("--partition", "dirichlet:zero", "--out", str(tmp_path / "y"))
    assert bad_partition.returncode == 2 and "ALPHA" in bad_partition.stderr
    too_many = _simulate("--departments", "2000", "--dataset", "breast-cancer", "--out", str(tmp_path / "z"))
    assert too_many.returncode == 2 and "fewer departments" in too_many.stderr


def test_pyproject_app_config_mirrors_the_defaults():
    # `flwr run .` sends every setting (tests/test_settings.py: what fedsilo's own app sends).
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == setting_defaults()


def _superlink_pids(port: int) -> list[int]:
    """PIDs of flower-superlink processes started with ``--port PORT`` (read from /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if any(a.endswith(b"flower-superlink") for a in args) and b"--port" in args:
            if args[args.index(b"--port") + 1] == str(port).encode():
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_flwr_run_from_the_repo_root(tmp_path):
    """The same federation through Flower's own tooling: `flwr run .`."""
    from fedsilo.shared.flower_cli import descendants, flower_executable, free_port, offline_env, terminate

    port = free_port()
    control = free_port(avoid={port})
    env = offline_env({
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
    })
    out = tmp_path / "flwr-run"
    flwr = flower_executable("flwr")
    try:
        result = subprocess.run(
            [flwr, "run", ".", "--run-config", f"out='{out}' num-server-rounds=2",
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1", "--stream"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        assert "Successfully started run" in result.stdout, result.stdout + result.stderr
        summary = json.loads((out / "latest" / "summary.json").read_text())
        assert summary["status"] == "completed" and len(summary["rounds"]) == 2
        assert len(run_ledgers(out)) == 3
    finally:
        # `flwr run` leaves its local SuperLink running: end it by PID.
        pids = _superlink_pids(port)
        for pid in pids:
            terminate([pid, *descendants(pid)])
    assert pids, "expected `flwr run` to have left its local SuperLink for us to stop"


def _flower_processes(marker: bytes) -> set[int]:
    """Live Flower/Ray processes that inherited ``marker`` in their environment.

    Only this test's processes carry it, so Flower processes of anything else
    running on the machine do not count.
    """
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = (proc / "environ").read_bytes()
        except (OSError, IndexError):
            continue
        if state == "Z" or marker not in environ:
            continue
        if any(k in args for k in (b"fedsilo", b"flower-superlink", b"flower-superexec", b"flwr", b"ray::", b"/ray/")):
            pids.add(int(proc.name))
    return pids


@pytest.mark.slow
def test_interrupted_simulation_leaves_no_processes_behind(tmp_path):
    marker = f"FEDSILO_TEST_RUN={uuid.uuid4().hex}"
    proc = subprocess.Popen(
        [*FEDSILO, "simulate", "--departments", "3", "--rounds", "200", "--out", str(tmp_path / "int")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "FEDSILO_TEST_RUN": marker.split("=", 1)[1]},
    )
    try:
        for line in proc.stdout:
            if "round 1/200" in line:
                assert len(_flower_processes(marker.encode())) >= 3  # the marker reaches the SuperLink, simulation and Ray
                break
        proc.terminate()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _flower_processes(marker.encode()):
        time.sleep(0.5)
    assert not _flower_processes(marker.encode())
