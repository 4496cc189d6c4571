"""The department's guard is built once per process, for its host, and still sees every change to its ledger."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from sklearn.datasets import load_digits

import fedsilo.shared.ledger as ledger_module
from fedsilo.client.app import department_app, train
from fedsilo.client.department import DepartmentHost
from fedsilo.client.policy import DepartmentPolicy
from fedsilo.shared.config import RUN_CONFIG_DEFAULTS
from fedsilo.shared.data import load_table, table_schema
from fedsilo.shared.ledger import find_identity_ledger
from fedsilo.shared.models import build_model
from fedsilo.shared.protocol import ARRAYS_KEY, CONFIG_KEY, STATUS_KEY
from fedsilo.shared.signing import Signer, generate_identity


@pytest.fixture
def host(tmp_path):
    bunch = load_digits()
    frame = pd.DataFrame(bunch.data, columns=[f"px{i}" for i in range(64)])
    frame["label"] = bunch.target
    table, test = tmp_path / "finance.csv", tmp_path / "test.csv"
    frame.iloc[:200].to_csv(table, index=False)
    frame.iloc[200:400].to_csv(test, index=False)
    key = tmp_path / "keys" / "finance"
    generate_identity(key, key.with_suffix(".pub"), "finance")
    config = {"department": "finance", "data-path": str(table), "label-column": "label",
              "ledger-dir": str(tmp_path / "ledgers"), "identity-key": str(key),
              "policy": DepartmentPolicy(max_epsilon=8.0, delta=1e-3).to_json()}
    return {"config": config, "schema": table_schema(test, "label").to_json(), "root": tmp_path, "key": key}


def _request(host, rnd: int):
    run_config = {**RUN_CONFIG_DEFAULTS, "data-schema": host["schema"], "out": str(host["root"] / "run"),
                  "noise-multiplier": 1.0, "model": "mlp", "batch-size": 50}
    data = load_table(host["config"]["data-path"], "label")
    model = build_model("mlp", data.input_shape, 10, "tabular", seed=1)
    message = Message(RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()),
                                  CONFIG_KEY: ConfigRecord({"server-round": rnd})}),
                      dst_node_id=7, message_type="train")
    # The SuperNode's node config: nothing of the department's own (the host gave that at construction).
    return message, Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=run_config)


def _ledger_path(host):
    return find_identity_ledger(host["root"] / "ledgers", Signer.from_file(host["key"]).fingerprint, "finance")


def test_the_guard_reads_its_ledger_once_and_never_writes_into_the_request(host, serverapp_identity, monkeypatch):
    verified = []
    real = ledger_module.verify_ledger
    monkeypatch.setattr(ledger_module, "verify_ledger", lambda *a, **k: verified.append(a[0]) or real(*a, **k))
    app = department_app(DepartmentHost.from_config(host["config"]))
    for rnd in (1, 2, 3):
        message, context = _request(host, rnd)
        before = set(message.content.keys())
        reply = app(message=message, context=context)
        assert reply.content[STATUS_KEY]["status"] == "trained", reply.content[STATUS_KEY]["reason"]
        assert set(message.content.keys()) == before  # the plan is not handed over inside the request
    assert len(verified) == 1  # opened once; its own appends need no second verification
    assert len(ledger_module.PrivacyLedger(_ledger_path(host), "finance").entries) == 3


def test_a_ledger_changed_on_disk_between_rounds_is_read_again_and_refused(host, serverapp_identity):
    app = department_app(DepartmentHost.from_config(host["config"]))
    message, context = _request(host, 1)
    assert app(message=message, context=context).content[STATUS_KEY]["status"] == "trained"
    path = _ledger_path(host)
    entry = json.loads(path.read_text().splitlines()[0])
    entry["epsilon"] = entry["epsilon"] / 10  # someone "refunds" the budget by hand
    path.write_text(json.dumps(entry) + "\n")
    message, context = _request(host, 2)
    reply = app(message=message, context=context)
    assert reply.has_error() or reply.content[STATUS_KEY]["status"] != "trained"
    assert len(path.read_text().splitlines()) == 1  # nothing appended to a ledger that does not verify


def test_the_train_handler_runs_only_under_the_guard(host, serverapp_identity):
    message, context = _request(host, 1)
    with pytest.raises(RuntimeError, match="only under the privacy budget mod"):
        train(message, context)


def test_a_host_config_without_its_settings_is_refused_by_name():
    with pytest.raises(ValueError, match="lacks 'policy'"):
        DepartmentHost.from_config({"department": "x", "data-path": "d.csv", "ledger-dir": "l", "identity-key": "k"})


@pytest.mark.parametrize("tamper,field", [
    ({"server-round": -1}, "server-round"),
    ({"server-round": "1"}, "server-round"),
    ({"run-key": 7}, "run-key"),
    ({"acknowledged-seq": -2, "acknowledged-head": ""}, "acknowledged-seq"),
    ({"acknowledged-seq": 1, "acknowledged-head": "zz" * 32}, "acknowledged-head"),
    ({"acknowledged-seq": 1, "acknowledged-head": "a" * 10_000}, "acknowledged-head"),
    ({"acknowledged-seq": 1}, "acknowledged-head"),
    ({"request-version": 99}, "upgrade fedsilo on the department"),
])
def test_a_malformed_train_request_is_declined_with_a_reason_and_charges_nothing(host, serverapp_identity, tamper,
                                                                                 field):
    app = department_app(DepartmentHost.from_config(host["config"]))
    message, context = _request(host, 1)
    config = message.content[CONFIG_KEY]
    for key, value in tamper.items():
        config[key] = value
    reply = app(message=message, context=context)
    assert not reply.has_error()
    status = reply.content[STATUS_KEY]
    assert status["status"] == "declined" and field in status["reason"], status["reason"]
    assert ARRAYS_KEY not in reply.content
    assert ledger_module.PrivacyLedger(_ledger_path(host), "finance").entries == []


def test_a_request_without_a_run_key_still_trains_under_flowers_run_id(host, serverapp_identity):
    app = department_app(DepartmentHost.from_config(host["config"]))
    message, context = _request(host, 1)  # a coordinator of fedsilo 0.4 sends no request-version, no run key
    reply = app(message=message, context=context)
    assert reply.content[STATUS_KEY]["status"] == "trained", reply.content[STATUS_KEY]["reason"]
    (entry,) = ledger_module.PrivacyLedger(_ledger_path(host), "finance").entries
    assert entry.run_id == str(message.metadata.run_id)
