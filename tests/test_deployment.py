"""A real deployment on loopback: a coordinator behind nginx and departments with registered identities.

One coordinator and three departments (finance: CSV, hr: Parquet, sales: CSV)
are started as real processes for the whole module, through the `fedsilo` CLI.
Departments reach the coordinator only through its proxy; the operator's
commands reach Control only on loopback, through the state folder.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import tomli_w

from federation import FEDSILO, cli as _cli, federation, stop as _stop
from fedsilo.shared.flower_cli import FlowerConnection, alive, flower_executable, free_port, offline_env, stop_group

DEPARTMENTS = ("finance", "hr", "sales")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    with federation(root, DEPARTMENTS, extra_keys=("intruder",)) as running:
        assert _cli("certs", "init", "--out", str(root / "other-ca")).returncode == 0
        yield running


def test_private_keys_are_0600_and_registration_is_idempotent(fed):
    for name in DEPARTMENTS:
        assert (fed["certs"] / "departments" / name).stat().st_mode & 0o777 == 0o600
    assert (fed["certs"] / "ca.key").stat().st_mode & 0o777 == 0o600
    again = fed.control("register", "finance")
    assert again.returncode == 0 and "already registered" in again.stdout


def test_two_rounds_over_tls_with_three_departments(fed):
    before = {name: len(fed.ledger(name)) for name in DEPARTMENTS}
    out = fed["root"] / "runs" / "two"
    result = fed.run("--rounds", "2", "--min-departments", "3", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["rounds"]) == 2
    assert all(sorted(r["trained"]) == list(DEPARTMENTS) for r in summary["rounds"])
    assert summary["final_accuracy"] > summary["initial"]["accuracy"] + 0.3
    for name in DEPARTMENTS:
        entries = fed.ledger(name)
        assert len(entries) == before[name] + 2  # each department's own ledger grew, on its host
        assert summary["rounds"][-1]["epsilon"][name] == pytest.approx(entries[-1]["epsilon"])
        # Answered by the department's executor with its installed fedsilo: the
        # run's app was never installed on the department's host.
        assert not (fed["root"] / "ledgers" / name / ".flower" / "apps").exists()
        assert (fed["root"] / "ledgers" / name / ".flower" / "runtime.secret").stat().st_mode & 0o777 == 0o600
        audit = _cli("audit", str(fed["root"] / "ledgers" / name), "--keys", str(fed["certs"] / "departments"), "--json")
        report = json.loads(audit.stdout)
        assert audit.returncode == 0 and report["ok"], audit.stdout + audit.stderr
        assert report["departments"][0]["rounds"] == len(entries)
    assert not (out / "ledgers").exists()  # ledgers never move to the coordinator


@pytest.mark.parametrize("ask,named", [(("--delta", "0.9"), "δ=0.9"), (("--no-dp",), "without differential privacy")])
def test_a_run_asking_looser_than_the_departments_policy_is_declined(fed, ask, named):
    """δ = 0.9 or no DP: every department declines before training; nothing is released or charged."""
    before = {name: fed.ledger(name) for name in DEPARTMENTS}
    out = fed["root"] / "runs" / f"looser-{ask[0].strip('-')}"
    result = fed.run("--rounds", "2", "--min-departments", "3", "--round-timeout", "60", *ask, "--out", str(out))
    assert result.returncode == 1 and "no department would train it" in result.stderr, result.stdout + result.stderr
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "declined" and len(summary["rounds"]) == 1
    declined = summary["rounds"][0]["declined"]
    assert sorted(declined) == list(DEPARTMENTS) and summary["rounds"][0]["trained"] == []
    assert all(named in why for why in declined.values()), declined
    if ask[0] == "--delta":
        assert all("δ=1e-05" in why for why in declined.values())  # both values named
    for name in DEPARTMENTS:
        assert fed.ledger(name) == before[name]  # nothing trained, nothing charged


@pytest.mark.slow
def test_a_rolled_back_or_deleted_ledger_is_refused_and_flagged_by_the_audit(fed):
    """finance's ledger is restored from an older copy, hr's is deleted: both refused at the next round.

    The departments keep running: each round reads the ledger from disk, so this is what a restore
    from backup (or a new --ledger folder, tested in test_policy.py) looks like to the next round.
    """
    full = {name: fed.ledger(name) for name in ("finance", "hr")}
    assert all(len(entries) >= 2 for entries in full.values()), "needs the two rounds above"
    (finance,) = (fed["root"] / "ledgers" / "finance").glob("*.jsonl")
    (hr,) = (fed["root"] / "ledgers" / "hr").glob("*.jsonl")
    kept = {finance: finance.read_bytes(), hr: hr.read_bytes()}
    finance.write_text("".join(line + "\n" for line in kept[finance].decode().splitlines()[:1]))  # an older valid copy
    hr.unlink()
    out = fed["root"] / "runs" / "rolled-back"
    result = fed.run("--rounds", "1", "--min-departments", "3", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr  # sales trained
    summary = json.loads((out / "latest" / "summary.json").read_text())
    (rnd,) = summary["rounds"]
    assert rnd["trained"] == ["sales"] and sorted(rnd["rolled_back"]) == ["finance", "hr"], rnd
    assert "holds only 1" in rnd["rolled_back"]["finance"] and "is empty" in rnd["rolled_back"]["hr"]
    assert fed.ledger("finance") == full["finance"][:1] and fed.ledger("hr") == []  # nothing trained
    assert "restored from an older copy" in (fed["root"] / "ledgers" / "finance" / ".flower" / "department.log").read_text()
    # The audit, given the coordinator's signed record and keys the auditor trusts, flags the restored copy.
    record = fed["state"] / "record" / "acknowledged.jsonl"
    keys = fed["root"] / "trusted-keys"
    keys.mkdir(exist_ok=True)
    for name in DEPARTMENTS:
        (keys / f"{name}.pub").write_bytes((fed["certs"] / "departments" / f"{name}.pub").read_bytes())
    (keys / "coordinator.crt").write_bytes((fed["certs"] / "coordinator.crt").read_bytes())

    def audit():
        done = _cli("audit", str(fed["root"] / "ledgers" / "finance"), "--keys", str(keys), "--record", str(record), "--json")
        return done.returncode, json.loads(done.stdout)

    code, report = audit()
    assert code == 1 and not report["ok"] and "rolled back" in " ".join(report["departments"][0]["problems"])
    for path, data in kept.items():  # the real ledgers back: the audit passes against the same record
        path.write_bytes(data)
    code, report = audit()
    assert code == 0 and report["departments"][0]["acknowledged"] >= 2, report


@pytest.mark.slow
def test_a_department_under_another_name_and_key_file_continues_its_epsilon(fed):
    if not fed.ledger("finance"):  # run without the tests above (`-m slow`): a history to continue
        first = fed.run("--rounds", "1", "--min-departments", "3", "--out", str(fed["root"] / "runs" / "history"))
        assert first.returncode == 0, first.stdout + first.stderr
    before = fed.ledger("finance")
    renamed = fed["certs"] / "departments" / "finance-key-renamed"
    renamed.write_bytes((fed["certs"] / "departments" / "finance").read_bytes())
    renamed.chmod(0o600)
    fed.restart_departments(["finance"], finance={"key": renamed.name, "as_name": "finance-renamed"})
    out = fed["root"] / "runs" / "renamed"
    result = fed.run("--rounds", "1", "--min-departments", "3", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    after = fed.ledger("finance")
    assert after[: len(before)] == before and len(after) == len(before) + 1  # the same history, continued
    assert after[-1]["department"] == "finance-renamed" and after[-1]["epsilon"] > before[-1]["epsilon"]
    summary = json.loads((out / "latest" / "summary.json").read_text())
    # The coordinator names it by its registration (the later tests rely on "finance" too).
    assert "finance" in summary["rounds"][0]["trained"]


def _altered_app(folder, marker, variant: str):
    """A copy of the fedsilo app that a coordinator could submit: code of its own, or another protocol."""
    from fedsilo.shared.flower_cli import write_app

    app = write_app(folder)
    project = __import__("tomllib").loads((app / "pyproject.toml").read_text())
    if variant == "ships-code":
        # Its ClientApp would write a marker file wherever it runs.
        project["tool"]["flwr"]["app"]["components"]["clientapp"] = "fedsilo_marker.client:app"
        package = app / "fedsilo_marker"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "client.py").write_text(
            "from pathlib import Path\n"
            "from flwr.clientapp import ClientApp\n"
            "app = ClientApp()\n"
            "@app.train()\n"
            "def train(msg, context):\n"
            f"    Path({str(marker)!r}).write_text('the coordinator ran its code on a department host')\n"
            "    raise RuntimeError('altered')\n"
        )
    else:
        project["tool"]["fedsilo"]["protocol"] = 999
    (app / "pyproject.toml").write_text(tomli_w.dumps(project))
    return app


@pytest.mark.parametrize("variant", ["ships-code", pytest.param("other-protocol", marks=pytest.mark.slow)])
def test_altered_app_is_refused_by_every_department(fed, variant):
    """The coordinator's operators submit a changed app: no department runs it, the run ends cleanly."""
    legit = fed["root"] / "runs" / "two" / "latest" / "summary.json"
    assert legit.exists(), "needs the run of test_two_rounds_over_tls_with_three_departments"
    settings = json.loads(legit.read_text())["settings"]
    out = fed["root"] / "runs" / f"altered-{variant}"
    settings.update({"out": str(out), "num-server-rounds": 2, "round-timeout": 60.0})
    marker = fed["root"] / f"marker-{variant}"
    before = {name: fed.ledger(name) for name in DEPARTMENTS}
    connection = FlowerConnection(fed["root"] / f"flwr-{variant}", fed.control_address(),
                                  root_certificates=fed["certs"] / "ca.crt")
    app = _altered_app(fed["root"] / f"app-{variant}", marker, variant)
    # As `coordinator run` submits: the departments' settings in the run config, the coordinator's on its host.
    from fedsilo.server.coordinator import superexec_home
    from fedsilo.shared.config import RunSettings, publish

    run_config = publish(RunSettings.from_run_config(settings), superexec_home(fed["state"]))
    outcome = connection.run(run_config, fed["root"] / f"altered-{variant}.log", app_dir=app)
    assert outcome.ok, outcome  # ended cleanly, not crashed
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "app-refused" and len(summary["rounds"]) == 1
    refused = summary["rounds"][0]["incompatible"]
    assert sorted(refused) == list(DEPARTMENTS) and summary["rounds"][0]["trained"] == []
    expected = "ships files of its own (fedsilo_marker/__init__.py" if variant == "ships-code" else "protocol 999"
    assert all(expected in reason for reason in refused.values()), refused
    assert all(name in summary["stop_reason"] for name in DEPARTMENTS) and expected in summary["stop_reason"]
    assert not marker.exists()
    for name in DEPARTMENTS:
        assert fed.ledger(name) == before[name]  # nothing trained, nothing charged
        assert expected in (fed["root"] / "ledgers" / name / ".flower" / "department.log").read_text()


def test_unregistered_department_is_refused(fed):
    result = _cli(
        "department", "start", "--coordinator", fed["address"], "--ca", str(fed["certs"] / "ca.crt"),
        "--key", str(fed["certs"] / "departments" / "intruder"), "--data", str(fed["data"]["finance"]),
        "--label-column", "digit", "--ledger", str(fed["root"] / "ledgers" / "intruder"), "--activation-wait", "0",
        "--max-epsilon", "10",
        timeout=120,
    )
    assert result.returncode != 0
    assert "not registered" in result.stderr and "fedsilo coordinator register intruder" in result.stderr
    fed.wait_online(3, timeout=10)  # the federation is unharmed


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
    fed.wait_online(3, timeout=10)


def test_department_trusting_another_ca_is_refused(fed):
    result = _cli(
        "department", "start", "--coordinator", fed["address"], "--ca", str(fed["root"] / "other-ca" / "ca.crt"),
        "--key", str(fed["certs"] / "departments" / "finance"), "--data", str(fed["data"]["finance"]),
        "--label-column", "digit", "--ledger", str(fed["root"] / "ledgers" / "elsewhere"), "--max-epsilon", "10",
    )
    assert result.returncode == 2
    assert "does not vouch" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_bad_department_inputs_fail_before_connecting(fed, tmp_path):
    base = ["department", "start", "--coordinator", fed["address"], "--ca", str(fed["certs"] / "ca.crt"),
            "--ledger", str(tmp_path / "ledger"), "--max-epsilon", "10"]
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
    # The department's policy: a budget of its own is required, and δ must be below 1/records.
    data = ("--key", key, "--data", str(fed["data"]["finance"]), "--label-column", "digit")
    no_budget = _cli(*base[:-2], *data)
    assert no_budget.returncode == 2 and "--max-epsilon is required" in no_budget.stderr
    loose_delta = _cli(*base, *data, "--delta", "0.01")
    assert loose_delta.returncode == 2 and "is not below 1/" in loose_delta.stderr and "records" in loose_delta.stderr


@pytest.mark.slow
def test_too_few_departments_stops_with_a_clear_message(fed):
    out = fed["root"] / "runs" / "few"
    result = fed.run("--rounds", "1", "--min-departments", "5", "--connect-timeout", "3", "--out", str(out))
    assert result.returncode != 0
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "failed" and "fewer than --min-departments 5" in summary["stop_reason"]


@pytest.mark.slow
def test_department_killed_mid_round_does_not_stop_the_run(fed):
    out = fed["root"] / "runs" / "killed"
    started = time.monotonic()
    proc = subprocess.Popen(
        [*FEDSILO, "coordinator", "run", "--certs", str(fed["certs"]), "--address", fed["address"],
         "--state", str(fed["state"]), "--test-data", str(fed["data"]["test"]), "--label-column", "digit", "--rounds", "3",
         "--min-departments", "2", "--round-timeout", "45", "--noise-multiplier", "1.0", "--out", str(out)],
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
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["rounds"]) == 3
    assert "sales" in summary["rounds"][0]["trained"]
    for later in summary["rounds"][1:]:
        assert "sales" not in later["trained"]
        assert {"finance", "hr"} <= set(later["trained"])
    assert any("sales" in r["failed"] for r in summary["rounds"][1:]) or len(summary["rounds"][2]["trained"]) == 2


@pytest.mark.slow
def test_restarted_department_neither_resets_nor_double_counts_epsilon(fed):
    """After the SIGKILL above: restart sales and train with client-level DP on as well."""
    before = fed.ledger("sales")
    assert before, "sales trained before it was killed"
    fed.start_department("sales")
    fed.wait_online(3)
    out = fed["root"] / "runs" / "restarted"
    central = fed["root"] / "central-ledger"
    result = fed.run("--rounds", "2", "--min-departments", "3", "--central-dp", "--central-delta", "0.01",
                     "--central-clip-norm", "5", "--central-ledger", str(central), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    after = fed.ledger("sales")
    summaries = [json.loads(p.read_text()) for p in (fed["root"] / "runs").glob("*/run-*/summary.json")]
    seen_training = sum("sales" in r["trained"] for s in summaries for r in s["rounds"])
    # One entry per round the coordinator saw sales train, across every run: none lost, none twice.
    assert len(after) == seen_training == len(before) + sum("sales" in r["trained"] for r in json.loads((out / "latest" / "summary.json").read_text())["rounds"])
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


def test_a_second_coordinator_on_the_same_state_is_refused(fed):
    second = _cli("coordinator", "start", "--certs", str(fed["certs"]), "--address", f"127.0.0.1:{free_port()}",
                  "--state", str(fed["state"]))
    assert second.returncode == 2 and "already running" in second.stderr and "Traceback" not in second.stderr
    assert fed.control("departments").returncode == 0  # the first one is untouched


@pytest.mark.slow
def test_restarted_coordinator_keeps_registered_departments(fed):
    before = fed.control("departments").stdout
    pids = json.loads((fed["state"] / "coordinator.json").read_text())["pids"]
    assert set(pids) == {"superlink", "superexec", "proxy"} and all(alive(p) for p in pids.values())
    # SIGTERM to `fedsilo coordinator start` alone stops the whole unit, proxy included.
    fed["coordinator"].send_signal(signal.SIGTERM)
    fed["coordinator"].wait(timeout=60)
    deadline = time.monotonic() + 20
    while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids.values()), pids
    assert not (fed["state"] / "coordinator.json").exists()
    failed = fed.control("departments")  # no coordinator: a clear error, not a traceback
    assert failed.returncode == 1 and "fedsilo coordinator start" in failed.stderr and "Traceback" not in failed.stderr
    fed.start_coordinator()
    after = fed.control("departments")
    assert after.returncode == 0
    ids = lambda text: sorted(w for w in text.split() if w.isdigit() and len(w) > 8)  # noqa: E731
    assert ids(after.stdout) == ids(before) and len(ids(before)) == 3
    fed.wait_online(2)  # the running departments reconnect by themselves (backing off up to 20 s)
    out = fed["root"] / "runs" / "after-restart"
    result = fed.run("--rounds", "1", "--min-departments", "2", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
