"""The settings catalogue: each setting declared once, scoped, and everything derived from it."""

from __future__ import annotations

import dataclasses
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
    assert RunSettings.from_run_config({}).to_run_config() == defaults()
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
    for key in ("data-schema", "model", "num-server-rounds", "batch-size", "noise-multiplier", "delta", "max-epsilon"):
        assert key in department, key
    # Never to a department: the coordinator's paths, keys, aggregation, client-level DP, timeouts.
    for key in ("out", "test-data", "record", "record-signing-key", "central-ledger", "central-signing-key",
                "aggregation", "central-dp", "round-timeout", "dataset", "run-name"):
        assert BY_KEY[key].scope == "coordinator", key
    assert BY_KEY["simulated-policy"].scope == "simulation" and BY_KEY["partition"].scope == "simulation"
    assert set(defaults()) == department | set(catalogue.keys("coordinator")) | set(catalogue.keys("simulation"))
