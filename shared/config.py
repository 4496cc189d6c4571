"""Run settings shared by the coordinator and the departments.

A Flower run carries one flat ``run_config`` dictionary to both the ServerApp and
every ClientApp.  :data:`RUN_CONFIG_DEFAULTS` is the single source of those keys and
their defaults: ``pyproject.toml``'s ``[tool.flwr.app.config]`` mirrors it (a test
keeps the two equal) and ``fedsilo simulate`` writes it into the app it launches.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .accounting import ACCOUNTANTS

GRAD_SAMPLE_MODES = ("auto", "ghost", "hooks", "functorch", "ew")
DEVICES = ("auto", "cpu", "cuda")
MODELS = ("auto", "mlp", "cnn")
TASKS = ("auto", "binary", "multiclass", "regression")
AGGREGATIONS = ("fedavg", "trimmed-mean", "median", "krum")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "dataset": "digits",
    "label-column": "label",
    "feature-columns": "",
    "partition": "iid",
    "seed": 42,
    # auto | mlp | cnn | package.module:factory (imported from each party's own environment).
    "model": "auto",
    # Let Opacus' ModuleValidator.fix replace layers DP-SGD cannot train (BatchNorm -> GroupNorm).
    "fix-model": False,
    # auto | binary | multiclass | regression (auto refuses to guess a many-valued number).
    "task": "auto",
    "dp": True,
    # σ as given; 0 with target-epsilon 0 (the default): each department plans σ so
    # that the planned rounds spend its own budget (its whole history included).
    "noise-multiplier": 0.0,
    "target-epsilon": 0.0,
    "max-grad-norm": 1.0,
    # What the run asks of each department's own policy (client/policy.py); 0 or
    # "" asks nothing.  A department refuses an ask looser than its policy.
    "delta": 0.0,
    "max-epsilon": 0.0,
    "accountant": "",
    "local-epochs": 1,
    "batch-size": 64,
    "learning-rate": 0.5,
    "momentum": 0.5,
    # auto: ghost clipping when every trainable layer has a ghost norm, else hooks.
    "grad-sample-mode": "auto",
    "device": "auto",
    "fraction-train": 1.0,
    # How the coordinator combines the updates: fedavg | trimmed-mean | median | krum
    # (server/robust.py), and the largest L2 norm an update may move the global
    # model (0 = no bound; a larger update is scaled down to it).
    "aggregation": "fedavg",
    "trim-fraction": 0.2,
    "byzantine": 1,
    "max-update-norm": 0.0,
    "min-departments": 2,
    "round-timeout": 600.0,
    "connect-timeout": 120.0,
    # The output folder: one folder per run (OUT/<run-name>/, OUT/latest points at
    # the newest) beside what outlives a run (a simulation's ledgers/, record/, central/).
    "out": "runs",
    # The run's folder under `out` and its id in every ledger, kept across resumes
    # ("" = the ServerApp names it run-<UTC time>-<random>).
    "run-name": "",
    # Continue `run-name` from its last checkpoint (RUN_DIR/checkpoint.safetensors).
    "resume": False,
    # The coordinator's own held-out table ("" in a simulation: split off the data), and the
    # public schema every department encodes its table with (JSON of shared.schema.DataSchema;
    # "" in a simulation: inferred from the held-out rows).
    "test-data": "",
    "data-schema": "",
    # Client-level DP at the coordinator (off by default): each department's
    # update clipped to central-clip-norm, Gaussian noise on the sum, departments
    # Poisson-sampled at fraction-train, a budget and a signed ledger of its own.
    "central-dp": False,
    "central-noise-multiplier": 1.0,
    "central-clip-norm": 1.0,
    "central-delta": 1e-3,
    "central-max-epsilon": 10.0,
    # Folder of the coordinator's ledger ("" = OUT/central) and the key that signs
    # it ("" = a key generated beside the ledger, as in a simulation).
    "central-ledger": "",
    "central-signing-key": "",
    # The coordinator's signed record of the ledger heads it acknowledged, per
    # department identity ("" = OUT/record/acknowledged.jsonl with a key beside it).
    "record": "",
    "record-signing-key": "",
    # Simulation only: the simulated departments' own policy (JSON of
    # client.policy.DepartmentPolicy).  A deployed department never reads it.
    "simulated-policy": "",
}


class ConfigError(ValueError):
    """A run setting is missing or out of range; the message says which and why."""


@dataclass(frozen=True)
class RunSettings:
    """Typed, validated view of a run's ``run_config``.

    Parameters mirror :data:`RUN_CONFIG_DEFAULTS` with ``-`` replaced by ``_``.
    ``target_epsilon`` of 0 means "use ``noise_multiplier`` as given" (and with
    ``noise_multiplier`` 0 too: "spend each department's budget"); a positive
    value makes every department derive its own noise multiplier so that its
    whole history — earlier runs included — reaches at most that ε by the run's
    last planned round (within its own budget).  ``delta``, ``max_epsilon`` and
    ``accountant`` are what the run *asks*; each department's own policy
    (``client/policy.py``) decides.
    """

    num_server_rounds: int
    dataset: str
    label_column: str
    feature_columns: str
    partition: str
    seed: int
    model: str
    fix_model: bool
    task: str
    dp: bool
    noise_multiplier: float
    target_epsilon: float
    max_grad_norm: float
    delta: float
    max_epsilon: float
    accountant: str
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    grad_sample_mode: str
    device: str
    fraction_train: float
    aggregation: str
    trim_fraction: float
    byzantine: int
    max_update_norm: float
    min_departments: int
    round_timeout: float
    connect_timeout: float
    out: str
    run_name: str
    resume: bool
    test_data: str
    data_schema: str
    central_dp: bool
    central_noise_multiplier: float
    central_clip_norm: float
    central_delta: float
    central_max_epsilon: float
    central_ledger: str
    central_signing_key: str
    record: str
    record_signing_key: str
    simulated_policy: str

    def __post_init__(self) -> None:
        checks = [
            (self.num_server_rounds >= 1, "num-server-rounds must be at least 1"),
            (self.local_epochs >= 1, "local-epochs must be at least 1"),
            (self.batch_size >= 1, "batch-size must be at least 1"),
            (self.learning_rate > 0, "learning-rate must be positive"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            # Bounded so every clip factor C/‖g‖ of a bounded per-sample gradient stays a normal float32.
            (1e-6 <= self.max_grad_norm <= 1e6, "max-grad-norm must be in [1e-6, 1e6]"),
            (self.delta == 0 or 0 < self.delta < 1, "delta must be 0 (ask nothing) or in (0, 1), e.g. 1e-5"),
            (self.noise_multiplier >= 0, "noise-multiplier must be >= 0"),
            (self.target_epsilon >= 0, "target-epsilon must be >= 0 (0 = off)"),
            (self.max_epsilon >= 0, "max-epsilon must be positive, or 0 to ask nothing"),
            (self.accountant in ("", *ACCOUNTANTS), f"accountant must be one of {ACCOUNTANTS}, or empty to let each department choose"),
            (
                self.grad_sample_mode in GRAD_SAMPLE_MODES,
                f"grad-sample-mode must be one of {GRAD_SAMPLE_MODES}",
            ),
            (self.device in DEVICES, f"device must be one of {DEVICES}"),
            (self.model in MODELS or bool(FACTORY.match(self.model)), f"model must be one of {MODELS} or a factory package.module:callable"),
            (self.task in TASKS, f"task must be one of {TASKS}"),
            (0 < self.fraction_train <= 1, "fraction-train must be in (0, 1]"),
            (self.aggregation in AGGREGATIONS, f"aggregation must be one of {', '.join(AGGREGATIONS)}"),
            (0 <= self.trim_fraction < 0.5, "trim-fraction must be in [0, 0.5): the share of updates cut at each end"),
            (self.byzantine >= 0, "byzantine (Krum's assumed number of malicious departments) must be >= 0"),
            (self.max_update_norm >= 0, "max-update-norm must be >= 0 (0 = no bound)"),
            (self.run_name == "" or bool(RUN_NAME.match(self.run_name)),
             "run-name must be letters, digits, '.', '_' or '-' (a folder name), at most 100 characters"),
            (not self.resume or bool(self.run_name), "resume needs the run-name of the run to continue"),
            (self.min_departments >= 1, "min-departments must be at least 1"),
            (self.round_timeout > 0, "round-timeout must be positive (seconds)"),
            (self.connect_timeout > 0, "connect-timeout must be positive (seconds)"),
            (self.central_clip_norm > 0, "central-clip-norm must be positive"),
            (0 < self.central_delta < 1, "central-delta must be in (0, 1) and below 1/departments"),
            (self.central_max_epsilon > 0, "central-max-epsilon must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
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
        """Build settings from a Flower run config, filling in defaults."""
        merged = {**RUN_CONFIG_DEFAULTS, **dict(run_config)}
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            default = RUN_CONFIG_DEFAULTS[key]
            raw = merged[key]
            try:
                values[field.name] = _coerce(raw, type(default))
            except (TypeError, ValueError) as err:
                raise ConfigError(
                    f"run config '{key}' = {raw!r} is not a {type(default).__name__}"
                ) from err
        for name in ("noise_multiplier", "max_epsilon", "delta", "learning_rate", "max_grad_norm", "momentum",
                     "target_epsilon", "fraction_train", "round_timeout", "connect_timeout", "max_update_norm", "trim_fraction",
                     "central_noise_multiplier", "central_clip_norm", "central_delta", "central_max_epsilon"):
            if not math.isfinite(values[name]):
                raise ConfigError(f"{name.replace('_', '-')} must be a finite number")
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """Inverse of :meth:`from_run_config` (kebab-case keys)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


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
