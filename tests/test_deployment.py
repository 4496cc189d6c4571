"""A real deployment on loopback: a TLS coordinator and departments with registered identities.

One coordinator and three departments (finance: CSV, hr: Parquet, sales: CSV)
are started as real processes for the whole module, through the `fedsilo` CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from sklearn.datasets import load_digits

from fedsilo.shared.flower_cli import descendants, flower_executable, free_port, offline_env, stop_group, terminate

FEDSILO = [sys.executable, "-m", "fedsilo"]
DEPARTMENTS = ("finance", "hr", "sales")


def _cli(*args, timeout=300):
    return subprocess.run([*FEDSILO, *args], capture_output=True, text=True, timeout=timeout, env=offline_env())


def _spawn(args, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    proc = subprocess.Popen([*FEDSILO, *args], stdout=handle, stderr=subprocess.STDOUT, env=offline_env())
    handle.close()
    return proc


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    tree = [proc.pid, *descendants(proc.pid)]
    if sig == signal.SIGKILL:
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    terminate(tree)
    proc.wait(timeout=10)


def _wait_online(fed, count: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = _cli("coordinator", "departments", "--certs", str(fed["certs"]), "--address", fed["address"])
        if result.stdout.count("online") >= count:
            return
        time.sleep(1.0)
    raise AssertionError(f"fewer than {count} departments online: {result.stdout}{result.stderr}")


class Federation(dict):
    def start_coordinator(self):
        self["coordinator"] = _spawn(
            ["coordinator", "start", "--certs", str(self["certs"]), "--address", self["address"], "--state", str(self["state"])],
            self["root"] / "coordinator.log",
        )
        host, port = self["address"].split(":")
        deadline = time.monotonic() + 60
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, int(port)), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError((self["root"] / "coordinator.log").read_text())

    def start_department(self, name):
        self["departments"][name] = _spawn(
            ["department", "start", "--coordinator", self["address"], "--ca", str(self["certs"] / "ca.crt"),
             "--key", str(self["certs"] / "departments" / name), "--data", str(self["data"][name]),
             "--label-column", "digit", "--ledger", str(self["root"] / "ledgers" / name)],
            self["root"] / f"{name}.log",
        )

    def run(self, *args, timeout=300):
        return _cli("coordinator", "run", "--certs", str(self["certs"]), "--address", self["address"],
                    "--test-data", str(self["data"]["test"]), "--label-column", "digit", *args, timeout=timeout)

    def ledger(self, name) -> list[dict]:
        path = self["root"] / "ledgers" / name / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    bunch = load_digits()
    frame = pd.DataFrame(bunch.data, columns=[f"px{i}" for i in range(64)])
    frame["digit"] = bunch.target
    frame = frame.sample(frac=1, random_state=0).reset_index(drop=True)
    data = {"test": root / "test.csv"}
    frame.iloc[:360].to_csv(data["test"], index=False)
    rest = frame.iloc[360:]
    third = len(rest) // 3
    data["finance"] = root / "finance.csv"
    rest.iloc[:third].to_csv(data["finance"], index=False)
    data["hr"] = root / "hr.parquet"
    rest.iloc[third : 2 * third].to_parquet(data["hr"], index=False)
    data["sales"] = root / "sales.csv"
    rest.iloc[2 * third :].to_csv(data["sales"], index=False)

    certs = root / "certs"
    assert _cli("certs", "init", "--out", str(certs)).returncode == 0
    assert _cli("certs", "init", "--out", str(root / "other-ca")).returncode == 0
    for name in (*DEPARTMENTS, "intruder"):
        assert _cli("certs", "add-department", name, "--dir", str(certs)).returncode == 0

    federation = Federation(
        root=root, certs=certs, data=data, state=root / "state",
        address=f"127.0.0.1:{free_port()}", departments={},
    )
    try:
        federation.start_coordinator()
        registered = _cli("coordinator", "register", *DEPARTMENTS, "--certs", str(certs), "--address", federation["address"])
        assert registered.returncode == 0, registered.stdout + registered.stderr
        for name in DEPARTMENTS:
            federation.start_department(name)
        _wait_online(federation, 3)
        yield federation
    finally:
        for proc in federation["departments"].values():
            if proc.poll() is None:
                _stop(proc)
        if "coordinator" in federation and federation["coordinator"].poll() is None:
            _stop(federation["coordinator"])


def test_private_keys_are_0600_and_registration_is_idempotent(fed):
    for name in DEPARTMENTS:
        assert (fed["certs"] / "departments" / name).stat().st_mode & 0o777 == 0o600
    assert (fed["certs"] / "ca.key").stat().st_mode & 0o777 == 0o600
    again = _cli("coordinator", "register", "finance", "--certs", str(fed["certs"]), "--address", fed["address"])
    assert again.returncode == 0 and "already registered" in again.stdout


def test_two_rounds_over_tls_with_three_departments(fed):
    before = {name: len(fed.ledger(name)) for name in DEPARTMENTS}
    out = fed["root"] / "runs" / "two"
    result = fed.run("--rounds", "2", "--min-departments", "3", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["rounds"]) == 2
    assert all(sorted(r["trained"]) == list(DEPARTMENTS) for r in summary["rounds"])
    assert summary["final_accuracy"] > summary["initial"]["accuracy"] + 0.3
    for name in DEPARTMENTS:
        entries = fed.ledger(name)
        assert len(entries) == before[name] + 2  # each department's own ledger grew, on its host
        assert summary["rounds"][-1]["epsilon"][name] == pytest.approx(entries[-1]["epsilon"])
    assert not (out / "ledgers").exists()  # ledgers never move to the coordinator


def test_unregistered_department_is_refused(fed):
    result = _cli(
        "department", "start", "--coordinator", fed["address"], "--ca", str(fed["certs"] / "ca.crt"),
        "--key", str(fed["certs"] / "departments" / "intruder"), "--data", str(fed["data"]["finance"]),
        "--label-column", "digit", "--ledger", str(fed["root"] / "ledgers" / "intruder"), timeout=120,
    )
    assert result.returncode != 0
    assert "not registered" in result.stderr and "fedsilo coordinator register intruder" in result.stderr
    _wait_online(fed, 3, timeout=10)  # the federation is unharmed


def test_department_without_tls_is_refused(fed):
    """A SuperNode speaking plain HTTP to the coordinator gets nowhere."""
    log = fed["root"] / "plain-supernode.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [flower_executable("flower-supernode"), "--insecure", "--superlink", fed["address"],
             "--max-retries", "1", "--max-wait-time", "20", "--host", "127.0.0.1", "--port", str(free_port())],
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            env=offline_env({"FLWR_HOME": str(fed["root"] / "plain")}),
        )
    try:
        proc.wait(timeout=120)
    finally:
        stop_group(proc.pid)  # its helper process outlives it
    assert proc.returncode != 0
    assert "Failed to initialize the connection" in log.read_text()
    _wait_online(fed, 3, timeout=10)


def test_department_trusting_another_ca_is_refused(fed):
    result = _cli(
        "department", "start", "--coordinator", fed["address"], "--ca", str(fed["root"] / "other-ca" / "ca.crt"),
        "--key", str(fed["certs"] / "departments" / "finance"), "--data", str(fed["data"]["finance"]),
        "--label-column", "digit", "--ledger", str(fed["root"] / "ledgers" / "elsewhere"),
    )
    assert result.returncode == 2
    assert "does not vouch" in result.stderr and "Traceback" not in result.stderr


def test_bad_department_inputs_fail_before_connecting(fed, tmp_path):
    base = ["department", "start", "--coordinator", fed["address"], "--ca", str(fed["certs"] / "ca.crt"),
            "--ledger", str(tmp_path / "ledger")]
    key = str(fed["certs"] / "departments" / "finance")
    missing = _cli(*base, "--key", key, "--data", str(tmp_path / "none.csv"), "--label-column", "digit")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_label = _cli(*base, "--key", key, "--data", str(fed["data"]["finance"]), "--label-column", "churned")
    assert no_label.returncode == 2 and "label column 'churned' not found" in no_label.stderr
    loose = tmp_path / "loose-key"
    loose.write_bytes((fed["certs"] / "departments" / "finance").read_bytes())
    loose.chmod(0o644)
    bad_key = _cli(*base, "--key", str(loose), "--data", str(fed["data"]["finance"]), "--label-column", "digit")
    assert bad_key.returncode == 2 and "chmod 600" in bad_key.stderr
    garbage = tmp_path / "garbage-key"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    not_key = _cli(*base, "--key", str(garbage), "--data", str(fed["data"]["finance"]), "--label-column", "digit")
    assert not_key.returncode == 2 and "OpenSSH private key" in not_key.stderr
    unreachable = _cli(*base[:3], f"127.0.0.1:{free_port()}", *base[4:], "--key", key,
                       "--data", str(fed["data"]["finance"]), "--label-column", "digit")
    assert unreachable.returncode == 2 and "unreachable" in unreachable.stderr


def test_too_few_departments_stops_with_a_clear_message(fed):
    out = fed["root"] / "runs" / "few"
    result = fed.run("--rounds", "1", "--min-departments", "5", "--connect-timeout", "3", "--out", str(out))
    assert result.returncode != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "fewer than --min-departments 5" in summary["stop_reason"]


def test_department_killed_mid_round_does_not_stop_the_run(fed):
    out = fed["root"] / "runs" / "killed"
    started = time.monotonic()
    proc = subprocess.Popen(
        [*FEDSILO, "coordinator", "run", "--certs", str(fed["certs"]), "--address", fed["address"],
         "--test-data", str(fed["data"]["test"]), "--label-column", "digit", "--rounds", "3",
         "--min-departments", "2", "--round-timeout", "45", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=offline_env(),
    )
    try:
        for line in proc.stdout:
            if "round 1/3" in line:
                _stop(fed["departments"]["sales"], signal.SIGKILL)  # dies during round 2
                break
        proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert time.monotonic() - started < 400
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["rounds"]) == 3
    assert "sales" in summary["rounds"][0]["trained"]
    for later in summary["rounds"][1:]:
        assert "sales" not in later["trained"]
        assert {"finance", "hr"} <= set(later["trained"])
    assert any("sales" in r["failed"] for r in summary["rounds"][1:]) or len(summary["rounds"][2]["trained"]) == 2


def test_restarted_department_neither_resets_nor_double_counts_epsilon(fed):
    """After the SIGKILL above: restart sales and train with client-level DP on as well."""
    before = fed.ledger("sales")
    assert before, "sales trained before it was killed"
    fed.start_department("sales")
    _wait_online(fed, 3)
    out = fed["root"] / "runs" / "restarted"
    central = fed["root"] / "central-ledger"
    result = fed.run("--rounds", "2", "--min-departments", "3", "--central-dp", "--central-delta", "0.01",
                     "--central-clip-norm", "5", "--central-ledger", str(central), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    after = fed.ledger("sales")
    summaries = [json.loads(p.read_text()) for p in (fed["root"] / "runs").glob("*/summary.json")]
    seen_training = sum("sales" in r["trained"] for s in summaries for r in s["rounds"])
    # One entry per round the coordinator saw sales train, across every run: none lost, none twice.
    assert len(after) == seen_training == len(before) + sum("sales" in r["trained"] for r in json.loads((out / "summary.json").read_text())["rounds"])
    assert after[: len(before)] == before and [e["seq"] for e in after] == list(range(len(after)))
    assert len({(e["run_id"], e["round"]) for e in after}) == len(after)
    from independent_accounting import pld_epsilon

    assert after[-1]["epsilon"] == pytest.approx(pld_epsilon(after, 1e-5), rel=1e-6)  # the whole history
    assert after[-1]["epsilon"] > before[-1]["epsilon"]
    # The coordinator signed its client-level ledger with its TLS key; the audit checks it against the certificate.
    audit = _cli("audit", str(central), "--keys", str(fed["certs"]), "--json")
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"], audit.stdout + audit.stderr
    assert report["central"]["rounds"] == 2 and report["central"]["signatures"] == "valid"
    assert not (central / "coordinator.key").exists()  # no key was generated beside it


def test_restarted_coordinator_keeps_registered_departments(fed):
    before = _cli("coordinator", "departments", "--certs", str(fed["certs"]), "--address", fed["address"]).stdout
    _stop(fed["coordinator"])
    fed.start_coordinator()
    after = _cli("coordinator", "departments", "--certs", str(fed["certs"]), "--address", fed["address"])
    assert after.returncode == 0
    ids = lambda text: sorted(w for w in text.split() if w.isdigit() and len(w) > 8)  # noqa: E731
    assert ids(after.stdout) == ids(before) and len(ids(before)) == 3
    _wait_online(fed, 2, timeout=90)  # the running departments reconnect by themselves
    out = fed["root"] / "runs" / "after-restart"
    result = fed.run("--rounds", "1", "--min-departments", "2", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
