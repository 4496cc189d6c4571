"""A malicious department cannot stop a run: every malformed reply is rejected with a reason.

Against the real strategy (every rule), one test per doctored reply of issue 19
(and a few more); then the ServerApp's round loop in-process, where a failing
round leaves a final summary and a checkpoint a resume continues from; then one
run over a real loopback deployment with a doctored department.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flower_messages import Grid, reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedsilo.server.acknowledgements import HeadKeeper
from fedsilo.server.checkpoint import Checkpoint, resumable
from fedsilo.server.replies import MAX_WEIGHT_MAGNITUDE
from fedsilo.server.robust import department_strategy
from fedsilo.server.strategy import DepartmentFedAvg
from fedsilo.shared.config import RunSettings
from fedsilo.shared.record import (
    HEAD_KEY, CoordinatorRecord, LedgerHead, MalformedHead, public_key_line, verify_record,
)
from fedsilo.shared.signing import simulated_identity

pytestmark = pytest.mark.usefixtures("serverapp_identity")

RULES = ("fedavg", "trimmed-mean", "median", "krum")
SHAPE = (3, 4)
HONEST = 5  # enough for every rule with byzantine = 1 (Krum: 2f + 3)


def _settings(**config):
    return RunSettings.from_run_config({key.replace("_", "-"): value for key, value in config.items()})


def head_record(signer, seq: int, epsilon, *, run_id: str = "run", rnd: int = 1) -> ConfigRecord:
    """A ledger head signed by ``signer`` exactly as a department signs one — whatever ε it states.

    Built by hand: :class:`LedgerHead` itself now refuses a NaN or infinite ε.
    """
    body = {"identity": signer.fingerprint, "public_key": public_key_line(signer.public_key), "seq": seq,
            "head": "ab" * 32, "run_id": run_id, "round": rnd, "epsilon": epsilon, "delta": 1e-5, "budget": 10.0}
    payload = b"fedsilo-ledger-head-v1:" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return ConfigRecord({**body, "signature": signer.sign(payload)})


# ----------------------------------------------------------------------------- doctored replies
# Each takes the doctored department's honest reply (and its signer) and changes one thing.


def _no_name(msg, signer):
    msg.content["department"] = ConfigRecord({"status": "trained", "reason": ""})


def _metric(key, value):
    def doctor(msg, signer):
        msg.content["metrics"][key] = value
    return doctor


def _drop_steps(msg, signer):
    metrics = dict(msg.content["metrics"])
    del metrics["steps"]
    msg.content["metrics"] = MetricRecord(metrics)


def _head_epsilon(value):
    def doctor(msg, signer):
        msg.content[HEAD_KEY] = head_record(signer, 1, value)  # correctly signed by its own key
    return doctor


def _weights(values):
    def doctor(msg, signer):
        msg.content["arrays"] = ArrayRecord({"w": Array(values)})
    return doctor


def _status(value):
    def doctor(msg, signer):
        msg.content["department"] = ConfigRecord({"name": "evil", "status": value, "reason": ""})
    return doctor


def _two_array_records(msg, signer):
    msg.content["more"] = ArrayRecord({"w": Array(np.zeros(SHAPE, dtype=np.float32))})


def _no_head(msg, signer):
    del msg.content[HEAD_KEY]


DOCTORED = {
    # The seven of issue 19, and the 1e300 that used to become ∞ in float32.
    "status without name": (_no_name, "no 'name'"),
    "num-examples inf": (_metric("num-examples", math.inf), "num-examples must be an integer"),
    "num-examples NaN": (_metric("num-examples", math.nan), "num-examples must be an integer"),
    "replayed-seq NaN": (_metric("replayed-seq", math.nan), "replayed-seq must be an integer"),
    "metrics without steps": (_drop_steps, "no 'steps'"),
    "signed head with epsilon NaN": (_head_epsilon(math.nan), "epsilon must be a finite number"),
    "signed head with epsilon inf": (_head_epsilon(math.inf), "epsilon must be a finite number"),
    "float64 update of 1e300": (_weights(np.full(SHAPE, 1e300)), "dtype float64"),
    # More of the same kind.
    "float32 update of 1e30": (_weights(np.full(SHAPE, 1e30, dtype=np.float32)), "magnitude"),
    "update with inf": (_weights(np.full(SHAPE, np.inf, dtype=np.float32)), "NaN or infinite"),
    "num-examples a list": (_metric("num-examples", [1, 2]), "num-examples must be an integer"),
    "num-examples 0": (_metric("num-examples", 0), "positive"),
    "num-examples 1e15": (_metric("num-examples", 10**15), "num-examples must be an integer in"),
    "epsilon NaN": (_metric("epsilon", math.nan), "epsilon must be a number"),
    "epsilon negative": (_metric("epsilon", -1.0), "epsilon must be a number"),
    "delta 2": (_metric("delta", 2.0), "delta must be a number"),
    "steps -1": (_metric("steps", -1), "steps must be an integer"),
    "unknown status": (_status("pwned"), "none of"),
    "two ArrayRecords": (_two_array_records, "one ArrayRecord"),
    "no ledger head": (_no_head, "no signed ledger head"),
}


class _Federation:
    """Honest departments and one doctored one, with signing keys and the coordinator's record."""

    def __init__(self, root: Path, rule: str, honest: int = HONEST, **settings):
        self.names = [f"h{i}" for i in range(honest)] + ["evil"]
        self.signers = {name: simulated_identity(root / "keys", name) for name in self.names}
        self.strategy: DepartmentFedAvg = department_strategy(
            _settings(aggregation=rule, **settings), min_train_nodes=len(self.names),
            min_available_nodes=len(self.names))
        self.record = CoordinatorRecord(root / "record.jsonl", simulated_identity(root / "keys", "coordinator"))
        self.strategy.heads = HeadKeeper(self.record)

    def round(self, updates: dict[str, np.ndarray], doctor=None):
        """One round of 1 at a global model of zeros; ``doctor`` changes evil's reply."""
        base = ArrayRecord({"w": Array(np.zeros(SHAPE, dtype=np.float32))})
        requests = list(self.strategy.configure_train(1, base, ConfigRecord(), Grid(range(1, len(self.names) + 1))))
        replies = []
        for request, name in zip(requests, self.names):
            msg = reply(request, name, updates[name], n=10)
            msg.content["metrics"]["replayed-seq"] = 0
            msg.content["metrics"]["max-epsilon"] = 10.0
            msg.content["metrics"]["delta"] = 1e-5
            msg.content[HEAD_KEY] = head_record(self.signers[name], 1, 1.0)
            if name == "evil":
                self.evil_node = request.metadata.dst_node_id
                if doctor is not None:
                    doctor(msg, self.signers[name])
            replies.append(msg)
        arrays, _ = self.strategy.aggregate_train(1, replies)
        return None if arrays is None else arrays["w"].numpy()


def _honest_updates(names, rng):
    return {name: (1.0 + 0.1 * rng.standard_normal(SHAPE)).astype(np.float32) for name in names}


def test_the_hand_signed_head_is_what_a_department_signs():
    """The helper above must sign exactly what a department does, or the head tests test nothing."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        signer = simulated_identity(Path(folder), "d")
        head = LedgerHead.from_record(head_record(signer, 3, 1.5))
        assert head.problem() == "" and head.seq == 3 and head.epsilon == 1.5


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", list(DOCTORED))
def test_a_doctored_reply_is_rejected_and_the_round_completes_with_the_honest_departments(tmp_path, rule, case):
    doctor, reason = DOCTORED[case]
    fed = _Federation(tmp_path, rule)
    rng = np.random.default_rng(len(case))
    updates = _honest_updates(fed.names, rng)
    honest = [updates[name] for name in fed.names if name != "evil"]
    result = fed.round(updates, doctor)
    report = fed.strategy.last_report
    assert result is not None and np.all(np.isfinite(result)), "the global model must stay finite"
    assert result.dtype == np.float32
    assert sorted(report.trained) == [name for name in fed.names if name != "evil"]
    # Without a name, and no registry (a simulation), it is known by its node.
    evil = f"node-{fed.evil_node}" if case == "status without name" else "evil"
    assert list(report.rejected) == [evil] and reason in report.rejected[evil], report.rejected
    lowest, highest = np.min(honest, axis=0), np.max(honest, axis=0)
    assert np.all((result >= lowest - 1e-5) & (result <= highest + 1e-5)), "moved outside the honest updates"
    # Every honest head was signed into the record; nothing non-finite was, and it still verifies.
    found = verify_record(fed.record.path, fed.record.signer.public_key)
    assert found.ok, found.problems
    assert {ack.department for ack in found.entries} >= set(report.trained)
    assert all(math.isfinite(ack.epsilon) for ack in found.entries)
    assert set(report.charged) >= set(report.trained)


@pytest.mark.parametrize("rule", RULES)
def test_a_charged_department_whose_update_is_rejected_is_named_as_charged(tmp_path, rule):
    fed = _Federation(tmp_path, rule)
    updates = _honest_updates(fed.names, np.random.default_rng(1))
    fed.round(updates, _weights(np.full(SHAPE, np.nan, dtype=np.float32)))
    report = fed.strategy.last_report
    assert "evil" in report.rejected and report.charged["evil"]["ledger_seq"] == 1
    assert report.charged["evil"]["epsilon"] == 1.0


def test_a_float64_model_refuses_1e300_by_magnitude_before_it_is_averaged(tmp_path):
    strategy = DepartmentFedAvg(min_available_nodes=2, min_train_nodes=2)
    base = ArrayRecord({"w": Array(np.zeros(SHAPE, dtype=np.float64))})
    requests = list(strategy.configure_train(1, base, ConfigRecord(), Grid([1, 2])))
    replies = [reply(requests[0], "a", np.ones(SHAPE)), reply(requests[1], "evil", np.full(SHAPE, 1e300))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), 1.0)
    assert f"bound of {MAX_WEIGHT_MAGNITUDE:g}" in strategy.last_report.rejected["evil"]


@pytest.mark.parametrize("rule", RULES)
def test_an_extra_metric_or_a_renamed_array_record_cannot_make_flower_skip_the_round(tmp_path, rule):
    """Flower skips aggregation when replies' keys differ; the canonical content each rule sees prevents it."""
    def doctor(msg, signer):
        msg.content["metrics"]["surprise"] = 1.0
        msg.content["weights"] = msg.content.array_records["arrays"]
        del msg.content["arrays"]

    fed = _Federation(tmp_path, rule)
    result = fed.round(_honest_updates(fed.names, np.random.default_rng(2)), doctor)
    assert result is not None and np.all(np.isfinite(result))
    assert "evil" in fed.strategy.last_report.trained  # well-formed, only unusual: it counts


def test_a_reply_the_coordinator_cannot_read_is_rejected_not_raised(tmp_path, monkeypatch):
    """Even a reader's own bug rejects one department instead of stopping the round."""
    import fedsilo.server.strategy as strategy_module

    real = strategy_module.read_update

    def flaky(msg, layout, bound):
        if msg.content["department"]["name"] == "evil":
            raise ZeroDivisionError("a bug")
        return real(msg, layout, bound)

    monkeypatch.setattr(strategy_module, "read_update", flaky)
    fed = _Federation(tmp_path, "median")
    result = fed.round(_honest_updates(fed.names, np.random.default_rng(3)))
    assert result is not None and "ZeroDivisionError" in fed.strategy.last_report.rejected["evil"]


# ----------------------------------------------------------------------------- the record


def test_a_ledger_head_with_a_non_finite_number_is_refused_before_the_record(tmp_path):
    signer = simulated_identity(tmp_path / "keys", "d")
    with pytest.raises(MalformedHead, match="epsilon must be a finite number"):
        LedgerHead.from_record(head_record(signer, 1, math.nan))
    with pytest.raises(MalformedHead, match="seq must be an integer"):
        LedgerHead("i", "k", -1, "h", "r", 1, 1.0, 1e-5, 10.0)
    head = LedgerHead.from_record(head_record(signer, 1, 1.0))
    object.__setattr__(head, "budget", math.inf)  # a head that slipped past its constructor
    record = CoordinatorRecord(tmp_path / "record.jsonl", simulated_identity(tmp_path / "keys", "coordinator"))
    with pytest.raises(MalformedHead, match="budget must be a finite number"):
        record.append(head, "d")
    assert not record.path.exists()  # nothing written


# ----------------------------------------------------------------------------- the round loop, in-process


class _FakeGrid:
    """Departments answering in this process: push computes each reply, pull hands it back."""

    def __init__(self, departments):
        self.departments = departments  # node id -> callable(request) -> reply
        self._replies = {}

    def get_node_ids(self):
        return list(self.departments)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what Flower's push assigns
            self._replies[msg.object_id] = self.departments[msg.metadata.dst_node_id](msg)
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, ids):
        return [self._replies.pop(i) for i in list(ids) if i in self._replies]


class _Department:
    """A department that keeps a ledger count, signs its heads and replays a charged round's update."""

    def __init__(self, root: Path, name: str, doctor=None):
        self.name, self.doctor = name, doctor
        self.signer = simulated_identity(root / "keys", name)
        self.seq, self.charged = 0, {}  # round -> (ledger seq, update)

    def __call__(self, request):
        config = request.content["config"]
        rnd = int(config["server-round"])
        glob = {k: v.numpy() for k, v in request.content["arrays"].items()}
        replayed = 0
        if rnd in self.charged:  # trained and charged before the coordinator restarted: send it again
            replayed, update = self.charged[rnd]
        else:
            self.seq += 1
            update = {k: (v + 0.01).astype(v.dtype) for k, v in glob.items()}
            self.charged[rnd] = (self.seq, update)
        msg = reply(request, self.name, n=100)
        msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in update.items()})
        msg.content["metrics"]["replayed-seq"] = replayed
        msg.content["metrics"]["epsilon"] = 0.5 * self.seq
        msg.content[HEAD_KEY] = head_record(self.signer, self.seq, 0.5 * self.seq, run_id=str(config["run-key"]),
                                            rnd=rnd)
        if self.doctor is not None:
            self.doctor(msg, self.signer)
        return msg


def _run(tmp_path, departments, **config):
    from fedsilo.server.app import run_federation
    from fedsilo.shared.runs import create_run_folder

    out = tmp_path / "OUT"
    settings = _settings(dataset="digits", num_server_rounds=2, min_departments=len(departments), out=str(out),
                         run_name="run-test", connect_timeout=1.0, round_timeout=5.0, **config)
    run_dir = out / "run-test"
    if not settings.resume:
        create_run_folder(out, "run-test")
    grid = _FakeGrid({i + 1: d for i, d in enumerate(departments)})
    return run_dir, lambda: run_federation(grid, settings, out, run_dir, run_id="run-test")


def test_an_error_while_aggregating_leaves_a_final_summary_a_checkpoint_and_who_was_charged(tmp_path, monkeypatch):
    departments = [_Department(tmp_path, name) for name in ("a", "b", "c")]
    run_dir, run = _run(tmp_path, departments)

    def broken(self, server_round, accepted):
        raise ArithmeticError("the rule broke")

    with monkeypatch.context() as patch:
        patch.setattr(DepartmentFedAvg, "combine", broken)
        with pytest.raises(RuntimeError, match="could not aggregate the round"):
            run()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "ArithmeticError: the rule broke" in summary["stop_reason"]
    assert summary["rounds"] == []
    (failed,) = summary["failed_rounds"]
    assert failed["round"] == 1 and sorted(failed["trained"]) == ["a", "b", "c"]
    assert {name: c["ledger_seq"] for name, c in failed["charged"].items()} == {"a": 1, "b": 1, "c": 1}
    assert failed["charged"]["a"]["epsilon"] == 0.5 and failed["epsilon"]["a"] == 0.5
    _, checkpoint = resumable(run_dir)
    assert checkpoint.round == 0  # the initial model: the failed round runs again

    # The resume runs round 1 again: every department sends the update it was charged for, no new charge.
    run_dir, run = _run(tmp_path, departments, resume=True)
    run()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][0]["replayed"] == {"a": 1, "b": 1, "c": 1}
    assert summary["failed_rounds"][0]["round"] == 1  # the failure stays on the record
    assert [d.seq for d in departments] == [2, 2, 2]  # one charge per round


def test_a_robust_round_left_with_too_few_updates_ends_resumable(tmp_path):
    doctored = _Department(tmp_path, "evil", doctor=_metric("num-examples", math.nan))
    departments = [_Department(tmp_path, "a"), _Department(tmp_path, "b"), doctored]
    run_dir, run = _run(tmp_path, departments, aggregation="median")  # byzantine 1: needs 3 usable updates
    run()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "too-few-updates" and "needs at least 3 accepted updates" in summary["stop_reason"]
    assert summary["rounds"] == []
    (failed,) = summary["failed_rounds"]
    assert "num-examples must be an integer" in failed["rejected"]["evil"]
    # evil trained and its signed head verifies: its ledger was charged, though its reply is unusable.
    assert sorted(failed["charged"]) == ["a", "b", "evil"] and failed["trained"] == ["a", "b"]
    assert Checkpoint.load(run_dir).round == 0 and resumable(run_dir)[1].round == 0
    # The run's report says so too.
    from rich.console import Console

    from fedsilo.server.report import print_run_report

    console = Console(record=True, width=200)
    print_run_report(run_dir, console)
    text = console.export_text()
    assert "Round 1 produced no model" in text and "needs at least 3 accepted updates" in text
    assert "rejected: evil (" in text and "charged all the same: a, b, evil" in text


# ----------------------------------------------------------------------------- a real deployment


DOCTOR = Path(__file__).with_name("doctored_department.py")


@pytest.mark.slow
def test_a_doctored_department_over_a_real_deployment_is_rejected_and_the_run_finishes(tmp_path):
    """Two honest departments and one whose every train reply states a correctly signed ε = NaN, median."""
    from federation import digits_tables, federation

    from fedsilo.shared.flower_cli import offline_env

    names = ("finance", "hr")
    with federation(tmp_path, names, extra_keys=("mallory",),
                    tables=lambda root, _: digits_tables(root, (*names, "mallory"))) as fed:
        registered = fed.control("register", "mallory")
        assert registered.returncode == 0, registered.stdout + registered.stderr
        args = ["department", "start", "--coordinator", fed["address"], "--ca", str(fed["certs"] / "ca.crt"),
                "--key", str(fed["certs"] / "departments" / "mallory"), "--data", str(fed["data"]["mallory"]),
                "--label-column", "digit", "--ledger", str(tmp_path / "ledgers" / "mallory"), "--max-epsilon", "10"]
        with open(tmp_path / "mallory.log", "w") as log:  # stopped with the others, by its PID
            fed["departments"]["mallory"] = subprocess.Popen(
                [sys.executable, str(DOCTOR), "--doctor", "head-epsilon-nan", *args],
                stdout=log, stderr=subprocess.STDOUT, env=offline_env())
        fed.wait_online(3)
        out = tmp_path / "runs"
        result = fed.run("--rounds", "1", "--min-departments", "3", "--aggregation", "median", "--byzantine", "0",
                         "--out", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads((out / "latest" / "summary.json").read_text())
        assert summary["status"] == "completed", summary["stop_reason"]
        (rnd,) = summary["rounds"]
        assert rnd["trained"] == ["finance", "hr"], rnd
        assert "epsilon must be a finite number" in rnd["rejected"]["mallory"], rnd["rejected"]
        assert summary["final_accuracy"] > summary["initial"]["accuracy"]
        assert len(fed.ledger("mallory")) == 1  # it did train and charge its own ledger: only its reply lied
