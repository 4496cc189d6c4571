"""Run folders, checkpoints, the kept update, the pre-flight forecast and defaults that finish (in-process)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedsilo.client.planner import forecast_department
from fedsilo.client.policy import DepartmentPolicy
from fedsilo.client.replay import LastUpdate, request_digest
from fedsilo.server import cli as coordinator_cli
from fedsilo.server.checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError, resumable
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.config import RUN_CONFIG_DEFAULTS, RunSettings
from fedsilo.shared.settings import defaults as setting_defaults
from fedsilo.shared.ledger import PrivacyLedger, ledger_path
from fedsilo.shared.runs import LATEST, RunFolderError, create_run_folder, new_run_name, resolve_run_dir
from fedsilo.shared.signing import simulated_identity

REPO = Path(__file__).resolve().parents[1]


def test_each_run_gets_its_own_folder_and_latest_follows_the_newest(tmp_path):
    first, second = new_run_name(0), new_run_name(0)
    assert first.startswith("run-19700101-000000-") and first != second  # the random tail tells them apart
    a = create_run_folder(tmp_path, "run-a")
    (a / "summary.json").write_text("{}")
    assert resolve_run_dir(tmp_path) == a.resolve()
    b = create_run_folder(tmp_path, "run-b")
    assert (tmp_path / LATEST).resolve() == b.resolve() and resolve_run_dir(tmp_path) == b.resolve()
    assert (a / "summary.json").read_text() == "{}"  # the earlier run is untouched
    with pytest.raises(RunFolderError, match="already holds a run.*--resume"):
        create_run_folder(tmp_path, "run-a")
    assert resolve_run_dir(a) == a  # a run folder names itself


def _checkpoint(round_=2, **settings) -> Checkpoint:
    config = {**RUN_CONFIG_DEFAULTS, "run-name": "run-x", **settings}
    arrays = {"layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "layer.bias": np.ones(2, np.float32)}
    summary = {"run_id": "run-x", "status": "running", "rounds": [{"round": 1, "epsilon": {"a": 1.0}}]}
    return Checkpoint("run-x", round_, config, summary, arrays, ["a"], central_entries=4)


def test_a_checkpoint_round_trips_in_the_model_s_layer_order(tmp_path):
    _checkpoint().save(tmp_path)
    loaded = Checkpoint.load(tmp_path)
    assert (loaded.round, loaded.run_name, loaded.exhausted, loaded.central_entries) == (2, "run-x", ["a"], 4)
    assert list(loaded.arrays) == ["layer.weight", "layer.bias"]
    assert np.array_equal(loaded.arrays["layer.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert not list(tmp_path.glob(".*.tmp"))  # written beside and renamed
    # A later checkpoint replaces it whole.
    _checkpoint(3).save(tmp_path)
    assert Checkpoint.load(tmp_path).round == 3


def test_a_resume_is_the_same_run_and_only_of_a_run_that_did_not_end(tmp_path):
    checkpoint = _checkpoint()
    checkpoint.check_settings({**checkpoint.settings, "resume": True, "round-timeout": 30.0})  # operational: fine
    with pytest.raises(CheckpointError, match=r"num-server-rounds: 3 -> 9"):
        checkpoint.check_settings({**checkpoint.settings, "num-server-rounds": 9})
    with pytest.raises(CheckpointError, match=r"holds no run \(summary.json is missing\)"):
        resumable(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(CheckpointError, match="completed no round"):
        resumable(tmp_path)
    checkpoint.save(tmp_path)
    assert resumable(tmp_path)[1].round == 2
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(CheckpointError, match="ended as 'completed': there is nothing to resume"):
        resumable(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed"}))
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointError, match="not a readable fedsilo checkpoint"):
        resumable(tmp_path)


def _ledger(folder: Path, name="finance") -> PrivacyLedger:
    return PrivacyLedger(ledger_path(folder, name), name, simulated_identity(folder, name))


def _charge(ledger: PrivacyLedger, run_id: str, rnd: int, sigma=1.0, q=0.25, steps=4):
    return ledger.append(run_id=run_id, round=rnd, mechanism=Mechanism(sigma, q, steps), max_grad_norm=1.0,
                         delta=1e-5, accountant="pld", epsilon=0.5 * rnd, num_examples=200,
                         expected_seq=len(ledger.entries), budget=10.0)


def test_the_kept_update_is_sent_again_only_for_the_same_request_once_charged(tmp_path):
    ledger = _ledger(tmp_path)
    global_model = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    update = ArrayRecord({"w": Array(np.array([1.0, 2.0, 3.0], np.float32))})
    digest = request_digest("run-x", 2, global_model)
    kept = LastUpdate(ledger.path)
    _charge(ledger, "run-x", 1)
    kept.keep(digest, "run-x", 2, len(ledger.entries) + 1, update, {"epsilon": 1.0})
    assert oct(kept.path.stat().st_mode & 0o777) == "0o600"
    assert kept.find(digest, ledger) is None  # kept, but its charge never reached the ledger: never sent
    _charge(ledger, "run-x", 2)
    replay = kept.find(digest, ledger)
    assert replay is not None and replay.entry.round == 2 and replay.entry.seq == 1
    assert np.array_equal(replay.arrays["w"].numpy(), np.array([1.0, 2.0, 3.0], np.float32))
    assert replay.metrics == {"epsilon": 1.0}
    # Another global model, round or run is another request: it trains and is charged as usual.
    other_model = ArrayRecord({"w": Array(np.full(3, 1e-6, np.float32))})
    for other in (request_digest("run-x", 2, other_model), request_digest("run-x", 3, global_model),
                  request_digest("run-y", 2, global_model)):
        assert kept.find(other, ledger) is None


def _settings(**config) -> RunSettings:
    return RunSettings.from_run_config({"num-server-rounds": 20, "batch-size": 64, **config})


def test_by_default_every_planned_round_fits_and_a_fixed_sigma_is_forecast_to_stop(tmp_path):
    policy = DepartmentPolicy(max_epsilon=10.0, delta=1e-5)
    default = forecast_department("finance", _settings(), policy, 300, [])
    assert (default.rounds, default.remaining, default.reason) == (20, 20, "")
    fixed = forecast_department("finance", _settings(**{"noise-multiplier": 1.0}), policy, 300, [])
    assert 0 < fixed.rounds < 20 and fixed.noise_multiplier == 1.0  # the README's old default stopped early
    # A ledger at its budget: nothing fits, and the reason names the numbers.
    ledger = _ledger(tmp_path)
    for rnd in range(1, 40):
        _charge(ledger, "earlier", rnd, sigma=0.6)
    spent = forecast_department("finance", _settings(), policy, 300, ledger.entries)
    assert spent.rounds == 0 and spent.epsilon_before > 10 and "nothing left to spend" in spent.reason


def test_a_resumed_run_forecasts_only_the_rounds_it_still_has_to_charge(tmp_path):
    policy = DepartmentPolicy(max_epsilon=10.0, delta=1e-5)
    settings = _settings(**{"num-server-rounds": 6, "noise-multiplier": 1.0})
    ledger = _ledger(tmp_path)
    for rnd in (1, 2, 3):  # the run completed 2 rounds; this department had also charged the third
        _charge(ledger, "run-x", rnd)
    resumed = forecast_department("finance", settings, policy, 300, ledger.entries, completed=2, run_id="run-x")
    assert resumed.remaining == 3  # rounds 4-6: round 3 is sent again, not charged again


def test_coordinator_run_defaults_are_the_app_s():
    defaults = {name: param.default for name, param in inspect.signature(coordinator_cli.run).parameters.items()}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for key in ("round-timeout", "connect-timeout", "min-departments"):
        assert defaults[key.replace("-", "_")] == setting_defaults()[key] == pyproject[key], key
    assert defaults["noise_multiplier"] is None and RUN_CONFIG_DEFAULTS["noise-multiplier"] == 0.0  # planned


def test_a_resume_takes_new_timeouts_and_refuses_any_other_option(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedsilo.cli import app

    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed"}))
    _checkpoint().save(tmp_path)
    submitted = []
    monkeypatch.setattr(coordinator_cli.coord, "connect", lambda certs, state: "connection")
    monkeypatch.setattr(coordinator_cli, "_submit", lambda connection, settings, run_dir, verbose, state: submitted.append(settings))
    runner = CliRunner()

    refused = runner.invoke(app, ["coordinator", "run", "--resume", str(tmp_path), "--rounds", "30", "--seed", "7"])
    assert refused.exit_code == 2 and not submitted
    assert "--rounds, --seed cannot be given with it" in " ".join(refused.output.split())
    refused = runner.invoke(app, ["simulate", "--resume", str(tmp_path), "--no-dp"])
    assert refused.exit_code == 2 and "--dp cannot be given with it" in " ".join(refused.output.split())

    resumed = runner.invoke(app, ["coordinator", "run", "--resume", str(tmp_path), "--round-timeout", "900"])
    assert resumed.exit_code == 0, resumed.output
    (settings,) = submitted
    assert settings.round_timeout == 900.0 and settings.resume  # the new timeout applies …
    assert settings.connect_timeout == setting_defaults()["connect-timeout"]  # … and only what was given
    assert settings.num_server_rounds == RUN_CONFIG_DEFAULTS["num-server-rounds"] and settings.run_name == "run-x"
    assert "round-timeout 900 s" in resumed.output


def test_a_checkpoint_keeps_the_coordinators_optimizer_state_beside_the_model(tmp_path):
    """Distributed DP's momentum lives at the coordinator: a resume continues it, never restarts it at zero."""
    velocity = {"layer.weight": np.full((2, 3), 0.25), "layer.bias": np.array([-1.5, 2.0])}
    checkpoint = _checkpoint()
    dataclasses.replace(checkpoint, optimizer=velocity).save(tmp_path)
    loaded = Checkpoint.load(tmp_path)
    assert list(loaded.arrays) == ["layer.weight", "layer.bias"]  # the optimizer's tensors are not model arrays
    assert sorted(loaded.optimizer) == sorted(velocity)
    assert all(np.array_equal(loaded.optimizer[k], v) for k, v in velocity.items())
    checkpoint.save(tmp_path)  # FedAvg: no optimizer state, as checkpoints written before it had none
    assert Checkpoint.load(tmp_path).optimizer == {}


def test_a_restored_momentum_steps_exactly_as_an_uninterrupted_run():
    from types import SimpleNamespace

    from fedsilo.server.secure_fedavg import SecureFedAvg

    secure = SimpleNamespace(settings=SimpleNamespace(momentum=0.9, learning_rate=0.5), distributed=True)
    gradients = [{"w": np.array([1.0, -2.0])}, {"w": np.array([0.5, 0.5])}, {"w": np.array([-1.0, 3.0])}]
    through = SecureFedAvg(secure=secure)
    steps = [through._sgd_step(g) for g in gradients]
    first = SecureFedAvg(secure=secure)
    first._sgd_step(gradients[0])
    resumed = SecureFedAvg(secure=secure)
    resumed.restore_optimizer_state(first.optimizer_state())
    assert [resumed._sgd_step(g)["w"].tolist() for g in gradients[1:]] == [s["w"].tolist() for s in steps[1:]]
    fresh = SecureFedAvg(secure=secure)  # what a resume without the state did: momentum from zero
    assert fresh._sgd_step(gradients[1])["w"].tolist() != steps[1]["w"].tolist()
