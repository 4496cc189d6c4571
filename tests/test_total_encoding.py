"""A run's schema cannot make a department's table fail: rows that do not encode are left out, one by one.

Whether some record fails to encode with a schema the coordinator chose (a label
outside its classes, text in a numeric column, a scale that overflows) is a fact
about the records; the department must answer the same way whatever it is.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsilo.client.app import app
from fedsilo.client.limits import RunLimits
from fedsilo.client.policy import DepartmentPolicy, size_bucket
from fedsilo.shared.config import RUN_CONFIG_DEFAULTS
from fedsilo.shared.data import load_records, load_table
from fedsilo.shared.ledger import PrivacyLedger, find_identity_ledger
from fedsilo.shared.models import build_model
from fedsilo.shared.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, STATUS_KEY
from fedsilo.shared.schema import Column, DataSchema, Label, SchemaError
from fedsilo.shared.signing import Signer, generate_identity

ROWS = 40


def _frame(rows: int = ROWS) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame({
        "a": rng.normal(size=rows), "b": rng.normal(size=rows),
        "kind": rng.choice(["x", "y"], size=rows), "label": rng.choice(["yes", "no"], size=rows),
    })


def _schema(**overrides) -> DataSchema:
    columns = {
        "a": Column("a", "numeric", mean=0.0, scale=1.0),
        "b": Column("b", "numeric", mean=0.0, scale=1.0, impute="error"),
        "kind": Column("kind", "categorical", categories=("x", "y")),
    }
    columns.update(overrides.pop("columns", {}))
    label = overrides.pop("label", Label("label", "binary", ("no", "yes")))
    return DataSchema(label, tuple(columns.values()))


# Each odd record fails one way; the rest of its row is ordinary.
ODD = {
    "text in a numeric column": ({"a": "twelve"}, {}),
    "a missing value where impute is error": ({"b": None}, {}),
    "a label outside the classes": ({"label": "maybe"}, {}),
    "a value the schema's scale overflows": ({"a": 1e30}, {"columns": {"a": Column("a", "numeric", mean=0.0, scale=1e-20)}}),
}


def _with(frame: pd.DataFrame, cells: dict) -> pd.DataFrame:
    odd = frame.iloc[[0]].copy().astype(object)
    for column, value in cells.items():
        odd[column] = value
    return pd.concat([frame.astype(object), odd], ignore_index=True)


@pytest.mark.parametrize("case", sorted(ODD))
def test_a_record_that_does_not_encode_is_left_out_and_nothing_else_changes(tmp_path, case):
    cells, schema_overrides = ODD[case]
    schema = _schema(**schema_overrides)
    plain, odd = tmp_path / "plain.csv", tmp_path / "odd.csv"
    _frame().to_csv(plain, index=False)
    _with(_frame(), cells).to_csv(odd, index=False)
    without, left_without = load_records(plain, schema)
    with_it, left_with = load_records(odd, schema)
    # 1-stable: the encoded records are the same; only the table's row count moved by one.
    assert np.array_equal(without.x, with_it.x) and np.array_equal(without.y, with_it.y)
    assert (left_without, left_with) == (0, 1)
    assert (without.num_records, with_it.num_records) == (ROWS, ROWS + 1)
    assert len(with_it) == ROWS
    # The strict reader (the host's own `schema check`) still names the row.
    with pytest.raises(SchemaError, match=str(ROWS + 2)):
        load_table(odd, "label", schema=schema)


def test_a_table_without_the_schemas_columns_is_still_an_error_naming_them(tmp_path):
    table = tmp_path / "t.csv"
    _frame().drop(columns=["b"]).to_csv(table, index=False)
    with pytest.raises(SchemaError, match="column\\(s\\) b"):
        load_records(table, _schema())


def test_a_schema_no_record_fits_gives_an_empty_table_of_the_same_count(tmp_path):
    table = tmp_path / "t.csv"
    _frame().to_csv(table, index=False)
    data, left_out = load_records(table, _schema(label=Label("label", "binary", ("maybe", "perhaps"))))
    assert len(data) == 0 and left_out == ROWS and data.num_records == ROWS
    assert data.x.shape == (0, _schema().num_features)


# ----------------------------------------------------------------------------- through the ClientApp


@pytest.fixture
def host(tmp_path):
    key = tmp_path / "keys" / "finance"
    generate_identity(key, key.with_suffix(".pub"), "finance")
    return {"root": tmp_path, "key": key}


def _ask(host, table, schema: DataSchema, ledgers):
    run_config = {**RUN_CONFIG_DEFAULTS, "data-schema": schema.to_json(), "out": str(host["root"] / "run"),
                  "noise-multiplier": 1.0, "model": "mlp", "batch-size": 8}
    model = build_model("mlp", (schema.num_features,), 2, "tabular", seed=1)
    request = Message(RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), CONFIG_KEY: ConfigRecord({"server-round": 1})}),
                      dst_node_id=7, message_type="train")
    policy = DepartmentPolicy(max_epsilon=8.0, delta=1e-3)
    node_config = {"department": "finance", "data-path": str(table), "label-column": "label",
                   "ledger-dir": str(ledgers), "identity-key": str(host["key"]), "policy": policy.to_json()}
    return app(message=request, context=Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                                                run_config=run_config))


@pytest.mark.parametrize("case", ["a label outside the classes", "a value the schema's scale overflows"])
def test_the_department_answers_alike_whether_or_not_a_record_fails_the_runs_schema(host, case, caplog, serverapp_identity):
    """The attack: a schema built so that exactly the target record fails; the replies must not tell."""
    cells, schema_overrides = ODD[case]
    schema = _schema(**schema_overrides)
    replies = {}
    for name, frame in (("without", _frame(ROWS + 1)), ("with", _with(_frame(ROWS), cells))):
        table = host["root"] / f"{name}.csv"
        frame.to_csv(table, index=False)
        with caplog.at_level("WARNING", logger="fedsilo.department"):
            replies[name] = _ask(host, table, schema, host["root"] / f"ledgers-{name}")
    for name, reply in replies.items():
        assert not reply.has_error(), name
        assert reply.content[STATUS_KEY]["status"] == "trained", (name, reply.content[STATUS_KEY]["reason"])
    shown = {name: {k: v for k, v in reply.content[METRICS_KEY].items()} for name, reply in replies.items()}
    assert shown["with"] == shown["without"]  # same size, same plan, same ε: from the table's row count
    # The department's own ledger and log know; the reply does not.
    assert any("1 of 41 rows" in r.getMessage() for r in caplog.records)
    identity = Signer.from_file(host["key"]).fingerprint
    for name in replies:
        ledger = PrivacyLedger(find_identity_ledger(host["root"] / f"ledgers-{name}", identity, "finance"), "finance",
                               Signer.from_file(host["key"]))
        assert ledger.entries[-1].num_examples == ROWS + 1


def test_a_table_too_big_for_the_hosts_feature_limit_is_refused_at_start_not_by_a_run():
    limits = RunLimits(max_features=1024, max_encoded_values=1 << 20)
    assert limits.check_table(1024) == []
    [reason] = limits.check_table(1025)
    assert "max-features=1023" in reason and "max-encoded-values" in reason
    assert replace(limits, max_encoded_values=1 << 21).check_table(2048) == []


def test_a_schema_no_record_fits_still_trains_noise_alone_and_is_charged(host, serverapp_identity):
    table = host["root"] / "t.csv"
    _frame().to_csv(table, index=False)
    schema = _schema(label=Label("label", "binary", ("maybe", "perhaps")))
    reply = _ask(host, table, schema, host["root"] / "ledgers")
    assert reply.content[STATUS_KEY]["status"] == "trained", reply.content[STATUS_KEY]["reason"]
    assert all(np.isfinite(a.numpy()).all() for a in reply.content[ARRAYS_KEY].values())
    assert int(reply.content[METRICS_KEY]["num-examples"]) == size_bucket(ROWS)  # the table's, as ever


def test_noise_alone_has_the_mechanisms_spread():
    import torch

    from fedsilo.client.trainer import train_dp
    from fedsilo.shared.accounting import Mechanism
    from fedsilo.shared.data import Dataset
    from fedsilo.shared.models import MLP

    empty = Dataset("t", np.zeros((0, 4), np.float32), np.zeros(0, np.int64), (4,), (0, 1), "tabular", "binary")
    model = MLP(4, 2, hidden=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sigma, clip, lr, size, q = 2.0, 1.5, 0.1, 80, 0.25
    result = train_dp(model, empty, Mechanism(sigma, q, 1), max_grad_norm=clip, learning_rate=lr, momentum=0.0,
                      grad_sample_mode="hooks", planned_size=size)
    assert result.steps == 1
    delta = torch.cat([(model.state_dict()[k] - before[k]).flatten() for k in before])
    expected = lr * sigma * clip / (size * q)
    assert abs(float(delta.std()) / expected - 1) < 0.05
