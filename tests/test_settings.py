"""The settings catalogue: each setting declared once, scoped, and everything derived from it."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from fedsilo.shared import settings as catalogue
from fedsilo.shared.config import ConfigError, RunSettings
from fedsilo.shared.settings import BY_KEY, CATALOGUE, SCOPES, defaults

REPO = Path(__file__).resolve().parents[1]


def test_every_setting_is_declared_once_with_what_the_docs_need():
    keys = [s.key for s in CATALOGUE]
    assert len(keys) == len(set(keys))
    for setting in CATALOGUE:
        assert setting.key == setting.key.lower() and "_" not in setting.key and " " not in setting.key, setting.key
        assert setting.type in (int, float, bool, str), setting.key
        assert type(setting.default) is setting.type, setting.key
        assert setting.scope in SCOPES, setting.key
        assert setting.help and "\n" not in setting.help and setting.help.endswith("."), setting.key
        if setting.check is not None:  # the default is valid
            assert setting.check.ok(setting.default), setting.key
            assert setting.key.split("-")[0] in setting.check.message, setting.key


def test_run_settings_fields_and_defaults_are_the_catalogue_s():
    assert [f.name for f in dataclasses.fields(RunSettings)] == [s.name for s in CATALOGUE]
    # settings-key names one submission's host-side file: not kept with the run's settings.
    assert RunSettings.from_run_config({}).to_run_config() == {k: v for k, v in defaults().items() if k != "settings-key"}
    assert RunSettings.__module__ == "fedsilo.shared.config"


def test_pyproject_app_config_mirrors_the_catalogue():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == defaults()


@pytest.mark.parametrize("setting", [s for s in CATALOGUE if s.check is not None], ids=lambda s: s.key)
def test_each_check_is_applied_with_its_message(setting):
    bad = {int: -(10**6), float: float(-1e9), str: "not-a-valid value!"}[setting.type]
    if setting.check.ok(bad):  # e.g. a str with a permissive pattern
        pytest.skip(f"{bad!r} is valid for {setting.key}")
    with pytest.raises(ConfigError, match="^" + __import__("re").escape(setting.check.message)):
        RunSettings.from_run_config({setting.key: bad})


def test_every_float_must_be_finite_and_types_are_coerced():
    for setting in (s for s in CATALOGUE if s.type is float):
        with pytest.raises(ConfigError, match=f"{setting.key} must be a finite number"):
            RunSettings.from_run_config({setting.key: float("nan")})
    with pytest.raises(ConfigError, match="'batch-size' = 'many' is not a int"):
        RunSettings.from_run_config({"batch-size": "many"})
    assert RunSettings.from_run_config({"dp": "false", "batch-size": 32.0}).batch_size == 32


def test_checks_across_settings():
    with pytest.raises(ConfigError, match="resume needs the run-name"):
        RunSettings.from_run_config({"resume": True})
    with pytest.raises(ConfigError, match="central-noise-multiplier must be positive"):
        RunSettings.from_run_config({"central-dp": True, "central-noise-multiplier": 0.0})
    with pytest.raises(ConfigError, match="above max-epsilon"):
        RunSettings.from_run_config({"target-epsilon": 9.0, "max-epsilon": 8.0})


def test_scopes_say_who_reads_a_setting():
    department = set(catalogue.keys("department"))
    # What a department needs: data schema, model, training and the privacy asks.
    for key in ("data-schema", "model", "num-server-rounds", "batch-size", "noise-multiplier", "delta", "max-epsilon",
                "central-dp", "central-clip-norm", "central-noise-multiplier"):  # under secure aggregation they noise
        assert key in department, key
    # Never to a department: the coordinator's paths, keys, aggregation, client-level budget, timeouts.
    for key in ("out", "test-data", "record", "record-signing-key", "central-ledger", "central-signing-key",
                "aggregation", "central-delta", "round-timeout", "dataset", "run-name"):
        assert BY_KEY[key].scope == "coordinator", key
    assert BY_KEY["simulated-policy"].scope == "simulation" and BY_KEY["partition"].scope == "simulation"
    assert set(defaults()) == department | set(catalogue.keys("coordinator")) | set(catalogue.keys("simulation"))


# ----------------------------------------------------------------------------- what travels


def _fused(run_config: dict) -> dict:
    """What a ClientApp's ``context.run_config`` holds: the app's config fused with the submitted one, as Flower does."""
    from flwr.common.config import fuse_dicts, get_fused_config_from_dir

    from fedsilo.shared.flower_cli import write_app

    app_dir = write_app(Path(__import__("tempfile").mkdtemp()) / "app")
    fuse_dicts(tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"],
               run_config, check_keys=True)  # the Control API refuses a key the app does not declare
    return get_fused_config_from_dir(app_dir, run_config)


def _train_request():
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from fedsilo.shared.data import federation_data_test
    from fedsilo.shared.models import build_model
    from fedsilo.shared.protocol import ARRAYS_KEY, CONFIG_KEY

    test = federation_data_test("breast-cancer", "label", ())
    model = build_model("auto", test.input_shape, test.num_outputs, test.kind, seed=42, task=test.task)
    return Message(RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), CONFIG_KEY: ConfigRecord({"server-round": 1})}),
                   dst_node_id=7, message_type="train")


def test_a_simulated_department_receives_only_department_settings_and_its_policy_from_the_simulation(
        tmp_path, monkeypatch, serverapp_identity):
    from flwr.app import Context, RecordDict
    from typer.testing import CliRunner

    from fedsilo.cli import app as cli
    from fedsilo.client.app import app as client_app
    from fedsilo.shared.config import DEPARTMENT_KEYS, HOST_KEYS, RUN_CONFIG_DEFAULTS, SETTINGS_KEY, host_settings_dir
    from fedsilo.shared.flower_cli import RunOutcome
    from fedsilo.shared.protocol import METRICS_KEY, STATUS_KEY
    from fedsilo.simulations import simulate as simulate_module

    seen: dict = {}

    class Federation:  # LocalFederation without processes: what `simulate` submits, and to whom
        progress = None  # no startup progress to show

        def __init__(self, workdir, resources=None):
            self.connection = type("Connection", (), {"home": Path(workdir) / "flwr-home"})()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def run(self, run_config, **kwargs):
            home = self.connection.home
            seen["run_config"], seen["home"] = dict(run_config), home
            # The simulation's processes inherit its FLWR_HOME: a simulated department, in-process.
            monkeypatch.setenv("FLWR_HOME", str(home))
            received = _fused(run_config)
            seen["received"] = received
            context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                              state=RecordDict(), run_config=received)
            seen["reply"] = client_app(message=_train_request(), context=context)
            seen["files"] = [(f.name, f.stat().st_mode & 0o777, f.parent.stat().st_mode & 0o777, json.loads(f.read_text()))
                             for f in sorted(host_settings_dir(home).iterdir())]
            return RunOutcome("1", "finished:failed", tmp_path / "flower.log")

    monkeypatch.setattr(simulate_module, "LocalFederation", Federation)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["simulate", "--departments", "2", "--rounds", "1", "--dataset", "breast-cancer",
                                      "--max-epsilon", "7", "--delta", "1e-6", "--aggregation", "median",
                                      "--byzantine", "0", "--out", str(out)])
    assert result.exit_code == 1 and "received" in seen, (result.output, repr(result.exception))  # the stand-in "failed" the run
    received = seen["received"]
    assert set(received) == DEPARTMENT_KEYS == set(RUN_CONFIG_DEFAULTS)  # exactly what a department receives
    assert not set(received) & HOST_KEYS
    assert "simulated-policy" not in received and "out" not in received and "aggregation" not in received
    assert str(tmp_path) not in json_dump(received)  # no host path travels
    # The simulated department took its policy and ledger folder from the simulation, and trained.
    reply = seen["reply"]
    assert not reply.has_error() and reply.content[STATUS_KEY]["status"] == "trained", reply
    metrics = dict(reply.content[METRICS_KEY])
    assert metrics["max-epsilon"] == 7.0 and metrics["delta"] == 1e-6
    assert list((out / "ledgers").glob("*.jsonl"))
    ((name, mode, folder_mode, state),) = seen["files"]
    assert name == f"{received[SETTINGS_KEY]}.json" and mode == 0o600 and folder_mode == 0o700
    host = state["settings"]
    assert set(host) == set(HOST_KEYS) and host["aggregation"] == "median" and host["out"] == str(out.resolve())


def json_dump(value) -> str:
    return json.dumps(value, sort_keys=True)


def test_coordinator_run_sends_departments_no_coordinator_path_and_the_serverapp_reads_them_on_its_host(
        tmp_path, monkeypatch, digits_csv):
    from typer.testing import CliRunner

    from fedsilo.cli import app as cli
    from fedsilo.server import cli as coordinator_cli
    from fedsilo.shared.config import DEPARTMENT_KEYS, HOST_KEYS, host_settings_dir
    from fedsilo.shared.flower_cli import RunOutcome

    certs, state = tmp_path / "certs", tmp_path / "state"
    certs.mkdir()
    (certs / "coordinator.key").write_text("stand-in")  # only its existence is checked before submitting
    seen: dict = {}

    def submit(connection, run_config, log_path, on_line=None):
        home = coordinator_cli.coord.superexec_home(state)
        seen["run_config"] = dict(run_config)
        seen["modes"] = [f.stat().st_mode & 0o777 for f in host_settings_dir(home).iterdir()]
        # What the ServerApp does on the coordinator's host (SuperExec: FLWR_HOME=STATE/flwr-home).
        seen["settings"] = RunSettings.from_run_config(_fused(run_config)).with_host_settings(home)
        return RunOutcome("1", "finished:failed", log_path)

    monkeypatch.setattr(coordinator_cli.coord, "connect", lambda certs, state: "connection")
    monkeypatch.setattr(coordinator_cli.coord, "submit", submit)
    result = CliRunner().invoke(cli, ["coordinator", "run", "--certs", str(certs), "--state", str(state),
                                      "--test-data", str(digits_csv), "--out", str(tmp_path / "runs"),
                                      "--central-ledger", str(tmp_path / "central"), "--rounds", "4",
                                      "--round-timeout", "30", "--max-epsilon", "5"])
    assert result.exit_code == 1, result.output
    sent = seen["run_config"]
    assert set(sent) == DEPARTMENT_KEYS and not set(sent) & HOST_KEYS
    assert str(tmp_path) not in json_dump(sent)  # neither the test data, the keys, the record nor OUT
    assert sent["num-server-rounds"] == 4 and sent["max-epsilon"] == 5.0
    settings = seen["settings"]
    assert settings.round_timeout == 30.0 and settings.test_data == str(digits_csv.resolve())
    assert settings.record_signing_key == str((certs / "coordinator.key").resolve())
    assert settings.record == str((state / "record" / "acknowledged.jsonl").resolve())
    assert settings.out == str((tmp_path / "runs").resolve())
    assert seen["modes"] == [0o600]
    assert not list(host_settings_dir(coordinator_cli.coord.superexec_home(state)).iterdir())  # withdrawn after the run


def test_host_settings_are_refused_when_missing_malformed_or_foreign(tmp_path):
    from fedsilo.shared.config import SETTINGS_KEY, host_settings_dir, publish, withdraw

    settings = RunSettings.from_run_config({"out": str(tmp_path / "runs"), "aggregation": "median", "byzantine": 0})
    run_config = publish(settings, tmp_path)
    received = RunSettings.from_run_config(run_config)
    assert received.out == "runs" and received.aggregation == "fedavg"  # a department knows neither
    assert received.with_host_settings(tmp_path).to_run_config() == settings.to_run_config()
    assert RunSettings.from_run_config({}).with_host_settings(tmp_path) == RunSettings.from_run_config({})
    with pytest.raises(ConfigError, match="not a key fedsilo made"):
        RunSettings.from_run_config({SETTINGS_KEY: "../../etc/passwd"}).with_host_settings(tmp_path)
    with pytest.raises(ConfigError, match="are not in .*fedsilo coordinator run --state STATE"):
        RunSettings.from_run_config({SETTINGS_KEY: "0" * 32}).with_host_settings(tmp_path)
    other = publish(settings, tmp_path)
    path = host_settings_dir(tmp_path) / f"{other[SETTINGS_KEY]}.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "settings": {**state["settings"], "max-epsilon": 100.0}}))
    with pytest.raises(ConfigError, match="not the host's \\(max-epsilon\\)"):
        RunSettings.from_run_config(other).with_host_settings(tmp_path)
    withdraw(run_config, tmp_path)
    assert not (host_settings_dir(tmp_path) / f"{run_config[SETTINGS_KEY]}.json").exists()


def test_a_checkpoint_of_the_previous_version_resumes(tmp_path):
    """Checkpoints kept every setting in one dict (no settings-key): they still resume, with their own settings."""
    import numpy as np

    from fedsilo.server.app import resume_point
    from fedsilo.server.checkpoint import Checkpoint

    old = {key: value for key, value in defaults().items() if key != "settings-key"}  # the 45 keys of v0.4
    old.update({"run-name": "run-x", "out": str(tmp_path), "simulated-policy": '{"max_epsilon": 3.0}',
                "aggregation": "median", "byzantine": 0})
    summary = {"run_id": "run-x", "status": "running", "rounds": [{"round": 1, "epsilon": {"a": 1.0}}]}
    Checkpoint("run-x", 1, old, summary, {"w": np.ones(2, np.float32)}, [], None).save(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running"}))
    resumed = RunSettings.from_run_config({**Checkpoint.load(tmp_path).settings, "resume": True})
    assert resumed.to_run_config() == {**old, "resume": True}
    assert resume_point(resumed, tmp_path).round == 1  # the same run: nothing changed but the operational keys


def test_settings_key_is_last_and_the_only_setting_with_a_default():
    assert CATALOGUE[-1].key == "settings-key"
    required = [f.name for f in dataclasses.fields(RunSettings) if f.default is dataclasses.MISSING]
    assert required == [s.name for s in CATALOGUE[:-1]]  # forgetting a setting is an error, not a default


# ----------------------------------------------------------------------------- the CLIs


def _command(*path):
    import typer

    from fedsilo.cli import app as cli

    command = typer.main.get_command(cli)
    for name in path:
        command = command.commands[name]
    return command


# The options each command had before they came from the catalogue (v0.4): none lost, none added.
OPTIONS = {
    ("coordinator", "run"): "accountant address aggregation batch_size byzantine central_clip_norm central_delta central_dp "
    "central_ledger central_max_epsilon central_noise_multiplier certs connect_timeout delta dp feature_columns fix_model "
    "fraction_train label_column learning_rate local_epochs max_epsilon max_grad_norm max_update_norm min_departments "
    "model momentum noise_multiplier out resume round_timeout rounds schema seed state target_epsilon task test_data "
    "trim_fraction verbose"
    " secure_aggregation secagg_threshold secagg_bound secagg_frac_bits secagg_max_weight"
    " distributed_dp sample_rate ddp_colluders ddp_scale"
    " lora_rank lora_alpha lora_targets max_length device base_dtype",
    ("simulate",): "accountant aggregation batch_size byzantine central_clip_norm central_delta central_dp central_max_epsilon "
    "central_noise_multiplier cpus_per_department dataset delta departments device dp feature_columns fix_model "
    "fraction_train gpus_per_department grad_sample_mode label_column learning_rate local_epochs max_epsilon max_grad_norm max_update_norm "
    "model momentum noise_multiplier out partition ray_address resume rounds schema seed target_epsilon task test_data trim_fraction verbose"
    " secure_aggregation secagg_threshold secagg_bound secagg_frac_bits secagg_max_weight"
    " distributed_dp sample_rate ddp_colluders ddp_scale"
    " lora_rank lora_alpha lora_targets max_length base_dtype",
}


@pytest.mark.parametrize("path", list(OPTIONS), ids=" ".join)
def test_the_commands_show_the_catalogue_s_options_and_their_own(path):
    from fedsilo.shared.settings import in_cli, option_default, option_help

    command = _command(*path)
    params = {p.name: p for p in command.params}
    assert sorted(params) == sorted(OPTIONS[path].split())
    which = "coordinator" if path[0] == "coordinator" else "simulate"
    for setting in in_cli(which):
        param = params[setting.param]
        assert param.default == option_default(setting, which), setting.key
        assert param.help == option_help(setting, which), setting.key
        assert setting.option_name(which).split("/")[0] in param.opts, setting.key
    assert params["rounds"].type.min == 1 and params["byzantine"].type.min == 0  # typer's bounds, as before
    assert params["dp"].secondary_opts == ["--no-dp"] and params["central_dp"].is_flag


def test_a_typed_option_reaches_the_settings(tmp_path, monkeypatch):
    """`simulate` hands what was typed to the run's settings (the catalogue's options, not a copy of them)."""
    from typer.testing import CliRunner

    from fedsilo.cli import app as cli
    from fedsilo.simulations import simulate as simulate_module

    seen = []
    monkeypatch.setattr(simulate_module, "preflight", lambda settings, *a, **k: seen.append(settings) or (_ for _ in ()).throw(SystemExit(3)))
    result = CliRunner().invoke(cli, ["simulate", "--departments", "2", "--rounds", "2", "--dataset", "breast-cancer",
                                      "--batch-size", "16", "--learning-rate", "0.1", "--momentum", "0.0",
                                      "--trim-fraction", "0.1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 3, result.output
    (settings,) = seen
    assert (settings.num_server_rounds, settings.batch_size, settings.learning_rate, settings.momentum,
            settings.trim_fraction) == (2, 16, 0.1, 0.0, 0.1)
    refused = CliRunner().invoke(cli, ["simulate", "--rounds", "0"])
    assert refused.exit_code == 2 and "--rounds" in refused.output


def test_a_user_ray_cluster_s_workers_are_handed_the_simulation_s_flwr_home(tmp_path):
    """Ray's own workers inherit FLWR_HOME; a cluster's get it in the job's runtime environment."""
    from fedsilo.simulations.local_federation import RAY_JOB_CONFIG, job_environment

    env = job_environment(tmp_path, {"RAY_ADDRESS": "10.0.0.5:6379"})
    assert json.loads(env[RAY_JOB_CONFIG]) == {"runtime_env": {"env_vars": {"FLWR_HOME": str(tmp_path)}}}
    theirs = json.dumps({"runtime_env": {"env_vars": {"A": "1"}, "pip": ["x"]}, "metadata": {"k": "v"}})
    merged = json.loads(job_environment(tmp_path, {"RAY_ADDRESS": "auto", RAY_JOB_CONFIG: theirs})[RAY_JOB_CONFIG])
    assert merged == {"runtime_env": {"env_vars": {"A": "1", "FLWR_HOME": str(tmp_path)}, "pip": ["x"]},
                      "metadata": {"k": "v"}}
