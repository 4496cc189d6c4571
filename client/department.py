"""Who this department is, where its data and ledger live, from a Flower Context.

In a simulation Flower gives each virtual SuperNode ``partition-id`` and
``num-partitions``: the department rebuilds its own partition of the embedded
dataset.  A deployed SuperNode (``fedsilo department start``) is given
``department``, ``data-path``, ``label-column``, ``ledger-dir`` and
``max-epsilon`` in its node config: its data and its ledger stay on its host,
and its budget is its own, whatever the run asks for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedsilo.shared.config import RunSettings
from fedsilo.shared.data import Dataset, TableSchema, federation_data, load_table, split_columns
from fedsilo.shared.ledger import ledger_path
from fedsilo.shared.signing import Signer, simulated_identity


@dataclass(frozen=True)
class Department:
    name: str
    data: Dataset
    ledger_path: Path
    max_epsilon: float
    signing_key: Path  # the key that signs its ledger entries

    @property
    def signer(self) -> Signer:
        return _signer(str(self.signing_key))


@functools.lru_cache(maxsize=64)
def _signer(path: str) -> Signer:
    return Signer.from_file(path)


def simulated_department_name(partition_id: int, num_partitions: int) -> str:
    width = max(2, len(str(max(num_partitions - 1, 0))))
    return f"dept-{partition_id:0{width}d}"


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
    parts, _ = federation_data(
        settings.dataset,
        settings.label_column,
        split_columns(settings.feature_columns),
        total,
        settings.partition,
        settings.seed,
    )
    name = simulated_department_name(pid, total)
    ledger_dir = Path(settings.out).expanduser().resolve() / "ledgers"
    max_epsilon = float(node_config.get("max-epsilon", settings.max_epsilon))
    if settings.dp:
        simulated_identity(ledger_dir, name)  # a key of its own, kept beside its ledger
    return Department(name, parts[pid], ledger_path(ledger_dir, name), max_epsilon, ledger_dir / f"{name}.key")


def _deployed_department(node_config: Mapping[str, Any], settings: RunSettings) -> Department:
    for key in ("department", "ledger-dir", "identity-key"):
        if key not in node_config:
            raise ValueError(f"node config lacks '{key}'; start departments with `fedsilo department start`")
    if not settings.data_schema:
        raise ValueError(
            "this run carries no data-schema; submit deployment runs with `fedsilo coordinator run`"
        )
    data = _load_own_table(
        str(node_config["data-path"]),
        str(node_config.get("label-column", "label")),
        settings.data_schema,
    )
    name = str(node_config["department"])
    max_epsilon = float(node_config.get("max-epsilon", settings.max_epsilon))
    ledger = ledger_path(Path(str(node_config["ledger-dir"])), name)
    # The department signs its ledger with the key that is its identity.
    return Department(name, data, ledger, max_epsilon, Path(str(node_config["identity-key"])))


@functools.lru_cache(maxsize=4)
def _load_own_table(path: str, label_column: str, schema_json: str) -> Dataset:
    schema = TableSchema.from_json(schema_json)
    # The department's own label column name may differ from the coordinator's.
    local = TableSchema(label_column, schema.features, schema.classes, schema.mean, schema.scale)
    return load_table(Path(path), label_column, schema=local)
