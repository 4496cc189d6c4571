"""The public data schema: inference, encodings, hand edits, and clear errors — and model factories."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from fedsilo.shared.data import simulated_federation
from fedsilo.shared.flower_cli import offline_env
from fedsilo.shared.metrics import metrics_from_outputs
from fedsilo.shared.model_factory import ModelError, describe_grad_sample_mode, model_changes
from fedsilo.shared.models import MLP, build_model
from fedsilo.shared.schema import Column, DataError, DataSchema, Label, SchemaError, infer_schema


@pytest.fixture
def mixed():
    return pd.DataFrame({
        "id": [f"C{i}" for i in range(8)],
        "region": ["north", "south", None, "north", "east", "south", "north", "east"],
        "spend": [10.0, np.nan, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0],
        "note": ["billing error again please", "great service thanks a lot", "cancel my subscription now",
                 "slow service and an outage", "refund requested twice today", "quick answer from support",
                 "friendly technician came by", "no issues this month at all"],
        "churned": ["yes", "no", "yes", "yes", "no", "no", "no", "no"],
        "value": [1.5, 2.25, 3.125, 4.0, 5.5, 6.75, 7.0, 8.5],
    })


def test_inference_names_each_kind_and_refuses_to_guess_a_numeric_target(mixed):
    schema = infer_schema(mixed, "churned", max_categories=5)
    kinds = {c.name: c.kind for c in schema.columns}
    assert kinds == {"id": "ignore", "region": "categorical", "spend": "numeric", "note": "text", "value": "numeric"}
    assert schema.label.task == "binary" and schema.label.classes == ("no", "yes")
    spend = next(c for c in schema.columns if c.name == "spend")
    assert spend.indicator and spend.fill == pytest.approx(np.nanmedian(mixed["spend"]))
    with pytest.raises(SchemaError, match="holds 8 distinct non-integer numbers; fedsilo will not guess the task.*--task regression"):
        infer_schema(mixed, "value")
    regression = infer_schema(mixed, "value", task="regression")
    assert regression.label.task == "regression" and regression.label.num_outputs == 1
    assert regression.label.mean == pytest.approx(mixed["value"].mean())
    # Integer labels with few values are classes, without being told.
    assert infer_schema(mixed.assign(grade=[1, 2, 3, 1, 2, 3, 1, 2]), "grade").label.task == "multiclass"


def test_encoding_uses_only_the_schema_and_maps_unseen_and_missing_to_other(mixed):
    schema = infer_schema(mixed, "churned", max_categories=5)
    x = schema.encode(mixed)
    assert x.shape == (8, schema.num_features) and x.dtype == np.float32 and np.isfinite(x).all()
    names = schema.feature_names
    other = names.index("region=<other>")
    assert x[2, other] == 1.0  # missing region
    unseen = schema.encode(mixed.assign(region=["west"] * 8))
    assert (unseen[:, other] == 1.0).all()
    # The imputed spend is the schema's fill, scaled like any value; the indicator says it was missing.
    spend = next(c for c in schema.columns if c.name == "spend")
    assert x[1, names.index("spend")] == pytest.approx((spend.fill - spend.mean) / spend.scale)
    assert x[1, names.index("spend missing")] == 1.0 and x[0, names.index("spend missing")] == 0.0
    # Text is hashed per row, statelessly: the same note encodes the same in any table.
    text = [i for i, n in enumerate(names) if n.startswith("note#")]
    alone = schema.encode(mixed.iloc[[3]])
    assert np.allclose(alone[0, text], x[3, text]) and np.linalg.norm(x[3, text]) == pytest.approx(1.0, abs=1e-6)


def test_the_schema_file_round_trips_and_hand_edits_are_checked(mixed, tmp_path):
    schema = infer_schema(mixed, "churned", max_categories=5)
    path = tmp_path / "schema.json"
    path.write_text(schema.to_json(indent=2))
    assert DataSchema.load(path) == schema
    raw = json.loads(path.read_text())
    raw["columns"][1]["encoding"] = "embedding"
    edited = DataSchema.from_dict(raw)
    assert edited.embeddings and edited.num_features == schema.num_features - 3
    raw["columns"][2]["impute"] = "guess"
    with pytest.raises(SchemaError, match="schema column 'spend': impute 'guess' is not one of"):
        DataSchema.from_dict(raw)
    raw["columns"][2]["impute"] = "median"
    raw["columns"][2]["colour"] = "red"
    with pytest.raises(SchemaError, match="unknown field.*colour"):
        DataSchema.from_dict(raw)
    with pytest.raises(SchemaError, match="not a fedsilo schema"):
        DataSchema.from_json('{"label": {}}')
    with pytest.raises(SchemaError, match="lacks the schema's column.*spend"):
        schema.encode(mixed.drop(columns=["spend"]), "dept.csv")
    with pytest.raises(SchemaError, match="label 'maybe' .* row 4 is not one of the federation's classes"):
        schema.encode_labels(mixed.assign(churned=["yes", "no", "maybe", "yes", "no", "no", "no", "no"]))


def test_an_embedding_column_is_embedded_by_the_builtin_mlp_and_trains_with_book_keeping():
    schema = DataSchema(Label("y", "binary", ("a", "b")), (
        Column("n", "numeric"), Column("c", "categorical", categories=("x", "y", "z"), encoding="embedding")))
    model = build_model("mlp", (schema.num_features,), 2, task="binary", embeddings=schema.embeddings)
    assert isinstance(model, MLP) and len(model.embed) == 1 and model.embed[0].num_embeddings == 4
    assert describe_grad_sample_mode("auto", model).startswith("book-keeping")
    out = model(torch.tensor([[0.5, 2.0], [0.1, 3.0]]))
    assert out.shape == (2, 2)


def test_a_factory_is_checked_before_any_round():
    with pytest.raises(ModelError, match=r"layer '2' \(BatchNorm1d\).*--fix-model"):
        build_model("acme_models.tabular:batchnorm_mlp", (5,), 2, task="binary")
    assert model_changes("acme_models.tabular:batchnorm_mlp", (5,), 2, "binary") == ["2: BatchNorm1d → GroupNorm"]
    fixed = build_model("acme_models.tabular:batchnorm_mlp", (5,), 2, task="binary", fix=True)
    # GroupNorm has a book-keeping rule (fedsilo.shared.book_keeping): the fixed model trains under it.
    assert describe_grad_sample_mode("auto", fixed) == (
        "book-keeping (one backward a step; every trainable layer is covered: GroupNorm, Linear)")
    assert build_model("acme_models.tabular:residual_mlp", (5,), 1, task="regression")(torch.zeros(3, 5)).shape == (3, 1)
    with pytest.raises(ModelError, match="'nosuch.models:f' is not installed here.*No module named 'nosuch'"):
        build_model("nosuch.models:f", (5,), 2)
    with pytest.raises(ModelError, match=r"maps a batch of 2 to \(2, 4\); fedsilo needs \(2, 3\)"):
        build_model("test_schema:wrong_width", (5,), 3)
    with pytest.raises(ModelError, match="'torch.nn:Linear' could not be called as factory"):
        build_model("torch.nn:Linear", (5,), 3)


def wrong_width(input_shape, num_outputs, task):
    """A factory that breaks the contract: one output too many."""
    return torch.nn.Linear(input_shape[0], num_outputs + 1)


def test_regression_metrics_are_in_the_targets_units(mixed):
    schema = infer_schema(mixed, "value", task="regression")
    y = schema.encode_labels(mixed)
    perfect = metrics_from_outputs(y.reshape(-1, 1), y, "regression", schema)
    assert perfect["r2"] == pytest.approx(1.0) and perfect["mae"] == pytest.approx(0.0, abs=1e-5)
    off = metrics_from_outputs((y + 1.0 / schema.label.scale).reshape(-1, 1), y, "regression", schema)
    assert off["mae"] == pytest.approx(1.0, rel=1e-4)  # one unit of the target, not one standard deviation


def test_partitions_by_column_and_by_folder(tmp_path):
    frame = pd.read_csv("examples/customers.csv")
    by_region = simulated_federation("examples/customers.csv", "churned", (), 0, "by:region", 42)
    assert by_region.names == ["east", "north", "south", "west"]
    assert sum(len(p) for p in by_region.parts) + len(by_region.test) == len(frame)
    folder = tmp_path / "units"
    folder.mkdir()
    for name, part in (("finance", frame.iloc[:1500]), ("hr", frame.iloc[1500:2500]), ("sales", frame.iloc[2500:])):
        part.to_csv(folder / f"{name}.csv", index=False)
    units = simulated_federation(str(folder), "annual_value", (), 0, "iid", 42, task="regression")
    assert units.names == ["finance", "hr", "sales"] and units.test.task == "regression"
    assert [len(p) for p in units.parts] == [1200, 800, 1200]  # 20 % of each table held out
    with pytest.raises(DataError, match="--departments 3, but column 'region' .* has 4 values"):
        simulated_federation("examples/customers.csv", "churned", (), 3, "by:region", 42)


def test_schema_infer_cli_writes_an_editable_file_and_never_overwrites(tmp_path):
    out = tmp_path / "schema.json"
    run = lambda *a: subprocess.run([sys.executable, "-m", "fedsilo", *a], capture_output=True, text=True, env=offline_env(), timeout=120)
    first = run("schema", "infer", "examples/customers.csv", "--label-column", "churned", "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "last_note: text" in first.stdout and "customer_id: ignored" in first.stdout
    before = out.read_text()
    again = run("schema", "infer", "examples/customers.csv", "--label-column", "annual_value", "--task", "regression", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr and out.read_text() == before
    check = run("schema", "check", str(out), "--data", "examples/customers.csv")
    assert check.returncode == 0 and "4000 rows" in check.stdout


def test_flwr_runs_simulated_departments_allow_the_runs_own_factory_but_a_deployed_one_does_not():
    from fedsilo.client.department import simulated_policy
    from fedsilo.client.policy import DepartmentPolicy, RunRequest

    factory = "acme_models.tabular:residual_mlp"
    assert simulated_policy("", factory).models == (factory,)  # `flwr run .` with no simulated-policy
    assert simulated_policy("", "auto").models == ()
    terms, looser = DepartmentPolicy(max_epsilon=8.0).terms_for(RunRequest(dp=True, model=factory))
    assert terms is None and f"--allow-model {factory}" in looser[0]
    terms, looser = DepartmentPolicy(max_epsilon=8.0, models=(factory,)).terms_for(RunRequest(dp=True, model=factory))
    assert terms is not None and not looser


def test_a_department_checks_its_table_against_the_published_schema_before_joining(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "fedsilo", *a], capture_output=True, text=True, env=offline_env(), timeout=120)
    certs = tmp_path / "certs"
    assert run("certs", "init", "--out", str(certs)).returncode == 0
    assert run("certs", "add-department", "finance", "--dir", str(certs)).returncode == 0
    schema = tmp_path / "schema.json"
    assert run("schema", "infer", "examples/customers.csv", "--label-column", "churned", "--out", str(schema)).returncode == 0
    mine = tmp_path / "finance.csv"
    pd.read_csv("examples/customers.csv").iloc[:500].assign(support_calls="many").to_csv(mine, index=False)
    start = run("department", "start", "--coordinator", "127.0.0.1:9", "--ca", str(certs / "ca.crt"),
                "--key", str(certs / "departments" / "finance"), "--data", str(mine), "--label-column", "churned",
                "--ledger", str(tmp_path / "ledger"), "--max-epsilon", "8", "--schema", str(schema))
    assert start.returncode == 2
    assert "column 'support_calls'" in start.stderr and "holds text at row 2" in start.stderr
    assert not (tmp_path / "ledger").exists()  # refused before anything was written or sent
