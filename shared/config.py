"""Run settings shared by the coordinator and the departments, and who receives which.

Every setting is declared once, in :data:`fedsilo.shared.settings.CATALOGUE`
(key, type, default, help, check, scope, CLI options); this module derives from it
:class:`RunSettings`, the typed, validated view of a run's settings, and
:data:`RUN_CONFIG_DEFAULTS`, the config of the Flower app that ``coordinator run``
and ``simulate`` submit (``shared/flower_cli.write_app``).

What travels.  A Flower run config reaches the ServerApp *and every ClientApp*, so
``coordinator run`` and ``simulate`` put in it only the ``department``-scope
settings (data schema, model, training, the privacy asks) and an opaque
``settings-key``.  The rest — the coordinator's paths, keys, aggregation,
client-level DP, timeouts, and a simulation's data and simulated policy — goes
into a 0600 file on the coordinator's host, ``FLWR_HOME/fedsilo-run-settings/<key>.json``
(:func:`publish`).  Flower starts the ServerApp (SuperExec → ``flwr-serverapp``;
a simulation: SuperLink → SuperExec → ``flwr-simulation``, then Ray's workers for
the simulated departments) with the environment of the process that started it,
``FLWR_HOME`` included: ``coordinator start`` sets it to ``STATE/flwr-home``,
``simulate`` to its private Flower folder.  :meth:`RunSettings.with_host_settings`
reads it back there.  ``flwr run .`` (Flower's own tooling, everything on one
machine) still sends every setting in the run config, as ``pyproject.toml``
declares them all; then there is no key and no file.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from dataclasses import field, fields, make_dataclass
from pathlib import Path
from typing import Any, Mapping

from .settings import (  # noqa: F401  (re-exported: many modules import them from here)
    ACCOUNTANTS,
    AGGREGATIONS,
    BY_KEY,
    CATALOGUE,
    DEVICES,
    FACTORY,
    GRAD_SAMPLE_MODES,
    MODELS,
    RUN_NAME,
    TASKS,
    defaults,
    keys,
)

# The run-config key naming a run's host-side settings; a per-submission handle, not a setting of the run.
SETTINGS_KEY = "settings-key"
HOST_SETTINGS_DIR = "fedsilo-run-settings"  # under FLWR_HOME on the coordinator's host
_KEY = re.compile(r"^[0-9a-f]{32}$")
HOST_SETTINGS_VERSION = 1

# What the Flower app's config holds, so what every department receives: the
# department-scope settings only (and settings-key among them).
RUN_CONFIG_DEFAULTS: dict[str, Any] = defaults("department")
DEPARTMENT_KEYS: frozenset[str] = frozenset(keys("department"))
HOST_KEYS: frozenset[str] = frozenset(keys("coordinator") + keys("simulation"))


class ConfigError(ValueError):
    """A run setting is missing or out of range; the message says which and why."""


class _RunSettings:
    """Typed, validated view of a run's settings.

    Parameters are the settings of :data:`fedsilo.shared.settings.CATALOGUE`, with
    ``-`` replaced by ``_``.  ``target_epsilon`` of 0 means "use ``noise_multiplier``
    as given" (and with ``noise_multiplier`` 0 too: "spend each department's
    budget"); a positive value makes every department derive its own noise
    multiplier so that its whole history — earlier runs included — reaches at most
    that ε by the run's last planned round (within its own budget).  ``delta``,
    ``max_epsilon`` and ``accountant`` are what the run *asks*; each department's
    own policy (``client/policy.py``) decides.
    """

    def __post_init__(self) -> None:
        for setting in CATALOGUE:  # each setting's own check, in catalogue order
            if setting.check is not None and not setting.check.ok(getattr(self, setting.name)):
                raise ConfigError(setting.check.message)
        # Checks across settings.
        if self.resume and not self.run_name:
            raise ConfigError("resume needs the run-name of the run to continue")
        if self.central_dp and self.central_noise_multiplier <= 0:
            raise ConfigError(
                "central-noise-multiplier must be positive with --central-dp "
                "(the noise is what makes the aggregate client-level private)"
            )
        if self.dp and self.max_epsilon and self.target_epsilon > self.max_epsilon:
            raise ConfigError(
                f"target-epsilon ({self.target_epsilon}) is above max-epsilon "
                f"({self.max_epsilon}): departments would refuse the last rounds; "
                "raise max-epsilon or lower target-epsilon"
            )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunSettings":
        """Build settings from a Flower run config, filling in defaults.

        Keys that are not settings are ignored; every catalogue key present is
        read, whatever its scope (``flwr run .`` sends them all).
        """
        values: dict[str, Any] = {}
        for setting in CATALOGUE:
            raw = run_config.get(setting.key, setting.default)
            try:
                values[setting.name] = _coerce(raw, setting.type)
            except (TypeError, ValueError) as err:
                raise ConfigError(
                    f"run config '{setting.key}' = {raw!r} is not a {setting.type.__name__}"
                ) from err
            if setting.type is float and not math.isfinite(values[setting.name]):
                raise ConfigError(f"{setting.key} must be a finite number")
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """Inverse of :meth:`from_run_config`: every setting of the run, by kebab-case key.

        What checkpoints and summaries keep.  ``settings-key`` is left out: it names
        one submission's host-side file, not anything about the run.
        """
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)
                if f.name != "settings_key"}

    def department_run_config(self) -> dict[str, Any]:
        """What the run config carries to every department: the department-scope settings."""
        return {key: getattr(self, key.replace("-", "_")) for key in RUN_CONFIG_DEFAULTS}

    def host_config(self) -> dict[str, Any]:
        """The coordinator- and simulation-scope settings: what stays on the coordinator's host."""
        return {s.key: getattr(self, s.name) for s in CATALOGUE if s.key in HOST_KEYS}

    def with_host_settings(self, flwr_home: Path | None = None) -> "RunSettings":
        """These settings with the run's host-side ones read back (see the module's docstring).

        Without a ``settings-key`` (``flwr run .``, an in-process test) they are
        returned as they are.  Only the coordinator's host, and in a simulation
        the simulated departments on it, call this: a deployed department has
        neither the file nor any use for it.

        Raises
        ------
        ConfigError
            If the key is malformed, or its file is missing or not one :func:`publish` wrote.
        """
        key = self.settings_key
        if not key:
            return self
        if not _KEY.match(key):
            raise ConfigError(f"run config '{SETTINGS_KEY}' = {key[:80]!r} is not a key fedsilo made "
                              "(32 hexadecimal digits); submit runs with `fedsilo coordinator run` or `fedsilo simulate`")
        path = host_settings_dir(flwr_home) / f"{key}.json"
        host = _read_host_settings(str(path), key)
        return RunSettings.from_run_config({**self.department_run_config(), **host})


RunSettings = make_dataclass(
    "RunSettings",
    # settings-key (the last) alone has a default: one submission's handle, set by `publish`.
    [(s.name, s.type) if s.key != SETTINGS_KEY else (s.name, s.type, field(default=s.default)) for s in CATALOGUE],
    bases=(_RunSettings,),
    frozen=True,
)
RunSettings.__module__ = __name__  # pickles (Ray) and docs name it here
RunSettings.__doc__ = _RunSettings.__doc__


def host_settings_dir(flwr_home: Path | str | None = None) -> Path:
    """Where a host keeps its runs' host-side settings: ``FLWR_HOME/fedsilo-run-settings``.

    ``flwr_home`` default: this process's ``FLWR_HOME`` (Flower's own default, ``~/.flwr``, without one).
    """
    home = Path(flwr_home) if flwr_home is not None else (
        Path(os.environ["FLWR_HOME"]) if os.environ.get("FLWR_HOME") else Path.home() / ".flwr")
    return home.expanduser().resolve() / HOST_SETTINGS_DIR


def publish(settings: RunSettings, flwr_home: Path | str) -> dict[str, Any]:
    """Keep ``settings``' host side on this host; return the run config to submit.

    Writes ``FLWR_HOME/fedsilo-run-settings/<key>.json`` (0600, its folder 0700)
    with the coordinator- and simulation-scope settings, under a fresh random key,
    and returns the department-scope settings with that key: all a department is
    sent.  ``flwr_home`` must be the ``FLWR_HOME`` of the Flower processes that run
    the ServerApp (and a simulation's departments).
    """
    key = secrets.token_hex(16)
    folder = host_settings_dir(flwr_home)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / f"{key}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"version": HOST_SETTINGS_VERSION, "key": key, "settings": settings.host_config()}, handle, indent=1)
    return {**settings.department_run_config(), SETTINGS_KEY: key}


def withdraw(run_config: Mapping[str, Any], flwr_home: Path | str | None = None) -> None:
    """Remove the host-side file :func:`publish` wrote for ``run_config`` (none: nothing to do)."""
    key = str(run_config.get(SETTINGS_KEY, ""))
    if _KEY.match(key):
        (host_settings_dir(flwr_home) / f"{key}.json").unlink(missing_ok=True)


_host_cache: dict[tuple[str, str], dict[str, Any]] = {}


def _read_host_settings(path: str, key: str) -> dict[str, Any]:
    """The host-side settings in ``path`` (cached: a simulated department reads them every message)."""
    cached = _host_cache.get((path, key))
    if cached is not None:
        return cached
    from .safe_read import UnreadableFile, load_json

    if not os.path.lexists(path):
        raise ConfigError(
            f"this run's coordinator settings ({SETTINGS_KEY} {key}) are not in {Path(path).parent}: the ServerApp "
            "reads them from the FLWR_HOME of the Flower processes that run it; submit runs with `fedsilo coordinator "
            "run --state STATE` on the coordinator's host (its SuperExec has FLWR_HOME=STATE/flwr-home) or `fedsilo simulate`"
        )
    try:
        state = load_json(path, "run's host-side settings")
    except (OSError, UnreadableFile) as err:
        raise ConfigError(f"this run's coordinator settings cannot be read: {err}") from None
    settings = state.get("settings")
    if state.get("key") != key or state.get("version") != HOST_SETTINGS_VERSION or not isinstance(settings, dict):
        raise ConfigError(f"{path} is not the host-side settings of {SETTINGS_KEY} {key}; submit the run again")
    stray = sorted(set(settings) - HOST_KEYS)
    if stray:
        raise ConfigError(f"{path} holds settings that are not the host's ({', '.join(stray[:5])}); submit the run again")
    if len(_host_cache) > 64:
        _host_cache.clear()
    _host_cache[(path, key)] = dict(settings)
    return dict(settings)


def _coerce(raw: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ValueError(raw)
    if kind is int:
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)
        return int(raw)
    return kind(raw)
