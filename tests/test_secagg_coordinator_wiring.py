"""The coordinator's secure-aggregation wiring, in process: a fake Grid whose nodes are departments
built from secagg.DepartmentSession + FixedPointCodec answering per the wire contract."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from flower_messages import reply
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from test_malicious_department import head_record

from fedsilo.secagg import DepartmentSession, FixedPointCodec, records
from fedsilo.secagg.messages import AdvertiseRequest, ConsistencyRequest, MaskRequest, ShareRequest, UnmaskRequest
from fedsilo.server.secure_aggregation import check_model, check_settings, default_threshold
from fedsilo.shared.config import RunSettings
from fedsilo.shared.protocol import STATUS_KEY
from fedsilo.shared.record import HEAD_KEY
from fedsilo.shared.signing import simulated_identity
from fedsilo.shared.summary_format import read_summary

pytestmark = pytest.mark.usefixtures("serverapp_identity")

_QUERIES = {records.ACTION_ADVERTISE: AdvertiseRequest, records.ACTION_SHARE: ShareRequest,
            records.ACTION_CONSISTENCY: ConsistencyRequest, records.ACTION_UNMASK: UnmaskRequest}


def _ok(request, name, answer=None):
    content = {STATUS_KEY: ConfigRecord({"name": name, "status": "ok", "reason": ""})}
    if answer is not None:
        content[records.RECORD_NAME] = records.to_record(answer)
    return Message(RecordDict(content), reply_to=request)


class _Department:
    """A secure-aggregation department: its update is global + ``step`` everywhere, its weight ``weight``.

    ``silent``: the actions it never answers ("train", or a query's action); ``doctor(answer)`` changes
    its MaskedInput before it leaves.
    """

    def __init__(self, root: Path, name: str, step: float, weight: int, silent=(), doctor=None):
        self.name, self.step, self.weight, self.silent, self.doctor = name, step, weight, set(silent), doctor
        self.signer = simulated_identity(root / "keys", name)
        self.roster: dict = {}
        self.session: DepartmentSession | None = None
        self.globals: dict[int, dict[str, np.ndarray]] = {}  # round -> the global model it was sent
        self.seq = 0

    def __call__(self, request):
        action = request.metadata.message_type
        if action in self.silent:
            return None
        if action == records.ACTION_HELLO:
            records.read_hello(request.content[records.RECORD_NAME])
            return _ok(request, self.name)
        if action in _QUERIES:
            query = records.from_record(request.content[records.RECORD_NAME], _QUERIES[action])
            if action == records.ACTION_ADVERTISE:
                self.session = DepartmentSession(self.name, self.signer, self.roster)
                return _ok(request, self.name, self.session.advertise(query))
            step = {records.ACTION_SHARE: self.session.share, records.ACTION_CONSISTENCY: self.session.sign_responders,
                    records.ACTION_UNMASK: self.session.unmask}[action]
            return _ok(request, self.name, step(query))
        return self._train(request)

    def _train(self, request):
        config = request.content["config"]
        rnd = int(config["server-round"])
        glob = {k: v.numpy() for k, v in request.content["arrays"].items()}
        self.globals[rnd] = glob
        mask_request = records.from_record(request.content[records.RECORD_NAME], MaskRequest)
        codec = FixedPointCodec(FixedPointCodec.layout_of(glob), 1.0, 16, 1048576, len(self.session.params.participants))
        delta = {k: np.full(v.shape, self.step) for k, v in glob.items()}
        x, _ = codec.encode(delta, self.weight)
        masked = self.session.mask(mask_request, x)
        if self.doctor is not None:
            masked = self.doctor(masked)
        self.seq += 1
        msg = reply(request, self.name, n=self.weight)
        msg.content["metrics"]["replayed-seq"] = 0
        msg.content[HEAD_KEY] = head_record(self.signer, self.seq, 0.5 * self.seq, run_id=str(config["run-key"]), rnd=rnd)
        msg.content[records.RECORD_NAME] = records.to_record(masked)
        return msg


class _Grid:
    """Departments in this process; with ``registry`` it also answers ``get_nodes`` as a deployment's does."""

    def __init__(self, departments, registry: bool = False):
        self.departments = {i + 1: d for i, d in enumerate(departments)}
        self.registry = registry
        self._replies = {}
        roster = {d.name: d.signer.public_key for d in departments}
        for d in departments:
            d.roster = roster

    def get_node_ids(self):
        return list(self.departments)

    def get_nodes(self):
        if not self.registry:
            raise AttributeError("a simulation has no registry")
        return [SimpleNamespace(node_id=i, name=d.name, public_key=d.signer.public_key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)) for i, d in self.departments.items()]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what Flower's push assigns
            answer = self.departments[msg.metadata.dst_node_id](msg)
            if answer is not None:
                self._replies[msg.object_id] = answer
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, ids):
        return [self._replies.pop(i) for i in list(ids) if i in self._replies]


def _run(tmp_path, departments, registry=False, rounds=2, **config):
    from fedsilo.server.app import run_federation
    from fedsilo.shared.runs import create_run_folder

    out = tmp_path / "OUT"
    values = {"dataset": "digits", "num_server_rounds": rounds, "min_departments": 3, "out": str(out),
              "run_name": "run-sa", "connect_timeout": 1.0, "round_timeout": 0.3, "secure_aggregation": True, **config}
    settings = RunSettings.from_run_config({k.replace("_", "-"): v for k, v in values.items()})
    if not settings.resume:
        create_run_folder(out, "run-sa")
    summary = run_federation(_Grid(departments, registry), settings, out, out / "run-sa", run_id="run-sa")
    return summary, out / "run-sa"


def _expected_step(departments):
    weights = np.array([d.weight for d in departments], dtype=np.float64)
    return float(np.dot(weights, [d.step for d in departments]) / weights.sum())


def _check_step(department, contributors, n):
    g1, g2 = department.globals[1], department.globals[2]
    codec = FixedPointCodec(FixedPointCodec.layout_of(g1), 1.0, 16, 1048576, n)
    bound = codec.max_error(sum(d.weight for d in contributors), len(contributors))
    expected = _expected_step(contributors)
    for key in g1:
        moved = g2[key].astype(np.float64) - g1[key].astype(np.float64)
        assert np.max(np.abs(moved - expected)) <= bound + 1e-6 * (1 + np.max(np.abs(g1[key]))), key


def test_the_new_global_is_the_old_plus_the_weighted_mean_update(tmp_path):
    departments = [_Department(tmp_path, f"d{i}", 0.01 * (i + 1), 100 * (i + 1)) for i in range(4)]
    summary, run_dir = _run(tmp_path, departments)
    assert summary.summary.status == "completed"
    _check_step(departments[0], departments, 4)
    read = read_summary(run_dir / "summary.json")  # the secagg facts round-trip through the strict reader
    (setup,) = read.secure_aggregation
    assert setup.participants == ["d0", "d1", "d2", "d3"] and setup.threshold == default_threshold(4) == 3
    assert setup.setup_bytes > 0 and setup.dealt == setup.participants
    first = read.rounds[0].secagg
    assert first.u2 == first.u3 == ["d0", "d1", "d2", "d3"] and not first.consistency
    assert first.dropped_before_masking == first.dropped_after_masking == []
    assert all(first.bytes_sent[n] > 0 and first.bytes_received[n] > 0 for n in first.u2)
    assert "arrays" not in json.dumps(read.to_dict()["rounds"][0]["secagg"])


def test_a_department_dropping_before_masking_is_left_out_by_the_consistency_step(tmp_path):
    before = _Department(tmp_path, "d0", 0.05, 100, silent={"train"})
    rest = [_Department(tmp_path, f"d{i}", 0.01 * i, 100 * i) for i in (1, 2, 3)]
    summary, run_dir = _run(tmp_path, [before, *rest])
    assert summary.summary.status == "completed"
    _check_step(rest[0], rest, 4)
    secagg = read_summary(run_dir / "summary.json").rounds[0].secagg
    assert secagg.consistency and secagg.dropped_before_masking == ["d0"] and secagg.u3 == ["d1", "d2", "d3"]
    assert "d0" in read_summary(run_dir / "summary.json").rounds[0].failed  # and named, as today


def test_a_department_dropping_after_masking_is_recovered(tmp_path):
    after = _Department(tmp_path, "d1", 0.02, 300, silent={records.ACTION_UNMASK})
    rest = [_Department(tmp_path, f"d{i}", 0.01 * i, 100 * i) for i in (2, 3, 4)]
    summary, run_dir = _run(tmp_path, [after, *rest])
    assert summary.summary.status == "completed"
    _check_step(rest[0], [after, *rest], 4)  # d1's masked input is in the sum although it never unmasked
    secagg = read_summary(run_dir / "summary.json").rounds[0].secagg
    assert not secagg.consistency and secagg.dropped_after_masking == ["d1"] and "d1" in secagg.left_out


def test_below_the_threshold_nothing_is_released_and_the_run_ends_with_its_status(tmp_path):
    departments = [_Department(tmp_path, f"d{i}", 0.01, 100, silent={"train"} if i < 2 else ()) for i in range(4)]
    summary, run_dir = _run(tmp_path, departments, rounds=2)
    read = read_summary(run_dir / "summary.json")
    assert read.status == "secure-aggregation-aborted" and "fewer than the threshold 3" in read.stop_reason
    assert read.rounds == [] and read.failed_rounds[0].secagg.u3 == ["d2", "d3"]
    assert 2 not in departments[2].globals  # no second round: the model was never changed


def test_a_substituted_masked_input_is_left_out_and_named(tmp_path):
    def substitute(masked):  # d2 passes its masked input off as d1's
        return dataclasses.replace(masked, name="d1")

    honest = [_Department(tmp_path, "d0", 0.01, 100), _Department(tmp_path, "d1", 0.02, 200),
              _Department(tmp_path, "d3", 0.04, 100)]
    cheat = _Department(tmp_path, "d2", 0.5, 100, doctor=substitute)
    summary, run_dir = _run(tmp_path, [*honest, cheat], registry=True)  # a deployment: registered names and keys
    assert summary.summary.status == "completed"
    read = read_summary(run_dir / "summary.json")
    assert "d2" in read.rounds[0].rejected and "signed as 'd1'" in read.rounds[0].rejected["d2"]
    assert read.rounds[0].secagg.dropped_before_masking == ["d2"] and read.rounds[0].secagg.consistency
    _check_step(honest[0], honest, 4)


def test_a_tampered_signature_is_caught_with_the_registered_keys(tmp_path):
    def tamper(masked):
        return dataclasses.replace(masked, signature=_other_signature(masked))

    honest = [_Department(tmp_path, f"d{i}", 0.01, 100) for i in range(3)]
    cheat = _Department(tmp_path, "d3", 0.5, 100, doctor=tamper)
    summary, run_dir = _run(tmp_path, [*honest, cheat], registry=True, rounds=1)
    rejected = read_summary(run_dir / "summary.json").rounds[0].rejected
    assert "not signed over U2" in rejected["d3"]


def _other_signature(masked) -> str:
    """Its signature with the last characters changed: well-formed, but not over what it signs."""
    tail = "A" * 8 if not masked.signature.endswith("A" * 8) else "B" * 8
    return masked.signature[:-8] + tail


@pytest.mark.parametrize("setting, words", [
    ({"aggregation": "median"}, "needs the individual updates"),
    ({"central-dp": True, "distributed-dp": True}, "distributed DP is at one level per run"),
    ({"max-update-norm": 2.0}, "--secagg-bound"),
])
def test_what_secure_aggregation_cannot_be_combined_with_is_refused_naming_the_setting(setting, words):
    from fedsilo.server.robust import check_aggregation

    settings = RunSettings.from_run_config({"secure-aggregation": True, "min-departments": 3, **setting})
    with pytest.raises(ValueError, match=words):
        check_settings(settings)
    with pytest.raises(ValueError, match=words):  # the commands' pre-flight says it before anything starts
        check_aggregation(settings, settings.min_departments)


def test_client_level_dp_under_secure_aggregation_is_the_departments_distributed_noise():
    """--central-dp with --secure-aggregation: no coordinator noise on a sum it sees, the departments add it."""
    settings = RunSettings.from_run_config({"secure-aggregation": True, "min-departments": 3, "central-dp": True})
    check_settings(settings)  # allowed now
    from fedsilo.shared.distributed_dp import DistributedDpPlan, client_level_mechanism

    layout = {"w": (10, 3), "b": (3,)}
    plan = DistributedDpPlan.client_level(layout, settings, 4, 3)
    assert (plan.sample_rate, plan.max_weight, plan.max_grad_norm) == (1.0, 1, settings.central_clip_norm)
    assert plan.share == pytest.approx(plan.mu / 3) and plan.noise_multiplier == settings.central_noise_multiplier
    # The coordinator's budget checks the same release before any session exists.
    assert client_level_mechanism(layout, settings) == plan.mechanism(1)


def test_the_default_threshold_tolerates_a_tenth_dropping_where_the_departments_add_the_noise():
    """Each adds μ/(t − c): with all n answering the sum carries n/(t − c) × μ, so the noised default is near n."""
    assert [default_threshold(n) for n in (3, 4, 10, 20, 100)] == [3, 3, 6, 11, 51]
    assert [default_threshold(n, noised=True) for n in (3, 4, 10, 20, 100)] == [3, 3, 9, 18, 90]
    assert all(default_threshold(n, True) > n / 2 for n in range(3, 200))  # still a majority


def test_fewer_than_three_departments_are_refused(tmp_path):
    from fedsilo.server.secure_aggregation import check_departments

    with pytest.raises(ValueError, match="at least 3 departments.*--min-departments 3"):
        check_departments(2, "--min-departments")
    check_departments(3)
    departments = [_Department(tmp_path, f"d{i}", 0.01, 100) for i in range(2)]
    summary, _ = _run(tmp_path, departments, min_departments=2)  # only two connect: the session never opens
    assert summary.summary.status == "secure-aggregation-aborted" and "at least 3" in summary.summary.stop_reason


def test_a_model_with_integer_arrays_is_refused():
    with pytest.raises(ValueError, match="non-float arrays"):
        check_model(ArrayRecord({"w": Array(np.zeros(3, np.float32)), "count": Array(np.zeros(1, np.int64))}))
    check_model(ArrayRecord({"w": Array(np.zeros(3, np.float32))}))


def test_a_checkpoint_written_before_the_secure_aggregation_settings_still_resumes(tmp_path):
    from fedsilo.server.checkpoint import Checkpoint
    from fedsilo.shared.settings import defaults

    now = RunSettings.from_run_config({}).to_run_config()
    before = {k: v for k, v in now.items() if not k.startswith(("secagg-", "secure-"))}
    checkpoint = Checkpoint("run", 1, before, {}, {"w": np.zeros(1, np.float32)}, [], None)
    checkpoint.check_settings(now)  # absent: the defaults, so the same run
    with pytest.raises(ValueError, match="secure-aggregation"):
        checkpoint.check_settings({**now, "secure-aggregation": not defaults()["secure-aggregation"]})


def test_an_aborted_run_resumes_in_a_new_session(tmp_path):
    departments = [_Department(tmp_path, f"d{i}", 0.01, 100, silent={"train"} if i < 2 else ()) for i in range(4)]
    summary, run_dir = _run(tmp_path, departments, rounds=2)
    assert summary.summary.status == "secure-aggregation-aborted"
    for d in departments:
        d.silent = set()
    summary, run_dir = _run(tmp_path, departments, rounds=2, resume=True)
    read = read_summary(run_dir / "summary.json")
    assert read.status == "completed" and [r.round for r in read.rounds] == [1, 2]
    assert len(read.secure_aggregation) == 2  # one session per ServerApp run


def test_the_report_says_it_and_the_strict_reader_names_a_bad_secagg_field(tmp_path):
    from rich.console import Console

    from fedsilo.server.report import print_run_report
    from fedsilo.shared.summary_format import Summary, SummaryFormatError

    departments = [_Department(tmp_path, f"d{i}", 0.01, 100) for i in range(3)]
    _, run_dir = _run(tmp_path, departments, rounds=1)
    console = Console(record=True, width=400)
    print_run_report(run_dir, console)
    assert "Secure aggregation: t=3 of 3 departments" in console.export_text()
    raw = json.loads((run_dir / "summary.json").read_text())
    raw["rounds"][0]["secagg"]["u2"] = "d0"
    with pytest.raises(SummaryFormatError, match=r"rounds\[0\]\.secagg\.u2"):
        Summary.from_dict(raw)
    for record in raw["rounds"]:  # a v1 summary written before secure aggregation still reads
        del record["secagg"]
    del raw["secure_aggregation"]
    assert Summary.from_dict(raw).secure_aggregation == []
