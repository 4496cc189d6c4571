"""What a reader sees of the secure-aggregation benchmark: tables, the target, the plot and the text.

Everything here is a function of the ``raw`` data :mod:`.secure_aggregation` saves
(the cells per dataset, the cost cells and the setup), so a saved ``secagg.json``
re-renders without training anything; the sentences live in ``templates/secagg.md.j2``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .common import Table, Target
from .prose import prose
from .utility_summary import _eps, _key, _pct, _se_points

TEMPLATE = "secagg.md.j2"
MODES = (("plain", "plain FedAvg (local DP)"), ("secagg", "--secure-aggregation (local DP)"),
         ("ddp", "--distributed-dp"))


def _acc(cell: dict[str, Any] | None) -> str:
    return "—" if cell is None else _pct(cell["accuracy"])


def _bytes(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _seconds(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def gap_points(cell: dict[str, Any], baseline: str = "same_sigma") -> float:
    """Pooled DP-SGD minus distributed DP, in accuracy points (positive: distributed DP is behind)."""
    return 100 * (cell[baseline]["accuracy"] - cell["ddp"]["accuracy"])


def gap_se(cell: dict[str, Any], n: int, baseline: str = "same_sigma") -> float:
    """Binomial standard error of :func:`gap_points` on ``n`` test examples (two independent runs)."""
    return math.hypot(_se_points(cell["ddp"]["accuracy"], n), _se_points(cell[baseline]["accuracy"], n))


def _table(dataset: str, rec: dict[str, Any], setup: dict[str, Any]) -> Table:
    rows = []
    for eps in setup["epsilons"]:
        c = rec["cells"][_key(eps)]
        local = c["local"]
        rows.append([
            f"ε = {eps:g}",
            _acc(c["ddp"]), _eps(c["ddp"]["max_epsilon"]),
            f"{c['ddp']['noise_multiplier']:.3f}", f"{c['ddp']['sum_noise_multiplier']:.3f}",
            _acc(c["same_sigma"]), f"{gap_points(c):+.1f} ± {gap_se(c, rec['num_test']):.1f}",
            _acc(c["sum_noise"]),
            f"{c['pld_sigma']['noise_multiplier']:.3f}", _acc(c["pld_sigma"]),
            "—" if local is None else f"{_pct(local['accuracy'])} (ε {_eps(local['max_epsilon'])})",
        ])
    sizes = rec["department_sizes"]
    return Table(
        prose(TEMPLATE, "dataset_table", dataset=dataset, setup=setup, sizes=sizes, rec=rec,
              batch=rec["sample_rate"] * rec["num_train"]),
        ["setting", "distributed DP acc", "its ledger ε", "σ (Skellam plan)", "σ in the sum",
         "pooled DP-SGD, same σ", "gap (points ± SE)", "pooled, the sum's noise", "PLD σ", "pooled, PLD σ",
         "local DP (max ε)"],
        rows,
    )


COST_COLUMNS = ["mode", "rounds", "s/round (median, rounds ≥ 2)", "upload B/department/round",
                "download B/department/round", "set-up s", "set-up B (all departments)", "masked vector", "final acc"]


def cost_rows(cost: dict[str, Any]) -> list[list[str]]:
    """One row per mode of :data:`MODES` that ``cost`` holds (:func:`.secure_aggregation.round_costs`' cells)."""
    rows = []
    for mode, label in MODES:
        c = cost.get(mode)
        if c is None:
            continue
        rows.append([
            label, str(c["rounds"]), _seconds(c["median_round_seconds"]),
            _bytes(c["upload_bytes"]), _bytes(c["download_bytes"]),
            _seconds(c["setup_seconds"]), _bytes(c["setup_bytes"]),
            "—" if c["modulus_bits"] is None else f"{c['vector_length']:,} × {c['modulus_bits']} bits",
            _pct(c["accuracy"]),
        ])
    return rows


def _cost_table(cost: dict[str, Any], setup: dict[str, Any]) -> Table:
    return Table(prose(TEMPLATE, "cost_table", cost=cost, setup=setup), COST_COLUMNS, cost_rows(cost))


def _targets(raw: dict[str, Any], gap_target: float) -> list[Target]:
    """Distributed DP within ``gap_target`` points of centralized DP-SGD on the pooled data at the same ε (its
    own PLD-planned σ), q and steps, at the largest ε."""
    setup = raw["setup"]
    top = max(setup["epsilons"])
    targets = []
    for dataset, rec in raw["datasets"].items():
        n = rec["num_test"]
        c = rec["cells"][_key(top)]
        gap = gap_points(c, "pld_sigma")
        met = gap <= gap_target
        others = [(e, gap_points(rec["cells"][_key(e)], "pld_sigma"), gap_se(rec["cells"][_key(e)], n, "pld_sigma"))
                  for e in setup["epsilons"] if e != top]
        targets.append(Target(
            prose(TEMPLATE, "gap_target", gap_points=gap_target, top=top, dataset=dataset),
            prose(TEMPLATE, "gap_measured", d_acc=_pct(c["ddp"]["accuracy"]), d_eps=_eps(c["ddp"]["max_epsilon"]),
                  p_acc=_pct(c["pld_sigma"]["accuracy"]), sigma=c["pld_sigma"]["noise_multiplier"], gap=gap),
            met,
            prose(TEMPLATE, "gap_note", n=n, c=c, met=met, se=gap_se(c, n, "pld_sigma"), others=others,
                  sum_gap=gap_points(c, "sum_noise"), same_gap=gap_points(c),
                  ratio=c["ddp"]["sum_noise_multiplier"] / c["ddp"]["noise_multiplier"],
                  local_gap=None if c["local"] is None else 100 * (c["ddp"]["accuracy"] - c["local"]["accuracy"])),
        ))
    return targets


def _text(raw: dict[str, Any]) -> str:
    setup = raw["setup"]
    first = next(iter(raw["datasets"].values()))
    ddp = first["cells"][_key(max(setup["epsilons"]))]["ddp"]
    return prose(TEMPLATE, "text", setup=setup, delta=raw["delta"], accountant=raw["accountant"], ddp=ddp,
                 epsilons=", ".join(f"{e:g}" for e in setup["epsilons"]), cost=raw["cost"])


def summarize(raw: dict[str, Any], gap_target: float) -> dict[str, Any]:
    """Title, text, tables and targets from ``raw`` (what :func:`~.secure_aggregation.build_result` saves)."""
    setup = raw["setup"]
    return {
        "title": prose(TEMPLATE, "title"),
        "text": _text(raw),
        "tables": [*(_table(d, rec, setup) for d, rec in raw["datasets"].items()), _cost_table(raw["cost"], setup)],
        "targets": _targets(raw, gap_target),
    }


def plot(raw: dict[str, Any], path: Path) -> None:
    """Accuracy vs target ε (log x), one panel per dataset, every way of training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = raw["setup"]
    results = raw["datasets"]
    fig, axes = plt.subplots(1, len(results), figsize=(max(8.0, 6.2 * len(results)), 5.2), squeeze=False)
    styles = {
        "ddp": ("tab:blue", "o", "-", "distributed DP (fedsilo simulate)"),
        "same_sigma": ("tab:green", "s", "-", "pooled DP-SGD, same σ, q, steps"),
        "sum_noise": ("tab:olive", "D", ":", "pooled DP-SGD at the noise in the sum"),
        "pld_sigma": ("tab:purple", "v", "--", "pooled DP-SGD at its PLD σ"),
        "local": ("tab:red", "^", "-", "local DP (fedsilo default, no secure aggregation)"),
    }
    eps = list(setup["epsilons"])
    for ax, (dataset, rec) in zip(axes[0], results.items()):
        for name, (color, marker, line, label) in styles.items():
            cells = [rec["cells"][_key(e)][name] for e in eps]
            points = [(e, 100 * c["accuracy"]) for e, c in zip(eps, cells) if c is not None]
            if points:
                ax.plot(*zip(*points), line, color=color, marker=marker, label=label)
        ax.set_xscale("log")
        ax.set_xticks(eps)
        ax.set_xticklabels([f"{e:g}" for e in eps])
        ax.minorticks_off()
        ax.set_xlabel(f"target whole-history ε at δ = {raw['delta']:g}")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"{dataset}: {setup['departments']} departments, {rec['steps']} steps")
        ax.grid(True, alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
