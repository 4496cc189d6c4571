"""Who this department is, where its data and ledger live, and its policy, from a Flower Context.

In a simulation Flower gives each virtual SuperNode ``partition-id`` and
``num-partitions``: the department rebuilds its own partition of the embedded
dataset, and takes the simulated departments' policy that ``fedsilo simulate``
set, with the rest of the simulation's own settings, from the simulation's host
(:meth:`~fedsilo.shared.config.RunSettings.with_host_settings`), not from the run
config.  A deployed department (``fedsilo department start``) is given
``department``, ``data-path``, ``label-column``, ``ledger-dir``,
``identity-key`` and ``policy`` by its own executor: its data, its ledger and
its policy stay on its host, whatever the run asks for.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from fedsilo.shared.config import RunSettings
from fedsilo.shared.data import Dataset, load_records, simulated_federation, split_columns
from fedsilo.shared.schema import DataSchema
from fedsilo.shared.ledger import find_identity_ledger
from fedsilo.shared.model_factory import is_factory
from fedsilo.shared.pretrained import bind_tokenizer, find_base, is_pretrained
from fedsilo.shared.signing import Signer, simulated_identity

from .limits import RunLimits
from .policy import DepartmentPolicy

log = logging.getLogger("fedsilo.department")

# What a simulated department allows when `fedsilo simulate` set nothing (`flwr run .`).
SIMULATED_DEFAULT_POLICY = DepartmentPolicy(max_epsilon=10.0)


@dataclass(frozen=True)
class Department:
    name: str  # display name; the ledger belongs to the signing key, not to it
    # Its records, or how to load them: a deployed department reads its table only
    # once the run's asks passed its limits (client/admission.py).
    source: Dataset | Callable[[], Dataset] | None
    ledger_dir: Path
    policy: DepartmentPolicy
    signing_key: Path  # the key that is its identity and signs its ledger entries
    schema: DataSchema | None = None  # the run's schema its table is encoded with (deployed)

    @property
    def data(self) -> Dataset:
        return self.source() if callable(self.source) else self.source

    @property
    def signer(self) -> Signer:
        return _signer(str(self.signing_key))

    @property
    def ledger_path(self) -> Path:
        """This identity's ledger in the folder, whatever the file or the department is called."""
        return find_identity_ledger(self.ledger_dir, self.signer.fingerprint, self.name)

    @property
    def max_epsilon(self) -> float:
        return self.policy.max_epsilon


@functools.lru_cache(maxsize=64)
def _signer(path: str) -> Signer:
    return Signer.from_file(path)


def department_from_context(
    node_config: Mapping[str, Any], settings: RunSettings
) -> Department:
    """Resolve this node's department: deployed (``data-path``) or simulated."""
    if "data-path" in node_config:
        return _deployed_department(node_config, settings)
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError(
            "this SuperNode has no 'partition-id'/'num-partitions' in its node config; "
            "fedsilo's simulated departments need them (Flower's simulation sets them)"
        )
    pid, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
    # The simulation's data, ledger folder and policy are on this host, not in the run config.
    settings = settings.with_host_settings()
    federation = simulated_federation(
        settings.dataset,
        settings.label_column,
        split_columns(settings.feature_columns),
        total,
        settings.partition,
        settings.seed,
        schema_json=settings.data_schema,
        test_data=settings.test_data,
        task=settings.task,
        base_model=settings.base_model,
        max_length=settings.max_length,
    )
    part = federation.parts[pid]
    ledger_dir = Path(settings.out).expanduser().resolve() / "ledgers"
    simulated_identity(ledger_dir, part.name)  # a key of its own, kept beside its ledger
    policy = simulated_policy(settings.simulated_policy, settings.model)
    if not policy.peers:  # secure aggregation's roster: every simulated department's identity
        policy = _with_simulated_roster(policy, str(ledger_dir), tuple(p.name for p in federation.parts))
    return Department(part.name, part, ledger_dir, policy, ledger_dir / f"{part.name}.key")


def simulated_policy(text: str, model: str = "auto") -> DepartmentPolicy:
    """The simulated departments' policy (the user of a simulation runs every side).

    Without one (`flwr run .`), the defaults, allowing the run's own model
    factory: whoever simulates installed it for every simulated department.
    """
    if text:
        return _policy(text)
    return replace(SIMULATED_DEFAULT_POLICY, models=(model,)) if is_factory(model) else SIMULATED_DEFAULT_POLICY


@functools.lru_cache(maxsize=16)
def _with_simulated_roster(policy: DepartmentPolicy, ledger_dir: str, names: tuple[str, ...]) -> DepartmentPolicy:
    """``policy`` with the roster of all simulated departments, whose identities are made here if new."""
    from fedsilo.shared.record import public_key_line

    # The key is read from the private file: another process may be writing the .pub just now.
    peers = tuple((name, public_key_line(simulated_identity(Path(ledger_dir), name).public_key)) for name in names)
    return replace(policy, peers=peers)


@dataclass(frozen=True)
class DepartmentHost:
    """What a deployed department's host gives its executor, once: its table, ledger, identity and policy.

    Set by ``fedsilo department start`` on this host (:meth:`from_config` reads
    the executor's local config); whatever a run asks, these are the
    department's own.  :meth:`for_run` is the department as one run sees it:
    its table encoded with that run's schema.
    """

    name: str
    data_path: str
    label_column: str
    ledger_dir: Path
    identity_key: Path
    policy: DepartmentPolicy

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DepartmentHost":
        for key in ("department", "data-path", "ledger-dir", "identity-key", "policy"):
            if key not in config:
                raise ValueError(f"node config lacks '{key}'; start departments with `fedsilo department start`")
        return cls(
            str(config["department"]), str(config["data-path"]), str(config.get("label-column", "label")),
            Path(str(config["ledger-dir"])), Path(str(config["identity-key"])), _policy(str(config["policy"])),
        )

    def for_run(self, settings: RunSettings) -> Department:
        if not settings.data_schema:
            raise ValueError(
                "this run carries no data-schema; submit deployment runs with `fedsilo coordinator run`"
            )
        schema = _run_schema(settings.data_schema, self.label_column)
        data = functools.partial(_load_own_table, self.data_path, self.label_column, settings.data_schema,
                                 self.policy.limits, settings.model, self.policy.base_models)
        return Department(self.name, data, self.ledger_dir, self.policy, self.identity_key, schema)


def _deployed_department(node_config: Mapping[str, Any], settings: RunSettings) -> Department:
    return DepartmentHost.from_config(node_config).for_run(settings)


@functools.lru_cache(maxsize=8)
def _policy(text: str) -> DepartmentPolicy:
    return DepartmentPolicy.from_json(text)


@functools.lru_cache(maxsize=4)
def _run_schema(schema_json: str, label_column: str) -> DataSchema:
    # The run's public schema decides every encoding; the department's own label
    # column name may differ from the coordinator's.
    return DataSchema.from_json(schema_json, "the run's data schema").with_label_column(label_column)


@functools.lru_cache(maxsize=4)
def _load_own_table(path: str, label_column: str, schema_json: str, limits: RunLimits, model: str = "auto",
                    bases: tuple[str, ...] = ()) -> Dataset:
    schema = _run_schema(schema_json, label_column)
    if schema.token_column is not None:  # tokenized with this host's own copy of the run's base
        schema = bind_tokenizer(schema, find_base(model, bases, "this department's base models") if is_pretrained(model) else None)
    data, left_out = load_records(Path(path), schema)
    # Checked at `department start` too; the table may have grown since.
    over = limits.check_table(data.num_records)
    if over:
        raise ValueError("; ".join(over))
    if left_out:  # on this host only: the run learns nothing of it
        log.warning("%d of %d rows of %s do not encode with this run's schema and are left out of it; "
                    "`fedsilo schema check` names them", left_out, data.num_records, path)
    return data
