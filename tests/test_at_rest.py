"""At rest and in refusals: a department's ledger is its host user's alone, and its path stays on the host.

An entry holds the exact ``num_examples``: the ledger folder is 0700 and every
file in it 0600 as the department's real code writes them, a looser folder is
tightened when the department opens it, and a ``rolled-back`` refusal sent to
the coordinator names the ledger by its identity, never by its path.
"""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedsilo.client.replay import LastUpdate
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.ledger import PrivacyLedger
from fedsilo.shared.signing import Signer, generate_identity

# The department's real ClientApp, as test_policy.py drives it (its fixture and helpers).
from test_policy import POLICY, _ask, _status, site  # noqa: F401 - site is a fixture


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def signer(tmp_path):
    generate_identity(tmp_path / "keys" / "finance", tmp_path / "keys" / "finance.pub", "finance")
    return Signer.from_file(tmp_path / "keys" / "finance")


@pytest.fixture(autouse=True)
def usual_umask():
    old = os.umask(0o022)  # what most hosts have: new files 0644, folders 0755
    yield
    os.umask(old)


def _append(ledger: PrivacyLedger, rnd: int = 1) -> None:
    ledger.append(run_id="r", round=rnd, mechanism=Mechanism(1.0, 0.1, 10), max_grad_norm=1.0, delta=1e-5,
                  accountant="pld", epsilon=0.3 * rnd, num_examples=300)


def test_a_new_ledger_is_0600_in_a_0700_folder(tmp_path, signer):
    path = tmp_path / "site" / "ledgers" / "finance.jsonl"
    ledger = PrivacyLedger(path, "finance", signer)
    _append(ledger)
    _append(ledger, 2)
    assert _mode(path.parent) == 0o700 and _mode(path.parent.parent) == 0o700
    assert _mode(path) == 0o600 and _mode(path.with_name(path.name + ".lock")) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_looser_folder_and_ledger_are_tightened_when_the_department_opens_them(tmp_path, signer, caplog):
    path = tmp_path / "ledgers" / "finance.jsonl"
    _append(PrivacyLedger(path, "finance", signer))
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)
    PrivacyLedger(path, "finance")  # an auditor's read-only copy: nothing changed
    assert _mode(path.parent) == 0o755
    with caplog.at_level(logging.WARNING, logger="fedsilo.shared.ledger"):
        PrivacyLedger(path, "finance", signer)
    assert _mode(path.parent) == 0o700 and _mode(path) == 0o600
    assert "tightened" in caplog.text and str(path.parent) in caplog.text


def test_a_ledger_in_a_shared_sticky_folder_leaves_the_folder_alone(tmp_path, signer):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp
    ledger = PrivacyLedger(shared / "finance.jsonl", "finance", signer)
    _append(ledger)
    assert _mode(shared) == 0o1777 and _mode(shared / "finance.jsonl") == 0o600


def test_the_kept_update_is_0600_in_a_0700_folder(tmp_path):
    ledger = tmp_path / "fresh" / "finance.jsonl"
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    LastUpdate(ledger).keep("d", "r", 1, 1, arrays, {"num-examples": 1})
    kept = LastUpdate(ledger).path
    assert _mode(kept) == 0o600 and _mode(kept.parent) == 0o700


def test_a_rolled_back_reason_names_the_identity_never_the_path(tmp_path, signer):
    path = tmp_path / "host-secret-folder" / "finance.jsonl"
    ledger = PrivacyLedger(path, "finance", signer)
    _append(ledger)
    for seq, head in [(5, "x"), (1, "not-the-head")]:
        reason = ledger.continues(seq, head)
        assert reason and signer.fingerprint in reason
        assert str(tmp_path) not in reason and "host-secret-folder" not in reason and "finance.jsonl" not in reason


def test_a_rolled_back_refusal_from_the_real_clientapp_carries_no_host_path(site, serverapp_identity):  # noqa: F811
    first = _ask(site, POLICY)
    assert _status(first)[0] != "rolled-back"
    (path,) = site["ledgers"].glob("*.jsonl")
    path.unlink()  # deleted: the coordinator acknowledged one entry
    reply = _ask(site, POLICY, rnd=2, ack=(1, "a" * 64))
    status, reason = _status(reply)
    assert status == "rolled-back" and "is empty" in reason
    assert str(site["root"]) not in reason and str(site["ledgers"]) not in reason and path.name not in reason
    assert _mode(site["ledgers"]) == 0o700


def test_a_simulated_department_folder_is_0700_from_its_first_key(tmp_path):
    from fedsilo.shared.signing import simulated_identity

    folder = tmp_path / "out" / "ledgers"
    signer = simulated_identity(folder, "finance")
    assert _mode(folder) == 0o700
    _append(PrivacyLedger(folder / "finance.jsonl", "finance", signer))
    assert _mode(folder / "finance.jsonl") == 0o600
