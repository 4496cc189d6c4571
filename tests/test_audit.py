"""Tamper evidence and the audit: every kind of tampering is detected and named."""

import json
import subprocess
import sys

import pytest

from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism
from fedsilo.audit import audit_path, pld_epsilon
from fedsilo.shared.ledger import LedgerError, PrivacyLedger, ledger_path
from fedsilo.shared.signing import Signer, generate_identity, simulated_identity

MECHANISMS = [Mechanism(1.2, 0.2, 5), Mechanism(1.2, 0.2, 5), Mechanism(1.0, 0.25, 4), Mechanism(1.2, 0.2, 5)]


def _write_run(folder, name="finance", run_id="77"):
    """A ledger of four honest rounds plus the coordinator's record of them."""
    ledgers = folder / "ledgers"
    ledger = PrivacyLedger(ledger_path(ledgers, name), name, simulated_identity(ledgers, name))
    history = []
    for rnd, m in enumerate(MECHANISMS, start=1):
        history.append(m)
        ledger.append(run_id=run_id, round=rnd, mechanism=m, max_grad_norm=1.0, delta=1e-5,
                      accountant="pld", epsilon=accounting.epsilon(history, 1e-5, "pld"), num_examples=80)
    summary = {
        "run_id": run_id, "max_epsilon": 10.0, "departments": {name: {"max_epsilon": 10.0}},
        "rounds": [{"round": e.round, "trained": [name], "epsilon": {name: e.epsilon}} for e in ledger.entries],
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return ledger_path(ledgers, name)


def _problems(folder):
    result = audit_path(folder)
    assert not result.ok
    return " | ".join(p for d in result.departments for p in d.problems) + " | ".join(result.problems)


def test_an_honest_run_verifies_and_epsilon_matches_independent_accountants(tmp_path):
    path = _write_run(tmp_path)
    result = audit_path(tmp_path)
    assert result.ok, result.to_json()
    (row,) = result.departments
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert row.epsilon == entries[-1]["epsilon"]
    assert entries[-1]["accountant"] == "pld"  # the default, re-derived exactly
    assert row.epsilon_pld == pytest.approx(row.epsilon, rel=1e-9)
    assert row.epsilon_pld <= row.epsilon_prv * 1.01 and row.epsilon_prv == pytest.approx(row.epsilon, rel=0.02)
    assert row.epsilon_rdp >= row.epsilon_prv
    assert row.signatures == "valid" and row.rounds == 4 and row.steps == 19


@pytest.mark.parametrize(
    "tamper,expected",
    [
        ("edit", "signature does not match"),
        ("delete", "seq 2 where 1 was expected"),
        ("swap", "out of order"),
        ("truncate", "truncated or deleted"),
        ("forge", "entries of another identity"),
        ("lower", "budget under-reported"),
    ],
)
def test_each_kind_of_tampering_is_detected_and_named(tmp_path, tamper, expected):
    path = _write_run(tmp_path)
    lines = path.read_text().splitlines()
    if tamper == "edit":
        entry = json.loads(lines[1])
        entry["noise_multiplier"] = 5.0  # pretend more noise was used
        lines[1] = json.dumps(entry, sort_keys=True)
    elif tamper == "delete":
        del lines[1]
    elif tamper == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "truncate":
        lines = lines[:2]
    elif tamper == "forge":
        generate_identity(tmp_path / "mallory", tmp_path / "mallory.pub", "mallory")
        mallory = Signer.from_file(tmp_path / "mallory")
        entry = json.loads(lines[-1])
        from fedsilo.shared.ledger import LedgerEntry
        from dataclasses import replace

        forged = replace(LedgerEntry.from_dict(entry), signer=mallory.fingerprint, signature="")
        forged = replace(forged, signature=mallory.sign(forged.payload()))
        lines[-1] = forged.to_json()
    elif tamper == "lower":
        # a consistent re-signed ledger whose last ε is under-reported
        entry = json.loads(lines[-1])
        entry["epsilon"] = entry["epsilon"] * 0.9
        from fedsilo.shared.ledger import LedgerEntry
        from dataclasses import replace

        signer = Signer.from_file(tmp_path / "ledgers" / "finance.key")
        fixed = replace(LedgerEntry.from_dict(entry), signature="")
        lines[-1] = replace(fixed, signature=signer.sign(fixed.payload())).to_json()
    path.write_text("\n".join(lines) + "\n")
    assert expected in _problems(tmp_path)


def test_a_department_refuses_to_train_against_a_tampered_ledger(tmp_path):
    path = _write_run(tmp_path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["epsilon"] = 0.01
    lines[0] = json.dumps(entry, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="signature does not match"):
        PrivacyLedger(path, "finance", simulated_identity(tmp_path / "ledgers", "finance"))


def test_pld_is_an_independent_and_consistent_accountant():
    from fedsilo.shared.ledger import LedgerEntry

    entries = [LedgerEntry(i, "x", "r", i, m.noise_multiplier, m.sample_rate, m.steps, 1.0, 1e-5, "prv", 0.0, 10, 0.0)
               for i, m in enumerate(MECHANISMS)]
    prv = accounting.epsilon(MECHANISMS, 1e-5, "prv")
    assert pld_epsilon(entries, 1e-5) == pytest.approx(prv, rel=0.02)


def test_audit_cli_json_and_exit_codes(tmp_path):
    _write_run(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "fedsilo", "audit", str(tmp_path), "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    payload = json.loads(ok.stdout)
    assert payload["ok"] is True
    assert set(payload["departments"][0]) >= {"id", "epsilon", "delta", "rounds", "steps", "verified"}
    ledger = tmp_path / "ledgers" / "finance.jsonl"
    ledger.write_text("\n".join(ledger.read_text().splitlines()[:-1]) + "\n")  # drop the last entry
    bad = subprocess.run([sys.executable, "-m", "fedsilo", "audit", str(tmp_path), "--json"], capture_output=True, text=True)
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False
    missing = subprocess.run([sys.executable, "-m", "fedsilo", "audit", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_keys_never_fall_back_to_a_key_beside_the_ledger(tmp_path):
    """A forger who rewrites a ledger and the .pub beside it passes only an audit that trusts that .pub."""
    genuine = _write_run(tmp_path / "genuine")
    trusted = tmp_path / "trusted-keys"
    trusted.mkdir()
    (trusted / "finance.pub").write_bytes(genuine.with_name("finance.pub").read_bytes())
    forged_dir = tmp_path / "forged" / "ledgers"
    forged_dir.mkdir(parents=True)
    generate_identity(forged_dir / "finance.key", forged_dir / "finance.pub", "forger")
    forger = Signer.from_file(forged_dir / "finance.key")
    forged = PrivacyLedger(ledger_path(forged_dir, "finance"), "finance", forger)
    history = []
    for rnd, m in enumerate(MECHANISMS[:1], start=1):  # one round instead of four: budget "restored"
        history.append(m)
        forged.append(run_id="77", round=rnd, mechanism=m, max_grad_norm=1.0, delta=1e-5,
                      accountant="pld", epsilon=accounting.epsilon(history, 1e-5, "pld"), num_examples=80)
    assert audit_path(forged_dir).ok  # self-consistent: its own .pub vouches for it
    with_keys = audit_path(forged_dir, trusted)
    assert not with_keys.ok and with_keys.departments[0].signatures != "valid"
    assert "no public key with fingerprint" in " ".join(with_keys.departments[0].problems)
    empty = tmp_path / "no-keys"
    empty.mkdir()
    missing = audit_path(forged_dir, empty)
    assert not missing.ok and missing.departments[0].signatures == "not checked"
    assert "keys beside the ledger are not trusted" in " ".join(missing.departments[0].problems)
    assert audit_path(genuine.parent, trusted).ok  # the genuine ledger verifies against the trusted key


def test_a_deployment_run_folder_audits_with_the_ledgers_collected_from_the_hosts(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    host = tmp_path / "finance-host"  # in a deployment the ledger never leaves the department's host
    (run / "ledgers").rename(host)
    alone = audit_path(run)
    assert alone.ok and not alone.departments  # nothing wrong, but nothing re-derived either
    assert any("a deployment's stay on the department hosts" in line for line in alone.unavailable)
    collected = audit_path(run, ledgers=[host])
    assert collected.ok and [d.id for d in collected.departments] == ["finance"]
    assert not any("stay on the department hosts" in line for line in collected.unavailable)
    ledger = host / "finance.jsonl"
    ledger.write_text(ledger.read_text().replace('"num_examples": 80', '"num_examples": 81', 1))
    assert not audit_path(run, ledgers=[host]).ok
    with pytest.raises(FileNotFoundError, match="--ledgers .* does not exist"):
        audit_path(run, ledgers=[tmp_path / "nowhere"])
    (run / "simulation.json").write_text('{"departments": 1}')  # a simulated run must hold its ledgers
    assert any("no ledgers (*.jsonl) found" in p for p in audit_path(run).problems)
