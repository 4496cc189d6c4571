"""Who this department is, where its data and ledger live, from a Flower Context.

In a simulation Flower gives each virtual SuperNode ``partition-id`` and
``num-partitions``: the department rebuilds its own partition of the embedded
dataset.  A deployed SuperNode (next issue) is given ``department``,
``data-path`` and ``ledger-dir`` in its node config instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedsilo.shared.config import RunSettings
from fedsilo.shared.data import Dataset, federation_data, split_columns
from fedsilo.shared.ledger import ledger_path


@dataclass(frozen=True)
class Department:
    name: str
    data: Dataset
    ledger_path: Path
    max_epsilon: float


def simulated_department_name(partition_id: int, num_partitions: int) -> str:
    width = max(2, len(str(max(num_partitions - 1, 0))))
    return f"dept-{partition_id:0{width}d}"


def department_from_context(
    node_config: Mapping[str, Any], settings: RunSettings
) -> Department:
    """Resolve this node's department (simulation: from its partition id)."""
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
    return Department(name, parts[pid], ledger_path(ledger_dir, name), max_epsilon)
