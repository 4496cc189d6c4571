"""Runs that survive, in a real deployment: the coordinator dies mid-round and the run resumes.

One loopback federation (a coordinator behind nginx, three departments) serves a
secure-aggregation run and a distributed-DP run, then the three scenarios, in order:

1. only the ServerApp (``flwr-serverapp`` under the coordinator's
   ``flower-superexec``) is SIGKILLed while round k+1 is in flight, after a
   department charged it: Flower marks the run failed once its heartbeat lapses,
   ``coordinator run`` ends, and ``coordinator run --resume OUT`` finishes it;
2. the whole coordinator (``fedsilo coordinator start`` and every process under
   it: SuperLink, SuperExec, nginx, the ServerApp) and the ``coordinator run``
   process are SIGKILLed mid-round while the departments stay up; the coordinator
   is started again on the same state folder and address, the departments
   reconnect by themselves, and ``--resume`` finishes the run;
3. the same, killed while a department is receiving round k+1's message, and kept down
   until Flower counts the interrupted run failed (over a minute: a host restart).  The
   departments then get that run's undelivered messages and learn the run has ended:
   Flower 1.41's SuperNode drops such a message but leaves its task behind without its
   content, and the department gives that task up after ``--task-input-wait`` instead of
   waiting on it (for up to 2 hours, answering nothing else).

In each, every department's ledger ends with exactly one entry per round of
the run, a department that had charged the interrupted round sends the same
update again (``replayed``), and the audit passes.  The three runs ask for a
whole-history ``--target-epsilon`` (5, 7, then 10) within the departments' budget
of 10, so each run still has budget after the ones before it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from federation import cli, federation, spawn, stop
from fedsilo.shared.flower_cli import alive, descendants
from fedsilo.shared.runs import runs_in

# Crash and resume over a real deployment: minutes each, with Flower's 60 s heartbeat window; `make test-all`.
pytestmark = pytest.mark.slow

DEPARTMENTS = ("finance", "hr", "sales")
ROUNDS = 2  # a round completes, the second is caught in flight
RECEIVING_ROUNDS = 3  # scenario 3 catches a department mid-receive: two chances at it
FAILED_RUN_WAIT = 180  # Flower fails a run whose ServerApp sends no heartbeat for 2 x 30 s
INPUT_WAIT = 15


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment-resume")
    # A task whose message never arrives complete is given up after 15 s here (default 120 s), to keep scenario 3 short.
    # --peers: each department's roster for secure aggregation, the public keys `certs add-department` wrote.
    policies = {name: ("--max-epsilon", "10", "--task-input-wait", str(INPUT_WAIT),
                       "--peers", str(root / "certs" / "departments")) for name in DEPARTMENTS}
    with federation(root, DEPARTMENTS, policies=policies) as running:
        keys = root / "trusted-keys"  # what an auditor holds: the departments' public keys, the coordinator's certificate
        keys.mkdir()
        for name in DEPARTMENTS:
            (keys / f"{name}.pub").write_bytes((running["certs"] / "departments" / f"{name}.pub").read_bytes())
        (keys / "coordinator.crt").write_bytes((running["certs"] / "coordinator.crt").read_bytes())
        running["keys"] = keys
        yield running


def _summary(out: Path) -> dict:
    try:
        return json.loads((out / "latest" / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _line_counts(fed) -> dict[str, int]:
    counts = {}
    for name in DEPARTMENTS:
        files = list((fed["root"] / "ledgers" / name).glob("*.jsonl"))
        counts[name] = sum(1 for _ in files[0].open()) if files else 0
    return counts


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _serverapp(fed) -> int | None:
    """The PID of the process running the ServerApp: ``flwr-serverapp``, started by the coordinator's SuperExec."""
    found = [pid for pid in descendants(fed["coordinator"].pid) if "flwr-serverapp" in _cmdline(pid)]
    assert len(found) <= 1, [_cmdline(p) for p in found]
    return found[0] if found else None


def _start_run(fed, out: Path, log: Path, *options: str, rounds: int = ROUNDS) -> subprocess.Popen:
    return spawn(
        ["coordinator", "run", "--certs", str(fed["certs"]), "--address", fed["address"], "--state", str(fed["state"]),
         "--test-data", str(fed["data"]["test"]), "--label-column", "digit", "--rounds", str(rounds),
         "--min-departments", "3", "--round-timeout", "90", "--connect-timeout", "120", "--out", str(out), *options],
        log,
    )


def _wait_for_a_round_in_flight(fed, out: Path, run: subprocess.Popen, log: Path) -> tuple[int, int]:
    """Poll until round k+1 (k >= 1) is charged by some department and not yet completed at the coordinator.

    Returns (k, the ServerApp's PID).
    """
    base = _line_counts(fed)
    deadline = time.monotonic() + 400
    serverapp = None
    while time.monotonic() < deadline:
        if run.poll() is not None:
            pytest.fail(f"`coordinator run` ended (exit {run.returncode}) before a round was caught in flight:\n"
                        + log.read_text()[-3000:])
        serverapp = serverapp or _serverapp(fed)
        done = len(_summary(out).get("rounds", []))
        if serverapp and done >= 1:
            charged = _line_counts(fed)
            if any(charged[n] - base[n] > done for n in DEPARTMENTS) and len(_summary(out).get("rounds", [])) == done:
                return done, serverapp
        time.sleep(0.02)
    pytest.fail("never caught a round in flight; see " + str(log))


# What a SuperNode logs when a call it retried while the SuperLink was gone is answered again: the call
# went through, or the reply it was pushing belongs to a run the SuperLink no longer counts as running.
ANSWERED = ("Connection successful after", "is not in `RUNNING` status")


def _answered(fed, name: str) -> int:
    text = (fed["root"] / f"{name}.log").read_text()
    return sum(text.count(line) for line in ANSWERED)


def _charged(fed, run_name: str, rnd: int) -> set[str]:
    return {n for n in DEPARTMENTS if any(e["run_id"] == run_name and e["round"] == rnd for e in fed.ledger(n))}


def _resume_and_check(fed, out: Path, done: int, charged_at_kill: set[str], caught_a_charge: bool = True,
                      rounds: int = ROUNDS, every_audit: bool = False) -> dict:
    """``coordinator run --resume OUT`` with only the certs/state options; every promise checked
    (``every_audit``: also the audits of the coordinator's folder alone and with a ledger missing)."""
    started = time.monotonic()
    result = fed.control("run", "--resume", str(out), timeout=600)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    summary = _summary(out)
    run_name = summary["run_id"]
    assert [p.name for p in runs_in(out)] == [run_name]  # the same run folder, continued
    assert summary["status"] == "completed", summary["stop_reason"]
    assert [r["round"] for r in summary["rounds"]] == list(range(1, rounds + 1))
    (resume,) = summary["resumes"]
    assert resume["after_round"] == done
    assert f"resumed from its checkpoint after round {done}/{rounds}" in result.stdout
    assert len(summary["flower_run_ids"]) == 2 and len(set(summary["flower_run_ids"])) == 2
    for r in summary["rounds"]:
        assert sorted(r["trained"]) == list(DEPARTMENTS), r
    for name in DEPARTMENTS:
        ledger = fed.ledger(name)
        entries = [e for e in ledger if e["run_id"] == run_name]
        # One charge per round of this run: the interrupted round was not charged twice.
        assert sorted(e["round"] for e in entries) == list(range(1, rounds + 1)), (name, entries)
        assert [e["seq"] for e in ledger] == list(range(len(ledger)))
        assert summary["rounds"][-1]["epsilon"][name] == pytest.approx(ledger[-1]["epsilon"])
        assert ledger[-1]["epsilon"] <= 10.0 + 1e-9
    # Whoever had charged the interrupted round before the kill sent that update again, charged once.
    in_flight = summary["rounds"][done]
    assert charged_at_kill or not caught_a_charge, "the kill came after a department charged the interrupted round"
    assert charged_at_kill <= set(in_flight["replayed"]), (charged_at_kill, in_flight)
    for name, position in in_flight["replayed"].items():
        ledger = fed.ledger(name)
        assert ledger[position - 1]["run_id"] == run_name and ledger[position - 1]["round"] == done + 1
    assert sorted(resume["replayed"]) == sorted(in_flight["replayed"])
    assert sorted(resume["trained"]) == sorted(set(in_flight["trained"]) - set(in_flight["replayed"]))
    audit_began = time.monotonic()
    _audit(fed, out / "latest", every_audit)
    card = json.loads((out / "latest" / "model-card.json").read_text())
    assert card["rounds"] == rounds and card["status"] == "completed"
    assert (out / "latest" / "model.safetensors").exists()
    print(f"\nresume after round {done}: {seconds:.1f} s, audits {time.monotonic() - audit_began:.1f} s; "
          f"replayed {in_flight['replayed']}")
    return summary


def _audit(fed, run_dir: Path, every_audit: bool) -> None:
    """``fedsilo audit`` of the run folder, as the coordinator holds it and with the ledgers an auditor collected.

    On the coordinator host the run folder has no ledgers (they stay on the departments' hosts): the
    audit checks the coordinator's signed record and the model card, passes, and says that no ledger
    was there to re-derive ε from.  With each department's ledger given (``--ledgers``), everything is
    checked together: ledgers, record (every acknowledged head present) and card; a department whose
    ledger is not given is named.  The first two once (``every_audit``): they read no more in a later run.
    """
    folders = [fed["root"] / "ledgers" / name for name in DEPARTMENTS]
    if every_audit:
        audit = cli("audit", str(run_dir), "--keys", str(fed["keys"]), "--json")
        report = json.loads(audit.stdout)
        assert audit.returncode == 0 and report["ok"] and not report["departments"], audit.stdout + audit.stderr
        checked = " ".join(report["checked"])
        assert "the coordinator's record" in checked and "signatures checked against" in checked, report
        assert "the model card" in checked, report
        assert any("a deployment's stay on the department hosts" in line for line in report["unavailable"]), report
        partial = cli("audit", str(run_dir), "--keys", str(fed["keys"]), "--json",
                      *(arg for folder in folders[:-1] for arg in ("--ledgers", str(folder))))
        report = json.loads(partial.stdout)
        assert partial.returncode == 0 and len(report["departments"]) == len(DEPARTMENTS) - 1, partial.stdout
        assert any(f"the ledgers of {DEPARTMENTS[-1]}: acknowledged in this run's record" in line
                   for line in report["unavailable"]), report
    audit = cli("audit", str(run_dir), "--keys", str(fed["keys"]), "--json",
                *(arg for folder in folders for arg in ("--ledgers", str(folder))))
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"], audit.stdout + audit.stderr
    assert sorted(d["id"] for d in report["departments"]) == list(DEPARTMENTS)
    assert all(d["verified"] for d in report["departments"]), report
    assert not any("acknowledged in this run's record" in line for line in report["unavailable"]), report


def _kill_coordinator(fed, serverapp: int, run: subprocess.Popen) -> None:
    """SIGKILL `coordinator start` with everything under it, and `coordinator run` with its `flwr run`."""
    tree = [serverapp, fed["coordinator"].pid, *descendants(fed["coordinator"].pid)]
    for pid in tree:  # the ServerApp first: nothing more is written
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stop(run, signal.SIGKILL)
    fed["coordinator"].wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in tree), [_cmdline(p) for p in tree if alive(p)]


def _wait_for_reconnection(fed, answered_before: dict[str, int], timeout: float = 120) -> None:
    """The departments' SuperNodes were never restarted: they retry (backing off up to 20 s) until the proxy answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        back = {n for n in DEPARTMENTS if _answered(fed, n) > answered_before[n]}
        if back == set(DEPARTMENTS):
            return
        time.sleep(0.5)
    pytest.fail(f"only {sorted(back)} reached the restarted coordinator within {timeout:g} s: "
                + " | ".join((fed["root"] / f"{n}.log").read_text()[-600:] for n in DEPARTMENTS if n not in back))


def test_secure_aggregation_over_tls_through_the_proxy(fed):
    """The coordinator gets only the round's masked sum; heads and ledgers work as in a plain round.

    First in this module (the scenarios below then spend what is left of the budgets), and here rather
    than in test_deployment.py, whose departments also restart under other keys and names: a roster
    names a department's own key."""
    before = {name: len(fed.ledger(name)) for name in DEPARTMENTS}
    out = fed["root"] / "runs" / "secure"
    result = fed.run("--rounds", "1", "--min-departments", "3", "--secure-aggregation", "--round-timeout", "120",
                     "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "completed", summary["stop_reason"]
    (session,) = summary["secure_aggregation"]
    assert session["participants"] == session["dealt"] == list(DEPARTMENTS) and session["threshold"] == 3
    (rnd,) = summary["rounds"]
    assert sorted(rnd["trained"]) == list(DEPARTMENTS) and rnd["secagg"]["u3"] == list(DEPARTMENTS), rnd
    assert summary["final_accuracy"] > summary["initial"]["accuracy"] + 0.2
    for name in DEPARTMENTS:
        entries = fed.ledger(name)
        assert len(entries) == before[name] + 1 and rnd["charged"][name]["ledger_seq"] == len(entries)
        folder = fed["root"] / "ledgers" / name / ".secagg"  # the session's secrets stay on its host, 0600
        (state,) = folder.glob("*.state")
        assert state.stat().st_mode & 0o777 == 0o600 and folder.stat().st_mode & 0o777 == 0o700
    assert not list((out / "latest").resolve().rglob("*.state"))


def test_distributed_dp_over_tls_through_the_proxy(fed):
    """Each round one DP-SGD step over the three departments' records, its noise added in shares by them.

    Every department charges a Skellam round (ledger kind ``skellam``) per round; the coordinator applies
    the decoded noisy gradient; the audit with the departments' ledgers re-derives those rounds.  Before
    the resume scenarios: they then plan Gaussian runs on histories that hold Skellam rounds."""
    before = {name: len(fed.ledger(name)) for name in DEPARTMENTS}
    out = fed["root"] / "runs" / "distributed"
    # σ 3 (the last --noise-multiplier wins): these rounds leave room under the scenarios' targets.
    result = fed.run("--rounds", "2", "--min-departments", "3", "--distributed-dp", "--sample-rate", "0.1",
                     "--noise-multiplier", "3", "--learning-rate", "2", "--round-timeout", "120", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["status"] == "completed", summary["stop_reason"]
    (session,) = summary["secure_aggregation"]
    assert session["participants"] == list(DEPARTMENTS)
    for rnd in summary["rounds"]:
        assert sorted(rnd["trained"]) == list(DEPARTMENTS) and rnd["secagg"]["u3"] == list(DEPARTMENTS), rnd
    assert summary["final_accuracy"] > summary["initial"]["accuracy"] + 0.1
    for name in DEPARTMENTS:
        entries = fed.ledger(name)[before[name]:]
        assert [e["round"] for e in entries] == [1, 2], entries
        assert all(e["kind"] == "skellam" and e["version"] == 4 and e["steps"] == 1 for e in entries), entries
        assert all(e["participants"] == 3 and e["threshold"] == 3 for e in entries), entries
    audit = cli("audit", str(out / "latest"), "--keys", str(fed["keys"]), "--json",
                *(arg for name in DEPARTMENTS for arg in ("--ledgers", str(fed["root"] / "ledgers" / name))))
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"], audit.stdout + audit.stderr
    for row in report["departments"]:
        assert row["verified"] and any("distributed DP" in f for f in row["findings"]), row


def test_serverapp_killed_mid_round_resumes(fed):
    """SIGKILL the ServerApp only; the coordinator (SuperLink, SuperExec, nginx) keeps running."""
    began = time.monotonic()
    out, log = fed["root"] / "runs" / "serverapp-killed", fed["root"] / "serverapp-killed.log"
    run = _start_run(fed, out, log, "--target-epsilon", "5")
    try:
        done, serverapp = _wait_for_a_round_in_flight(fed, out, run, log)
        os.kill(serverapp, signal.SIGKILL)
        killed = time.monotonic()
        run_name = _summary(out)["run_id"]
        charged_at_kill = _charged(fed, run_name, done + 1)
        try:
            run.wait(timeout=FAILED_RUN_WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`coordinator run` still waits {FAILED_RUN_WAIT} s after its ServerApp was killed")
        failed_after = time.monotonic() - killed
    finally:
        if run.poll() is None:
            stop(run, signal.SIGKILL)
    text = log.read_text()
    assert run.returncode == 1 and "ended as 'finished:failed'" in text, text[-3000:]
    assert "coordinator run --resume" in " ".join(text.split())
    assert alive(fed["coordinator"].pid) and fed["coordinator"].poll() is None  # the coordinator itself is untouched
    summary = _summary(out)
    assert summary["status"] == "running"  # the ServerApp died before it could say anything
    assert len(summary["rounds"]) == done and (out / "latest" / "checkpoint.safetensors").exists()
    print(f"\nServerApp killed in round {done + 1}/{ROUNDS}, {killed - began:.1f} s into the scenario (charged by "
          f"{sorted(charged_at_kill)}); `coordinator run` ended {failed_after:.1f} s later")
    _resume_and_check(fed, out, done, charged_at_kill, every_audit=True)
    print(f"scenario 1: {time.monotonic() - began:.1f} s")


def test_whole_coordinator_killed_mid_round_resumes(fed):
    """SIGKILL `coordinator start` and its whole tree, and `coordinator run`; the departments stay up."""
    began = time.monotonic()
    out, log = fed["root"] / "runs" / "coordinator-killed", fed["root"] / "coordinator-killed.log"
    run = _start_run(fed, out, log, "--target-epsilon", "7")
    try:
        done, serverapp = _wait_for_a_round_in_flight(fed, out, run, log)
        _kill_coordinator(fed, serverapp, run)
    finally:
        if run.poll() is None:
            stop(run, signal.SIGKILL)
    killed = time.monotonic()
    run_name = _summary(out)["run_id"]
    summary = _summary(out)
    assert summary["status"] == "running" and len(summary["rounds"]) == done
    assert all(p.poll() is None for p in fed["departments"].values())  # the departments stay up
    reconnects = {n: _answered(fed, n) for n in DEPARTMENTS}

    # The operator starts the coordinator again: same certificates, state folder and public address.
    # The stale coordinator.json names dead processes only, so it is not refused; the database keeps the registrations.
    fed.start_coordinator()
    restarted = time.monotonic()
    _wait_for_reconnection(fed, reconnects)
    reconnected = time.monotonic()
    fed.wait_online(len(DEPARTMENTS))
    # Charged before the resume: trained before the kill, or during the outage (its reply could not be sent).
    charged_at_kill = _charged(fed, run_name, done + 1)
    print(f"\ncoordinator killed in round {done + 1}/{ROUNDS}, {killed - began:.1f} s into the scenario (charged by "
          f"{sorted(charged_at_kill)}); restarted {restarted - killed:.1f} s later; every department reconnected "
          f"{reconnected - restarted:.1f} s after that, counted online {time.monotonic() - reconnected:.1f} s later")
    _resume_and_check(fed, out, done, charged_at_kill)
    print(f"scenario 2: {time.monotonic() - began:.1f} s")


def _unreceived(fed) -> dict[str, int]:
    """Per department, how many messages its SuperNode began to receive and did not finish receiving
    (one it is pulling now, and any an earlier outage left behind)."""
    counts = {}
    for name in DEPARTMENTS:
        text = (fed["root"] / f"{name}.log").read_text()
        counts[name] = text.count("Receiving: train message") - text.count("Received successfully")
    return counts


def test_coordinator_down_past_the_runs_heartbeat_resumes(fed):
    """SIGKILL the whole coordinator while a department receives a round's message; restart it after Flower's
    heartbeat window (2 x 30 s), when the interrupted run counts as failed; the departments must all answer again."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    began = time.monotonic()
    out, log = fed["root"] / "runs" / "coordinator-down", fed["root"] / "coordinator-down.log"
    warned = {n: _gave_up(fed, n) for n in DEPARTMENTS}
    left_behind = _unreceived(fed)
    run = _start_run(fed, out, log, "--target-epsilon", "10", rounds=RECEIVING_ROUNDS)
    receiving: list[str] = []
    try:
        deadline = time.monotonic() + 400
        while not receiving and time.monotonic() < deadline:
            if run.poll() is not None:
                pytest.fail(f"`coordinator run` ended (exit {run.returncode}) first:\n" + log.read_text()[-3000:])
            serverapp = _serverapp(fed)
            if serverapp and len(_summary(out).get("rounds", [])) >= 1:
                receiving = [n for n, count in _unreceived(fed).items() if count > left_behind[n]]
            time.sleep(0.005)
        assert receiving, "never caught a department receiving a round's message"
        done = len(_summary(out)["rounds"])
        _kill_coordinator(fed, serverapp, run)
    finally:
        if run.poll() is None:
            stop(run, signal.SIGKILL)
    killed = time.monotonic()
    run_name = _summary(out)["run_id"]
    assert _summary(out)["status"] == "running" and len(_summary(out)["rounds"]) == done
    answered = {n: _answered(fed, n) for n in DEPARTMENTS}
    # Down until the ServerApp's last heartbeat has lapsed: the restarted SuperLink counts the run failed.
    time.sleep(max(0.0, killed + HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 2 - time.monotonic()))
    fed.start_coordinator()
    restarted = time.monotonic()
    _wait_for_reconnection(fed, answered)
    reconnected = time.monotonic()
    fed.wait_online(len(DEPARTMENTS))
    # Whoever was receiving the interrupted round's message when the coordinator died (and whoever fetched it
    # from the restarted one, whose run had ended) holds a task whose message never completes: it gives
    # that task up after --task-input-wait instead of waiting on it.
    deadline = time.monotonic() + INPUT_WAIT + 60
    while time.monotonic() < deadline and not all(_gave_up(fed, n) > warned[n] for n in receiving):
        time.sleep(0.5)
    assert all(_gave_up(fed, n) > warned[n] for n in receiving), {
        n: (fed["root"] / "ledgers" / n / ".flower" / "department.log").read_text()[-1500:] for n in receiving}
    charged_at_kill = _charged(fed, run_name, done + 1)
    print(f"\ncoordinator killed in round {done + 1}/{RECEIVING_ROUNDS} while {receiving} received it, {killed - began:.1f} s "
          f"into the scenario (charged by {sorted(charged_at_kill)}); restarted {restarted - killed:.1f} s later; "
          f"every department reconnected {reconnected - restarted:.1f} s after that")
    _resume_and_check(fed, out, done, charged_at_kill, caught_a_charge=False, rounds=RECEIVING_ROUNDS)
    print(f"scenario 3: {time.monotonic() - began:.1f} s")


def _gave_up(fed, name: str) -> int:
    log = fed["root"] / "ledgers" / name / ".flower" / "department.log"
    return log.read_text().count("gave it up, answering the next task") if log.exists() else 0
