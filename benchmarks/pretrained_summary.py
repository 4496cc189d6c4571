"""What a reader sees of the pretrained-model benchmark: its table, targets, plot and text.

Everything here is a function of the ``raw`` data :mod:`.pretrained` saves (the cells and
the setup), so a saved ``pretrained.json`` re-renders without training anything; the
sentences live in ``templates/pretrained.md.j2``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .common import Table, Target
from .prose import prose
from .utility_summary import _eps, _pct, _se_points

TEMPLATE = "pretrained.md.j2"
LABELS = {"dp_lora": "DP-LoRA (MiniLM, ε target)", "lora": "LoRA without DP (MiniLM)",
          "mlp": "hashed n-gram MLP (ε target)"}
COLUMNS = ["model", "accuracy", "ledger ε (max)", "s/round (median, rounds ≥ 2)", "upload B/department/round",
           "whole model B", "whole / upload", "peak memory GiB (all processes)"]


def _number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _bytes(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def ratio(cell: dict[str, Any]) -> float | None:
    """How many uploads the whole model is: what sending the whole model each round would cost."""
    if not cell.get("upload_bytes") or not cell.get("whole_model_bytes"):
        return None
    return cell["whole_model_bytes"] / cell["upload_bytes"]


def _row(cell_name: str, cell: dict[str, Any], setup: dict[str, Any]) -> list[str]:
    label = LABELS[cell_name].replace("ε target", f"ε = {setup['epsilon']:g}")
    times = ratio(cell)
    return [
        label, _pct(cell["accuracy"]), "∞ (no DP)" if cell_name == "lora" else _eps(cell.get("max_epsilon")),
        _number(cell["seconds_per_round"]),
        _bytes(cell["upload_bytes"]), _bytes(cell["whole_model_bytes"]),
        "—" if times is None else f"{times:,.0f}×", _number(cell["peak_memory_bytes"] / 2**30),
    ]


def _table(raw: dict[str, Any]) -> Table:
    setup = raw["setup"]
    cells = raw["cells"]
    first = next(iter(cells.values()))
    return Table(
        prose(TEMPLATE, "table", setup=setup, num_test=setup["test_rows"], departments=first.get("departments", {})),
        COLUMNS, [_row(name, cells[name], setup) for name in LABELS if name in cells])


def gap_points(cells: dict[str, Any]) -> float | None:
    """LoRA without DP minus DP-LoRA, in accuracy points (positive: DP is behind)."""
    if "dp_lora" not in cells or "lora" not in cells:
        return None
    return 100 * (cells["lora"]["accuracy"] - cells["dp_lora"]["accuracy"])


def _targets(raw: dict[str, Any], gap_target: float, traffic_ratio: float) -> list[Target]:
    setup, cells = raw["setup"], raw["cells"]
    n = setup["test_rows"]
    gap = gap_points(cells)
    se = None if gap is None else math.hypot(_se_points(cells["dp_lora"]["accuracy"], n),
                                             _se_points(cells["lora"]["accuracy"], n))
    mlp = cells.get("mlp")
    targets = [Target(
        prose(TEMPLATE, "gap_target", gap_points=gap_target, epsilon=setup["epsilon"]),
        "not measured (quick run without the non-private cell)" if gap is None else prose(
            TEMPLATE, "gap_measured", dp=_pct(cells["dp_lora"]["accuracy"]), plain=_pct(cells["lora"]["accuracy"]),
            gap=gap),
        None if gap is None else gap <= gap_target,
        "" if gap is None else prose(
            TEMPLATE, "gap_note", se=se, n=n, met=gap <= gap_target, setup=setup,
            mlp_gap=None if mlp is None else 100 * (cells["dp_lora"]["accuracy"] - mlp["accuracy"])),
    )]
    dp = cells.get("dp_lora")
    times = None if dp is None else ratio(dp)
    targets.append(Target(
        prose(TEMPLATE, "traffic_target", ratio=traffic_ratio),
        "not measured" if times is None else prose(TEMPLATE, "traffic_measured", up=dp["upload_bytes"],
                                                   whole=dp["whole_model_bytes"], times=times),
        None if times is None else times >= traffic_ratio,
        "" if times is None else prose(TEMPLATE, "traffic_note", model=dp["model_bytes"]),
    ))
    return targets


def summarize(raw: dict[str, Any], gap_target: float, traffic_ratio: float) -> dict[str, Any]:
    """Title, text, table and targets from ``raw`` (what :func:`~.pretrained.build_result` saves)."""
    setup = raw["setup"]
    dp = raw["cells"].get("dp_lora")
    return {
        "title": prose(TEMPLATE, "title"),
        "text": prose(TEMPLATE, "text", setup=setup, delta=raw["delta"], dp=dp),
        "tables": [_table(raw)],
        "targets": _targets(raw, gap_target, traffic_ratio),
    }


def plot(raw: dict[str, Any], path: Path) -> None:
    """Accuracy after each round, one line per model; the bytes per round beside it (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cells = raw["cells"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.4))
    colors = {"dp_lora": "tab:blue", "lora": "tab:green", "mlp": "tab:red"}
    setup = raw["setup"]
    for name in LABELS:
        cell = cells.get(name)
        if cell is None:
            continue
        label = LABELS[name].replace("ε target", f"ε = {setup['epsilon']:g}")
        curve = [100 * a for a in cell["curve"] if a is not None]
        left.plot(range(1, len(curve) + 1), curve, marker="o", color=colors[name], label=label)
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.set_xlabel("round")
    left.set_ylabel("held-out accuracy (%)")
    left.set_title(f"{setup['departments']} departments, {setup['train_rows']:,} reviews")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    names = [n for n in LABELS if n in cells and cells[n]["upload_bytes"]]
    ups = [cells[n]["upload_bytes"] for n in names]
    wholes = [cells[n]["whole_model_bytes"] for n in names]
    at = range(len(names))
    right.bar([i - 0.2 for i in at], ups, width=0.4, color="tab:blue", label="upload per department per round")
    right.bar([i + 0.2 for i in at], wholes, width=0.4, color="tab:gray", label="the whole model")
    right.set_yscale("log")
    right.set_xticks(list(at))
    right.set_xticklabels([LABELS[n].split(" (")[0] for n in names], fontsize=8)
    right.set_ylabel("bytes")
    right.legend(fontsize=8)
    right.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
