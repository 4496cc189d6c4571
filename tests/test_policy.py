"""The department's own policy decides: looser asks refused, budget bound to the key, nothing leaks.

These call the department's real ClientApp in-process, with the node config its
executor gives it in a deployment (data path, ledger folder, identity key,
policy), on a real table and a real ledger on disk.
"""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from sklearn.datasets import load_digits

from fedsilo.client.app import app
from fedsilo.client.policy import DepartmentPolicy, PolicyError, RunRequest, size_bucket
from fedsilo.shared import accounting
from fedsilo.audit import audit_path
from fedsilo.shared.config import RUN_CONFIG_DEFAULTS
from fedsilo.shared.data import load_table, table_schema
from fedsilo.shared.ledger import PrivacyLedger, find_identity_ledger
from fedsilo.shared.models import build_model
from fedsilo.shared.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, STATUS_KEY
from fedsilo.shared.record import ACK_HEAD_KEY, ACK_SEQ_KEY, HEAD_KEY, LedgerHead
from fedsilo.shared.signing import Signer, generate_identity

ROWS = 300  # the department's records: reported as 256, never 300


@pytest.fixture
def site(tmp_path):
    """A department host: its table, its key, its ledger folder; the coordinator's schema."""
    bunch = load_digits()
    frame = pd.DataFrame(bunch.data, columns=[f"px{i}" for i in range(64)])
    frame["label"] = bunch.target
    table, test = tmp_path / "finance.csv", tmp_path / "test.csv"
    frame.iloc[:ROWS].to_csv(table, index=False)
    frame.iloc[ROWS:].to_csv(test, index=False)
    key = tmp_path / "keys" / "finance"
    generate_identity(key, key.with_suffix(".pub"), "finance")
    return {"root": tmp_path, "table": table, "key": key, "ledgers": tmp_path / "ledgers",
            "schema": table_schema(test, "label").to_json()}


def _ask(site, policy: DepartmentPolicy, run=None, rnd=1, name="finance", ledgers=None, key=None, ack=None,
         run_id=1, table=None):
    """Send one train task to the department; returns the reply."""
    run_config = {**RUN_CONFIG_DEFAULTS, "data-schema": site["schema"], "out": str(site["root"] / "run"), "noise-multiplier": 1.0,
                  "model": "mlp", **(run or {})}
    data = load_table(site["table"], "label")
    model = build_model("mlp", data.input_shape, 10, "tabular", seed=1)
    config = {"server-round": rnd}
    if ack:
        config[ACK_SEQ_KEY], config[ACK_HEAD_KEY] = ack
    request = Message(
        RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), CONFIG_KEY: ConfigRecord(config)}),
        dst_node_id=7, message_type="train",
    )
    node_config = {
        "department": name, "data-path": str(table or site["table"]), "label-column": "label",
        "ledger-dir": str(ledgers or site["ledgers"]), "identity-key": str(key or site["key"]),
        "policy": policy.to_json(),
    }
    context = Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)
    return app(message=request, context=context)


def _status(reply):
    record = reply.content[STATUS_KEY]
    return record["status"], record["reason"]


def _ledger(site, ledgers=None):
    identity = Signer.from_file(site["key"]).fingerprint
    return PrivacyLedger(find_identity_ledger(ledgers or site["ledgers"], identity, "finance"), "finance",
                         Signer.from_file(site["key"]))


POLICY = DepartmentPolicy(max_epsilon=8.0, delta=1e-5)


def test_the_policy_grants_stricter_asks_and_names_every_looser_one():
    terms, looser = POLICY.terms_for(RunRequest(dp=True, delta=1e-6, max_epsilon=4.0, accountant="rdp"))
    assert not looser and (terms.max_epsilon, terms.delta, terms.accountant) == (4.0, 1e-6, "rdp")
    terms, looser = POLICY.terms_for(RunRequest(dp=True))  # asks nothing: the policy's own terms
    assert (terms.max_epsilon, terms.delta, terms.accountant) == (8.0, 1e-5, "pld")
    strict = DepartmentPolicy(max_epsilon=5.0, delta=1e-6, accountants=("rdp",))
    terms, looser = strict.terms_for(RunRequest(dp=False, delta=0.9, max_epsilon=10.0, accountant="pld"))
    assert terms is None and len(looser) == 4
    text = " ".join(looser)
    for named in ("δ=0.9", "δ=1e-06", "budget of 10", "at most 5", "asks pld", "accepts rdp", "without differential privacy"):
        assert named in text
    with pytest.raises(PolicyError, match="not below 1/300 records"):
        DepartmentPolicy(max_epsilon=1.0, delta=0.01).check_records(300)
    with pytest.raises(PolicyError, match="unknown department policy setting"):
        DepartmentPolicy.from_json('{"max_epsilon": 1, "max_epsilonn": 2}')
    assert DepartmentPolicy.from_json(strict.to_json()) == strict
    assert [size_bucket(n) for n in (1, 2, 3, 5, 7, 300, 1797, 2048)] == [1, 2, 3, 4, 6, 256, 1536, 2048]
    assert all(2 / 3 * n < size_bucket(n) <= n for n in range(1, 5000))


@pytest.mark.parametrize("ask", [{"delta": 0.9}, {"dp": False}, {"max-epsilon": 50.0}, {"accountant": "prv"}])
def test_a_looser_ask_is_refused_before_training_and_nothing_is_released(site, serverapp_identity, ask):
    policy = DepartmentPolicy(max_epsilon=5.0, delta=1e-5, accountants=("pld", "rdp"))
    reply = _ask(site, policy, run=ask)
    status, reason = _status(reply)
    assert status == "declined" and list(ask)[0] in reason
    assert not reply.content.array_records  # no weights left the department
    assert dict(reply.content[METRICS_KEY])["num-examples"] == 0
    assert _ledger(site).entries == []  # nothing ran, nothing charged


def test_the_guard_measures_at_the_departments_delta_and_reports_a_bucketed_size(site, serverapp_identity):
    reply = _ask(site, POLICY)
    assert _status(reply)[0] == "trained"
    metrics = dict(reply.content[METRICS_KEY])
    assert metrics["delta"] == 1e-5 and metrics["num-examples"] == size_bucket(ROWS) == 256
    # The mechanism is planned from the reported size: q and steps reveal nothing finer about N.
    assert metrics["sample-rate"] == pytest.approx(1 / 4) and metrics["steps"] == 4
    (entry,) = _ledger(site).entries
    assert (entry.delta, entry.budget, entry.reported_size, entry.num_examples) == (1e-5, 8.0, 256, ROWS)
    declared = DepartmentPolicy(max_epsilon=8.0, public_size=1000)
    assert dict(_ask(site, declared, rnd=2).content[METRICS_KEY])["num-examples"] == 1000
    assert _ledger(site).entries[-1].budget == 8.0
    lower = _ask(site, POLICY, run={"max-epsilon": 7.5, "delta": 1e-6}, rnd=3)  # stricter asks: granted
    assert _status(lower) == ("trained", ""), _status(lower)
    assert dict(lower.content[METRICS_KEY])["max-epsilon"] == 7.5 and _ledger(site).entries[-1].budget == 7.5
    assert dict(lower.content[METRICS_KEY])["delta"] == 1e-6 and _ledger(site).entries[-1].delta == 1e-6
    assert "δ changed from 1e-05 to 1e-06" in " ".join(audit_path(site["ledgers"], site["key"].parent).findings)


def test_a_department_renamed_or_with_its_key_file_renamed_continues_its_epsilon(site, serverapp_identity):
    first = _ask(site, POLICY)
    eps1 = dict(first.content[METRICS_KEY])["epsilon"]
    renamed_key = site["key"].with_name("finance-copy")
    renamed_key.write_bytes(site["key"].read_bytes())
    second = _ask(site, POLICY, rnd=2, name="finance-renamed", key=renamed_key)
    eps2 = dict(second.content[METRICS_KEY])["epsilon"]
    assert eps2 > eps1  # the same history continued, not a fresh budget
    files = sorted(site["ledgers"].glob("*.jsonl"))
    assert len(files) == 1
    entries = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [e["department"] for e in entries] == ["finance", "finance-renamed"] and entries[1]["seq"] == 1
    audit = audit_path(site["ledgers"], site["key"].parent)
    assert audit.ok and "one identity under 2 names" in " ".join(audit.findings)


def test_a_rolled_back_deleted_or_new_folder_ledger_is_refused(site, serverapp_identity):
    _ask(site, POLICY)
    backup = site["root"] / "backup"
    backup.mkdir()
    (path,) = site["ledgers"].glob("*.jsonl")
    (backup / path.name).write_bytes(path.read_bytes())
    second = _ask(site, POLICY, rnd=2)
    head = LedgerHead.from_record(second.content[HEAD_KEY])
    assert head.seq == 2 and not head.problem()  # signed by the department's key
    acknowledged = (head.seq, head.head)
    path.write_bytes((backup / path.name).read_bytes())  # restored from the older copy
    cases = {"restored": {}, "new folder": {"ledgers": site["root"] / "elsewhere"}}
    for what, where in cases.items():
        reply = _ask(site, POLICY, rnd=3, ack=acknowledged, **where)
        status, reason = _status(reply)
        assert status == "rolled-back", what
        assert "acknowledged 2 entries" in reason and not reply.content.array_records
    path.unlink()  # deleted
    status, reason = _status(_ask(site, POLICY, rnd=3, ack=acknowledged))
    assert status == "rolled-back" and "is empty" in reason
    assert not path.exists()  # a refusal writes nothing


def test_a_record_outside_the_runs_classes_is_left_out_and_named_only_here(site, serverapp_identity, caplog):
    frame = pd.read_csv(site["table"])
    frame["label"] = frame["label"].astype(str)
    frame.loc[17, "label"] = "HIV+"
    bad = site["root"] / "bad.csv"
    frame.to_csv(bad, index=False)
    with caplog.at_level(logging.WARNING, logger="fedsilo.department"):
        reply = _ask(site, POLICY, table=bad)
    assert _status(reply)[0] == "trained"  # as without that record: nothing tells the coordinator
    assert f"1 of {ROWS} rows" in caplog.text  # the department's own log says so


def test_an_error_reply_carries_no_detail_of_the_table(site, serverapp_identity, caplog):
    frame = pd.read_csv(site["table"]).drop(columns=["px19"])
    bad = site["root"] / "bad.csv"
    frame.to_csv(bad, index=False)
    with caplog.at_level(logging.ERROR, logger="fedsilo.department"):
        reply = _ask(site, POLICY, table=bad)
    assert reply.has_error()
    assert "px19" not in reply.error.reason and "19" not in reply.error.reason
    assert reply.error.reason.startswith("the department's ClientApp failed (SchemaError)")
    assert "px19" in caplog.text  # the full text stays in the department's own log


def test_an_rdp_ledger_continues_under_pld_without_discarding_rounds(site, serverapp_identity):
    rdp_only = DepartmentPolicy(max_epsilon=8.0, accountants=("rdp",))
    for rnd in (1, 2):
        assert _status(_ask(site, rdp_only, rnd=rnd))[0] == "trained"
    rdp_eps = _ledger(site).entries[-1].epsilon
    reply = _ask(site, POLICY, rnd=3)  # the department now accepts PLD first
    assert _status(reply)[0] == "trained" and not reply.has_error()
    entries = _ledger(site).entries
    assert [e.accountant for e in entries] == ["rdp", "rdp", "pld"]
    assert entries[-1].epsilon > rdp_eps * 0.5  # the whole history, not a fresh start
    # PLD bounds the same three rounds more tightly than RDP: the "shrink" that used to discard rounds.
    assert entries[-1].epsilon < accounting.epsilon([e.mechanism for e in entries], 1e-5, "rdp")
    audit = audit_path(site["ledgers"], site["key"].parent)
    assert audit.ok, audit.to_json()
    assert "accountant changed from rdp to pld" in " ".join(audit.findings)


def test_non_private_training_needs_the_departments_own_opt_in_and_voids_its_epsilon(site, serverapp_identity):
    assert _status(_ask(site, POLICY, run={"dp": False}))[0] == "declined"
    opted_in = DepartmentPolicy(max_epsilon=8.0, allow_non_private=True)
    reply = _ask(site, opted_in, run={"dp": False})
    assert _status(reply)[0] == "trained" and dict(reply.content[METRICS_KEY])["epsilon"] == float("inf")
    (entry,) = _ledger(site).entries
    assert entry.private is False
    status, reason = _status(_ask(site, opted_in, rnd=2))  # a private run afterwards: nothing finite is left
    assert status == "refused" and "without DP before" in reason
    audit = audit_path(site["ledgers"], site["key"].parent)
    assert "WITHOUT differential privacy" in " ".join(audit.findings)
    assert audit.departments[0].to_json()["epsilon"] is None  # ∞: no finite ε


def test_a_raised_budget_is_a_finding_never_hidden(site, serverapp_identity):
    small = DepartmentPolicy(max_epsilon=4.5)
    rnd = 0
    while True:
        rnd += 1
        if _status(_ask(site, small, rnd=rnd))[0] != "trained":
            break
    assert rnd > 1
    assert _status(_ask(site, DepartmentPolicy(max_epsilon=9.0), rnd=rnd + 1))[0] == "trained"
    audit = audit_path(site["ledgers"], site["key"].parent)
    text = " ".join(audit.findings)
    assert audit.ok and "budget raised from 4.5 to 9" in text and "past the earliest budget 4.5" in text
