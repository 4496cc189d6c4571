"""A malicious coordinator against the real department ClientApp: every release is DP, or a data-independent refusal."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsilo.client.admission import AdmissionError, reference_layout, schema_limits, verified_state_dict
from fedsilo.client.app import app
from fedsilo.client.limits import RunLimits
from fedsilo.client.policy import DepartmentPolicy, PolicyError
from fedsilo.client.trainer import train_dp
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.config import RUN_CONFIG_DEFAULTS
from fedsilo.shared.data import Dataset, federation_data_test
from fedsilo.shared.ledger import PrivacyLedger
from fedsilo.shared.models import MLP, build_model
from fedsilo.shared.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, STATUS_KEY
from fedsilo.shared.schema import Column, DataSchema, Label


def _ask(tmp_path, *, state=None, policy: DepartmentPolicy | None = None, round_=1, run_key="", **settings):
    """One train request from the coordinator to simulated department 0 of 2 (digits)."""
    run_config = {**RUN_CONFIG_DEFAULTS, "out": str(tmp_path / "run"), **settings}
    if policy is not None:
        run_config["simulated-policy"] = policy.to_json()
    if state is None:
        test = federation_data_test("digits", "label", ())
        state = build_model("auto", test.input_shape, test.num_classes, test.kind, seed=42).state_dict()
    config = {"server-round": round_, **({"run-key": run_key} if run_key else {})}
    request = Message(RecordDict({ARRAYS_KEY: ArrayRecord(state), CONFIG_KEY: ConfigRecord(config)}),
                      dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=run_config)
    return state, app(message=request, context=context)


def _ledger_entries(tmp_path) -> int:
    folder = tmp_path / "run" / "ledgers"
    return sum(len(f.read_text().splitlines()) for f in folder.glob("*.jsonl")) if folder.exists() else 0


def _assert_safe(reply) -> str:
    """The two releases allowed: a finite DP update, or a refusal without weights."""
    assert not reply.has_error()
    status = reply.content[STATUS_KEY]["status"]
    if status == "trained":
        for array in reply.content[ARRAYS_KEY].values():
            assert np.isfinite(array.numpy()).all()
    else:
        assert ARRAYS_KEY not in reply.content
    return status


# ----------------------------------------------------------------------------- the exact count


def test_the_update_spread_gives_the_reported_size_not_the_exact_count(tmp_path, serverapp_identity):
    """q = 1 and σ = 1000 (the issue's attack): the noise on the update is lr·σ·C / reported size."""
    lr, sigma = 0.01, 1000.0
    before, reply = _ask(tmp_path, **{"batch-size": 100000, "noise-multiplier": sigma, "learning-rate": lr,
                                      "momentum": 0.0, "num-server-rounds": 1})
    assert _assert_safe(reply) == "trained"
    reported = int(reply.content[METRICS_KEY]["num-examples"])
    after = reply.content[ARRAYS_KEY].to_torch_state_dict()
    delta = torch.cat([(after[k] - before[k]).flatten() for k in before])
    estimate = lr * sigma * 1.0 / float(delta.std())
    exact = _ledger_num_examples(tmp_path)
    assert exact != reported and abs(exact - reported) / reported > 0.2  # the attack could tell them apart
    assert abs(estimate - reported) / reported < 0.05, (estimate, reported, exact)


def _ledger_num_examples(tmp_path) -> int:
    [path] = (tmp_path / "run" / "ledgers").glob("*.jsonl")
    return int(json.loads(path.read_text().splitlines()[-1])["num_examples"])


# ----------------------------------------------------------------------------- crafted models


def _overflow_table(with_target: bool) -> Dataset:
    """Records with feature 0 in [-1, 1]; the target record has 50 there."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(40, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=40)
    if with_target:
        x = np.vstack([x, [[50.0, 0, 0, 0]]]).astype(np.float32)
        y = np.append(y, 1)
    return Dataset("t", x, y, (4,), (0, 1), "tabular", "binary")


def _crafted_model() -> MLP:
    """Hidden unit 0 overflows float32 only for a record whose feature 0 passes 10."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MLP(4, 2, hidden=8)
    with torch.no_grad():
        model.net[1].weight[0].zero_()
        model.net[1].weight[0, 0] = 1e37
        model.net[1].bias[0] = -1e38
    return model


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_a_record_that_overflows_a_crafted_model_changes_nothing(mode):
    """With σ → 0 and q = 1 the release is the clipped sum: the overflowing record contributes zero."""
    mechanism = Mechanism(1e-9, 1.0, 2)
    out = []
    for with_target in (True, False):
        model = _crafted_model()
        train_dp(model, _overflow_table(with_target), mechanism, max_grad_norm=1.0, learning_rate=0.1,
                 momentum=0.0, grad_sample_mode=mode, planned_size=40)
        state = model.state_dict()
        assert all(torch.isfinite(v).all() for v in state.values())
        out.append(state)
    assert not torch.equal(out[0]["net.1.weight"], _crafted_model().net[1].weight.detach())  # it trained
    for key in out[0]:
        assert torch.allclose(out[0][key], out[1][key], atol=1e-6), key


def test_a_crafted_model_past_the_magnitude_bound_is_declined_before_any_record(tmp_path, serverapp_identity):
    test = federation_data_test("digits", "label", ())
    state = build_model("auto", test.input_shape, test.num_classes, test.kind, seed=42).state_dict()
    state["net.1.weight"][0, 0] = 1e37
    _, reply = _ask(tmp_path, state=state)
    assert _assert_safe(reply) == "declined"
    assert "magnitude" in reply.content[STATUS_KEY]["reason"]
    assert _ledger_entries(tmp_path) == 0


@pytest.mark.parametrize("doctor", ["nan", "float64", "shape", "extra", "missing"])
def test_a_global_model_unlike_the_departments_own_is_declined(doctor):
    model = MLP(4, 2, hidden=8)
    layout = reference_layout(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "net.1.weight"
    if doctor == "nan":
        state[key][0, 0] = float("nan")
    elif doctor == "float64":
        state[key] = state[key].double()
    elif doctor == "shape":
        state[key] = torch.zeros(9, 4)
    elif doctor == "extra":
        state["backdoor"] = torch.zeros(1)
    else:
        del state[key]
    with pytest.raises(AdmissionError):
        verified_state_dict(ArrayRecord(state), layout, 1e4)
    assert verified_state_dict(ArrayRecord(model.state_dict()), layout, 1e4).keys() == layout.keys()


# ----------------------------------------------------------------------------- exhaustion


@pytest.mark.parametrize("ask, limit", [
    ({"local-epochs": 100000, "batch-size": 1}, "steps"),
    ({"num-server-rounds": 1_000_000}, "num-server-rounds"),
])
def test_work_past_the_hosts_limits_is_declined_naming_the_limit(tmp_path, serverapp_identity, ask, limit):
    _, reply = _ask(tmp_path, **ask)
    assert _assert_safe(reply) == "declined"
    assert reply.content[STATUS_KEY]["reason"].startswith(limit)
    assert _ledger_entries(tmp_path) == 0


@pytest.mark.parametrize("key", ["r" * 5_000_000, "run\n{\"seq\": 0}", "../../etc/passwd"])
def test_a_run_key_too_long_or_odd_is_declined(tmp_path, serverapp_identity, key):
    _, reply = _ask(tmp_path, run_key=key)
    assert _assert_safe(reply) == "declined"
    assert "run-key" in reply.content[STATUS_KEY]["reason"]
    assert len(reply.content[STATUS_KEY]["reason"]) < 200


def test_a_schema_past_the_width_limits_is_declined_before_the_table_is_read():
    limits = RunLimits()
    text = tuple(Column(f"c{i}", "text", features=1 << 17) for i in range(4))  # within the schema's own bound, past the host's
    wide = DataSchema(Label("y", "multiclass", tuple(str(i) for i in range(2000))), text)
    reasons = schema_limits(wide, limits)
    assert any("features" in r for r in reasons) and any("classes" in r for r in reasons)
    cats = DataSchema(Label("y", "binary", ("a", "b")), (Column("c", "categorical", categories=tuple(map(str, range(20000)))),))
    assert any("categories" in r for r in schema_limits(cats, limits))
    fits = DataSchema(Label("y", "binary", ("a", "b")), (Column("n", "numeric"),))
    assert schema_limits(fits, limits) == []


def test_the_limits_travel_in_the_policy_and_reject_nonsense():
    policy = DepartmentPolicy(max_epsilon=3.0, limits=RunLimits(max_steps_per_round=50))
    assert DepartmentPolicy.from_json(policy.to_json()).limits.max_steps_per_round == 50
    for bad in ({"max_steps_per_round": 0}, {"max_round_seconds": float("inf")}, {"nope": 1}, {"max_weight_magnitude": 1e38}):
        with pytest.raises(PolicyError):
            DepartmentPolicy.from_json(json.dumps({"max_epsilon": 3.0, "limits": bad}))


def test_a_round_past_its_wall_time_is_charged_and_sends_nothing(tmp_path, serverapp_identity):
    policy = DepartmentPolicy(max_epsilon=10.0, limits=RunLimits(max_round_seconds=1e-9))
    _, reply = _ask(tmp_path, policy=policy, **{"noise-multiplier": 1.0})
    assert _assert_safe(reply) == "declined"
    assert reply.content[STATUS_KEY]["reason"].startswith("training:")
    assert _ledger_entries(tmp_path) == 1  # charged as if released


@pytest.mark.parametrize("lr", [1e38, 3e38])
def test_a_diverging_learning_rate_gives_a_finite_update_or_a_charged_refusal(tmp_path, serverapp_identity, lr):
    _, reply = _ask(tmp_path, **{"learning-rate": lr, "momentum": 0.9, "noise-multiplier": 1.0})
    assert _assert_safe(reply) in ("trained", "declined")
    assert _ledger_entries(tmp_path) == 1  # charged either way


# ----------------------------------------------------------------------------- any message


def test_any_message_gives_a_finite_dp_update_or_a_refusal(tmp_path_factory, serverapp_identity):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    test = federation_data_test("digits", "label", ())
    base = build_model("auto", test.input_shape, test.num_classes, test.kind, seed=42).state_dict()

    @hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
    @hypothesis.given(
        scale=st.sampled_from([1.0, 1e3, 1e4, 1e5, 1e37]),
        poison=st.sampled_from(["none", "nan", "inf"]),
        lr=st.sampled_from([1e-3, 0.5, 1e10, 1e38]),
        batch=st.sampled_from([1, 64, 100000]),
        sigma=st.sampled_from([0.0, 0.5, 1000.0]),
        clip=st.sampled_from([1e-6, 1.0, 1e6]),
    )
    def check(scale, poison, lr, batch, sigma, clip):
        state = {k: v * scale for k, v in base.items()}
        if poison != "none":
            state["net.3.bias"][0] = float(poison)
        tmp = tmp_path_factory.mktemp("any")
        _, reply = _ask(tmp, state=state, **{"learning-rate": lr, "batch-size": batch, "noise-multiplier": sigma,
                                             "max-grad-norm": clip, "num-server-rounds": 1, "local-epochs": 1})
        status = _assert_safe(reply)
        if scale > 1e4 or poison != "none":
            assert status == "declined" and _ledger_entries(tmp) == 0  # decided before any record
        if status == "trained":
            assert math.isfinite(reply.content[METRICS_KEY]["epsilon"])

    check()


def test_department_start_refuses_a_malformed_limit(tmp_path):
    from typer.testing import CliRunner

    from fedsilo.cli import app as cli

    args = ["department", "start", "--coordinator", "127.0.0.1:1", "--ca", str(tmp_path / "ca.crt"),
            "--key", str(tmp_path / "k.key"), "--data", str(tmp_path / "d.csv"), "--ledger", str(tmp_path / "l"),
            "--max-epsilon", "3"]
    for bad in ("max-steps-per-round=0", "max-stepz=5", "max-round-seconds=soon"):
        result = CliRunner().invoke(cli, [*args, "--limit", bad])
        assert result.exit_code == 2, result.output
        assert "max-" in result.output and "Traceback" not in result.output
