"""What a reader sees of the privacy–utility numbers: tables of formatted cells, targets, the plot and the text.

Everything here is a function of the ``raw`` data :mod:`.utility` saves (the cells per
dataset, the setup and the hyperparameters), so a saved ``utility.json`` re-renders
without training anything; the sentences live in ``templates/utility.md.j2``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .common import Table, Target
from .prose import prose

TEMPLATE = "utility.md.j2"


def _key(epsilon: float | None) -> str:
    return "no-dp" if epsilon is None else f"eps{epsilon:g}"


def _setting(epsilon: float | None) -> str:
    return "no DP" if epsilon is None else f"ε = {epsilon:g}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def at_chance(cell: dict[str, Any], num_classes: int) -> bool:
    """The model guesses: chance accuracy at a loss of about ln(classes) (uniform predictions)."""
    loss = cell.get("loss")
    return (
        loss is not None and cell["accuracy"] <= 1.5 / num_classes
        and abs(loss - math.log(num_classes)) < 0.05 * math.log(num_classes)
    )


def _acc(cell: dict[str, Any], num_classes: int) -> str:
    return _pct(cell["accuracy"]) + (" (at chance)" if at_chance(cell, num_classes) else "")


def _eps(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _se_points(acc: float, n: int) -> float:
    """Binomial standard error of a test accuracy, in points."""
    return 100 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)


def _table(dataset: str, rec: dict[str, Any], setup: Any) -> Table:
    rows = []
    for eps in [*setup.epsilons, None]:
        k = _key(eps)
        f, c, r, rf = rec["fedsilo"][k], rec["centralized"][k], rec["recipe"][k], rec["recipe_fedsilo_hp"][k]
        rows.append([
            _setting(eps),
            _acc(f, rec["num_classes"]),
            _eps(f["max_epsilon"]),
            _acc(c, rec["num_classes"]),
            _eps(c["epsilon"]),
            _acc(r, rec["num_classes"]),
            _eps(r["reported_epsilon"]),
            _eps(r["honest_epsilon"]),
            _acc(rf, rec["num_classes"]),
        ])
    sizes = rec["department_sizes"]
    return Table(
        prose(TEMPLATE, "dataset_table", dataset=dataset, setup=setup, sizes=sizes, rec=rec),
        ["setting", "fedsilo acc", "fedsilo max ε", "centralized acc", "centralized ε", "recipe acc",
         "recipe reported ε", "recipe honest ε", "recipe acc, fedsilo's lr/batch"],
        rows,
    )


def _time_table(results: dict[str, Any], setup: Any) -> Table:
    rows = []
    for dataset, rec in results.items():
        for eps in [*setup.epsilons, None]:
            k = _key(eps)
            rows.append([
                dataset, _setting(eps),
                f"{rec['fedsilo'][k]['seconds']:.0f}",
                f"{rec['centralized'][k]['seconds']:.0f}",
                f"{rec['recipe'][k]['seconds']:.0f}",
                f"{rec['recipe_fedsilo_hp'][k]['seconds']:.0f}",
            ])
    return Table(
        prose(TEMPLATE, "time_table"),
        ["dataset", "setting", "fedsilo", "centralized", "recipe", "recipe, fedsilo's lr/batch"],
        rows,
    )


def _targets(results: dict[str, Any], setup: Any, gap_points: float, fedsilo_lr: float) -> list[Target]:
    """fedsilo within ``gap_points`` of centralized DP-SGD at the largest ε, and ahead of the recipe at every ε."""
    targets = []
    top = max(setup.epsilons)
    for dataset, rec in results.items():
        k, n = _key(top), rec["num_test"]
        f, c = rec["fedsilo"][k], rec["centralized"][k]
        gap = 100 * (c["accuracy"] - f["accuracy"])
        depts = f["departments"].values()
        nodp = [rec[name]["no-dp"] for name in ("centralized", "fedsilo")]
        met = gap <= gap_points
        note = prose(
            TEMPLATE, "gap_note", n=n, c=c, met=met, lr=fedsilo_lr,
            se=math.hypot(_se_points(f["accuracy"], n), _se_points(c["accuracy"], n)),
            sigmas=[d["noise_multiplier"] for d in depts], rates=[d["sample_rate"] for d in depts],
            # Noise std on one step's mean gradient, in units of C: σ / expected batch (N q).
            ratio=[d["noise_multiplier"] / (d["num_examples"] * d["sample_rate"]) for d in depts],
            pooled_ratio=c["noise_multiplier"] / (c["num_examples"] * c["sample_rate"]),
            nodp_gap=None if any(at_chance(x, rec["num_classes"]) for x in nodp)
            else 100 * (nodp[0]["accuracy"] - nodp[1]["accuracy"]),
        )
        targets.append(Target(
            prose(TEMPLATE, "gap_target", gap_points=gap_points, top=top, dataset=dataset),
            prose(TEMPLATE, "gap_measured", f_acc=_pct(f["accuracy"]), f_eps=_eps(f["max_epsilon"]),
                  c_acc=_pct(c["accuracy"]), c_eps=_eps(c["epsilon"]), gap=gap),
            met,
            note,
        ))
    for dataset, rec in results.items():
        n = rec["num_test"]
        for eps in setup.epsilons:
            k = _key(eps)
            f, r, rf = rec["fedsilo"][k], rec["recipe"][k], rec["recipe_fedsilo_hp"][k]
            diff = 100 * (f["accuracy"] - r["accuracy"])
            met = diff > 0
            cells = dict(f_acc=_pct(f["accuracy"]), f_eps=_eps(f["max_epsilon"]), r_acc=_pct(r["accuracy"]),
                         r_honest=_eps(r["honest_epsilon"]), r_reported=_eps(r["reported_epsilon"]))
            targets.append(Target(
                prose(TEMPLATE, "recipe_target", eps=eps, dataset=dataset),
                prose(TEMPLATE, "recipe_measured", diff=diff, **cells),
                met,
                prose(TEMPLATE, "recipe_note", rf_acc=_pct(rf["accuracy"]), rf_sigma=rf["noise_multiplier"],
                      same_hp=100 * (f["accuracy"] - rf["accuracy"]), se=_se_points(f["accuracy"], n), met=met,
                      **cells),
            ))
    return targets


def _at_chance_cells(results: dict[str, Any], setup: Any) -> dict[str, list[str]]:
    """The cells whose model ended at chance, grouped by optimizer settings (fedsilo's or the recipe's)."""
    groups: dict[str, list[str]] = {"fedsilo": [], "recipe": []}
    for dataset, rec in results.items():
        for e in [*setup.epsilons, None]:
            for name, group in (("fedsilo", "fedsilo"), ("centralized", "fedsilo"),
                                ("recipe_fedsilo_hp", "fedsilo"), ("recipe", "recipe")):
                if at_chance(rec[name][_key(e)], rec["num_classes"]):
                    label = name.replace("recipe_fedsilo_hp", "recipe with fedsilo's lr/batch")
                    groups[group].append(f"{dataset} {_setting(e)} {label}")
    return groups


def _text(raw: dict[str, Any], setup: Any) -> str:
    results = raw["datasets"]
    first = next(iter(results.values()))
    eps = next((first["recipe"][_key(e)] for e in setup.epsilons), None)
    if not eps:
        return ""
    chance = _at_chance_cells(results, setup)
    return prose(
        TEMPLATE, "text", setup=setup, epsilons=", ".join(f"{e:g}" for e in setup.epsilons), delta=raw["delta"],
        accountant=raw["accountant"], fhp=raw["fedsilo_hyperparameters"], rhp=raw["recipe_hyperparameters"],
        first_sigma=eps["noise_multiplier"], first_eps=setup.epsilons[0], first_dataset=next(iter(results)),
        chance_fedsilo=chance["fedsilo"], chance_recipe=chance["recipe"],
    )


def summarize(raw: dict[str, Any], setup: Any, gap_points: float) -> dict[str, Any]:
    """Title, text, tables and targets from ``raw`` and the run's ``setup`` (a :class:`~.utility.Setup`)."""
    results = raw["datasets"]
    return {
        "title": prose(TEMPLATE, "title"),
        "text": _text(raw, setup),
        "tables": [*(_table(d, rec, setup) for d, rec in results.items()), _time_table(results, setup)],
        "targets": _targets(results, setup, gap_points, raw["fedsilo_hyperparameters"]["learning_rate"]),
    }


def plot(results: dict[str, Any], setup: Any, delta: float, accountant: str, path: Path) -> None:
    """Accuracy vs ε (log x), one panel per dataset; no-DP levels as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(max(9.0, 6.2 * len(results)), 5.4), squeeze=False)
    styles = {
        "fedsilo": ("tab:blue", "o", "-"),
        "centralized": ("tab:green", "s", "-"),
        "recipe": ("tab:red", "^", "-"),
        "recipe_fedsilo_hp": ("tab:orange", "v", "--"),
    }
    labels = {
        "fedsilo": "fedsilo (ε: max over ledgers)",
        "centralized": "centralized DP-SGD, pooled data",
        "recipe": "Flower Opacus recipe (honest ε)",
        "recipe_fedsilo_hp": "recipe with fedsilo's lr/batch (honest ε)",
    }
    eps_field = {"fedsilo": "max_epsilon", "centralized": "epsilon", "recipe": "honest_epsilon",
                 "recipe_fedsilo_hp": "honest_epsilon"}
    for ax, (dataset, rec) in zip(axes[0], results.items()):
        for name, (color, marker, line) in styles.items():
            cells = [rec[name][_key(e)] for e in setup.epsilons]
            xs = [c[eps_field[name]] for c in cells]
            ys = [100 * c["accuracy"] for c in cells]
            ax.plot(xs, ys, line, color=color, marker=marker, label=labels[name])
            if not at_chance(rec[name]["no-dp"], rec["num_classes"]):  # a guessing model is no reference
                ax.axhline(100 * rec[name]["no-dp"]["accuracy"], color=color, linestyle=":", linewidth=1)
        cells = [rec["recipe"][_key(e)] for e in setup.epsilons]
        ax.scatter([c["reported_epsilon"] for c in cells], [100 * c["accuracy"] for c in cells],
                   facecolors="none", edgecolors="tab:red", marker="^", s=60,
                   label="recipe at the ε it reports (last round)")
        for c in cells:
            ax.annotate("", xy=(c["honest_epsilon"], 100 * c["accuracy"]),
                        xytext=(c["reported_epsilon"], 100 * c["accuracy"]),
                        arrowprops=dict(arrowstyle="->", color="tab:red", alpha=0.4))
        ax.set_xscale("log")
        ticks = sorted({*setup.epsilons, *[round(c["reported_epsilon"], 2) for c in cells]})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel(f"whole-history ε at δ = {delta:g} ({accountant.upper()}), log scale")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"{dataset}: {setup.departments} departments, {setup.rounds} rounds (dotted: no DP, if it trained)")
        ax.grid(True, alpha=0.3)
        ax.set_xlim(min(ticks) / 1.25, max(ticks) * 1.25)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
