"""What a reader sees of the robustness numbers: tables of formatted cells, targets, the plot and the text.

Everything here is a function of the cells :mod:`.robustness` measured and its
:class:`~.robustness.Setup`, so a saved ``robustness.json`` re-renders without training;
the sentences live in ``templates/robustness.md.j2``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .common import Table, Target
from .prose import prose

TEMPLATE = "robustness.md.j2"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _summary(cells: list[dict[str, Any]]) -> dict[str, float]:
    finals = [c["accuracy"][-1] for c in cells]
    return {"mean": statistics.fmean(finals), "min": min(finals), "max": max(finals)}


def _attacker(cells: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    return next(runs[0]["attacker"] for by_attack in cells.values() for runs in by_attack.values() if runs)


def _cell_text(cells: list[dict[str, Any]]) -> str:
    s = _summary(cells)
    return _pct(s["mean"]) if len(cells) == 1 else f"{_pct(s['mean'])} ({100 * s['min']:.1f}–{100 * s['max']:.1f})"


def tables(data: dict[str, Any], setup: Any) -> list[Table]:
    cells = data["cells"]
    accuracy = Table(
        prose(TEMPLATE, "accuracy_table", setup=setup, attacker=_attacker(cells)),
        ["rule", *setup.attacks],
        [[rule, *(_cell_text(cells[rule][a]) for a in setup.attacks)] for rule in setup.rules],
    )
    rows = []
    for attack in setup.attacks:
        for rule in setup.rules:
            runs = cells[rule][attack]
            honest = [n for c in runs for n in c["honest_norm"]]
            attacker = [n for c in runs for n in c["attacker_norm"]]
            clipped = sum(len(r) for c in runs for r in c["clipped"])
            picked = [s for c in runs for s in c["krum_selected"]]
            rows.append([
                attack, rule,
                f"{statistics.median(honest):.2f}", f"{statistics.median(attacker):.2f}",
                f"{clipped} of {len(runs) * setup.rounds * setup.departments}" if rule == "fedavg+bound" else "—",
                (f"{sum(1 for s in picked if s == _attacker(cells))} of {len(picked)}" if rule == "krum" else "—"),
                f"{statistics.fmean(c['seconds'] for c in runs):.1f}",
            ])
    details = Table(
        prose(TEMPLATE, "details_table"),
        ["attack", "rule", "honest norm", "attacker norm", f"updates clipped to B = {setup.max_update_norm:g}",
         f"Krum picked {_attacker(cells)} (the attacker; honest under 'none')", "s per run"],
        rows,
    )
    return [accuracy, details]


def targets(data: dict[str, Any], setup: Any, robust: tuple[str, ...], margin: float, cost: float) -> list[Target]:
    """Each ``robust`` rule ``margin`` points above FedAvg under the scaled attack, and each rule within ``cost`` of it without one."""
    cells = data["cells"]
    out = []
    if "scaled" in setup.attacks and "fedavg" in setup.rules:
        fedavg = _summary(cells["fedavg"]["scaled"])
        for rule in [r for r in robust if r in setup.rules]:
            own = _summary(cells[rule]["scaled"])
            worst = 100 * (own["min"] - fedavg["max"])
            met = worst >= margin
            out.append(Target(
                prose(TEMPLATE, "margin_target", rule=rule, margin=margin, setup=setup),
                prose(TEMPLATE, "margin_measured", robust=_pct(own["mean"]), fedavg=_pct(fedavg["mean"]),
                      gap=100 * (own["mean"] - fedavg["mean"]), worst=worst),
                met,
                prose(TEMPLATE, "margin_note", setup=setup, rule=rule, met=met),
            ))
    if "none" in setup.attacks and "fedavg" in setup.rules:
        base = _summary(cells["fedavg"]["none"])
        for rule in [r for r in setup.rules if r != "fedavg"]:
            own = _summary(cells[rule]["none"])
            lower = 100 * (base["mean"] - own["mean"])
            met = lower <= cost
            out.append(Target(
                prose(TEMPLATE, "cost_target", rule=rule, cost=cost),
                prose(TEMPLATE, "cost_measured", own=_pct(own["mean"]), base=_pct(base["mean"]), lower=lower),
                met,
                prose(TEMPLATE, "cost_note", setup=setup, rule=rule, met=met),
            ))
    return out


def text(data: dict[str, Any], setup: Any, quick: bool, delta: float, accountant: str) -> str:
    """The paragraph under the title: the federation, the attack, the rules, the machine."""
    cells = data["cells"]
    mech = next(runs[0] for by_attack in cells.values() for runs in by_attack.values() if runs)["mechanisms"]
    m = data.get("machine") or {}
    return prose(
        TEMPLATE, "text", setup=setup, quick=quick, delta=delta, accountant=accountant,
        sizes=data["department_sizes"], num_test=data["num_test"], attacker=_attacker(cells),
        epsilon=max(c["epsilon"] for r in cells.values() for runs in r.values() for c in runs),
        mechanism=next(iter(mech.values())), m={k: m.get(k) for k in ("cpu", "cores", "gpu", "torch")},
    )


def plot(data: dict[str, Any], setup: Any, path: Path) -> None:
    """Held-out accuracy per round, one panel per attack, one line per rule (mean over runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cells = data["cells"]
    fig, axes = plt.subplots(1, len(setup.attacks), figsize=(5.2 * len(setup.attacks), 4.4), squeeze=False,
                             sharey=True)
    colors = dict(zip(("fedavg", "trimmed-mean", "median", "krum", "fedavg+bound"), ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")))
    rounds = list(range(1, setup.rounds + 1))
    for ax, attack in zip(axes[0], setup.attacks):
        for rule in setup.rules:
            runs = cells[rule][attack]
            mean = [100 * statistics.fmean(c["accuracy"][i] for c in runs) for i in range(setup.rounds)]
            ax.plot(rounds, mean, marker="o", markersize=3, color=colors.get(rule), label=rule)
        ax.set_title(f"attack: {attack}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
