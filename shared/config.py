"""Run settings shared by the coordinator and the departments.

Every setting is declared once, in :data:`fedsilo.shared.settings.CATALOGUE`
(key, type, default, help, check, scope, CLI options); this module derives from it
:data:`RUN_CONFIG_DEFAULTS` (the Flower app's config: ``pyproject.toml``'s
``[tool.flwr.app.config]`` mirrors the catalogue, a test keeps the two equal, and
``fedsilo simulate`` and ``coordinator run`` write it into the app they submit) and
:class:`RunSettings`, the typed, validated view of a run's settings.
"""

from __future__ import annotations

import math
from dataclasses import fields, make_dataclass
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
)

RUN_CONFIG_DEFAULTS: dict[str, Any] = defaults()


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
        """Inverse of :meth:`from_run_config`: every setting, by kebab-case key."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


RunSettings = make_dataclass(
    "RunSettings",
    [(setting.name, setting.type) for setting in CATALOGUE],
    bases=(_RunSettings,),
    frozen=True,
)
RunSettings.__module__ = __name__  # pickles (Ray) and docs name it here
RunSettings.__doc__ = _RunSettings.__doc__


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
