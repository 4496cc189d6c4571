"""What a reader sees of the accounting numbers: tables of formatted cells, targets, the ε-vs-rounds plot, the text.

Everything here is a function of the ``raw`` data :mod:`.accounting_tightness` saves,
so a saved ``accounting.json`` re-renders without recomputing an ε; the sentences
live in ``templates/accounting.md.j2``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from fedsilo.shared.accounting import ACCOUNTANTS

from .common import Table, Target
from .prose import prose

TEMPLATE = "accounting.md.j2"
DEPARTMENT_DEFAULT = ACCOUNTANTS[0]  # a department policy's default accountant
# The department default first, then the others it is compared with.
DEPARTMENT_ORDER = (DEPARTMENT_DEFAULT, *(a for a in ("pld", "prv", "rdp") if a != DEPARTMENT_DEFAULT))
LABELS = {
    "prv": "PRV (Opacus)",
    "rdp": "RDP (Opacus)",
    "pld": "PLD (dp-accounting)",
    "rdp_dpacc": "RDP (dp-accounting)",
}
TIMED = ("prv", "rdp", "pld")  # the accountants whose cost per call is measured


def _e(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _r(lo: float, hi: float) -> str:
    return f"{lo:.3f}" if abs(hi - lo) < 5e-4 else f"{lo:.3f}–{hi:.3f}"


def _t(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _short(name: str) -> str:
    return LABELS[name].split(" (")[0]


def _timed_label(name: str) -> str:
    return LABELS[name] + (" — department default" if name == DEPARTMENT_DEFAULT else "")


def _ratio_range(rows: list[dict[str, Any]], num: str, den: str) -> tuple[float, float] | None:
    vals = [r["epsilon"][num] / r["epsilon"][den] for r in rows if r["epsilon"].get(num) and r["epsilon"].get(den)]
    return (min(vals), max(vals)) if vals else None


def _over(tight: dict[str, Any], name: str) -> str:
    lo, hi = tight["default_over"].get(name, (float("nan"), float("nan")))
    return _r(lo, hi)


def _rounds_timed(timing: dict[str, dict[str, float]]) -> list[int]:
    return [int(k) for k in timing[DEPARTMENT_DEFAULT] if k.isdigit()]


def tables(raw: dict[str, Any], quick: bool) -> list[Table]:
    """Record level by target and by department, client level, and the seconds per ε call."""
    s, records, timing = raw["settings"], raw["record_level"], raw["seconds_per_call"]
    target_rows = []
    for target in s["targets"]:
        rows = [r for r in records if r["target"] == target]
        sigmas = [r["noise_multiplier"] for r in rows]
        cells = [f"{target:g}", str(len(rows)), _r(min(sigmas), max(sigmas))]
        for name in DEPARTMENT_ORDER:
            vals = [r["epsilon"][name] for r in rows if r["epsilon"][name] is not None]
            cells.append(f"{_e(max(vals))} / {_e(statistics.median(vals))}" if vals else "–")
        for num in DEPARTMENT_ORDER[1:]:
            rr = _ratio_range(rows, num, DEPARTMENT_DEFAULT)
            cells.append(_r(*rr) if rr else "–")
        target_rows.append(cells)
    dept_rows = [
        [str(r["department"]), str(r["examples"]), f"{r['sample_rate']:.3g}", str(r["steps_per_round"]),
         f"{r['noise_multiplier']:.3f}", *(_e(r["epsilon"][name]) for name in DEPARTMENT_ORDER)]
        for r in records if r["target"] == s["curve_target"]
    ]
    central_rows = []
    for r in raw["client_level"]:
        eps = r["eps"]
        others = [eps[o] for o in ("prv", "rdp", "rdp_dpacc") if eps.get(o) is not None]
        central_rows.append([
            f"{r['sigma']:g}", f"{r['q']:g}", str(r["rounds"]), _e(eps["pld"]), _e(eps["prv"]), _e(eps["rdp"]),
            _e(eps["rdp_dpacc"]), f"{eps['pld'] / min(others):.4f}" if eps.get("pld") and others else "–",
        ])
    rounds_list, distinct = _rounds_timed(timing), f"{s['rounds']}-distinct"
    time_columns = ["accountant", *(f"R={r}" for r in rounds_list)]
    if not quick:
        time_columns.append(f"R={s['rounds']}, all rounds distinct")
    time_rows = [
        [_timed_label(name), *(_t(timing[name][str(r)]) for r in rounds_list),
         *([_t(timing[name][distinct])] if not quick else [])]
        for name in TIMED
    ]
    return [
        Table(prose(TEMPLATE, "record_table", s=s),
              ["target ε", "departments", "σ",
               *(name.upper() + (" (default)" if name == DEPARTMENT_DEFAULT else "") for name in DEPARTMENT_ORDER),
               *(f"{o.upper()}/{DEPARTMENT_DEFAULT.upper()}" for o in DEPARTMENT_ORDER[1:])],
              target_rows),
        Table(prose(TEMPLATE, "department_table", curve_target=s["curve_target"]),
              ["department", "examples", "q", "steps/round", "σ", *(n.upper() for n in DEPARTMENT_ORDER)], dept_rows),
        Table(prose(TEMPLATE, "client_table", s=s),
              ["σ", "q", "rounds", "PLD (default)", "PRV (Opacus)", "RDP (Opacus)", "RDP (dp-accounting)",
               "PLD / tightest other"],
              central_rows),
        Table(prose(TEMPLATE, "time_table", calls=1 if quick else s["reps"], train=_t(raw["round_training_seconds"])),
              time_columns, time_rows),
    ]


def targets(raw: dict[str, Any], labels: dict[str, str]) -> list[Target]:
    """Tightest sound accountant (departments, client level) and the ε call's share of a round.

    ``labels``: dp-cost's configuration labels, for its epochs in ``raw["dp_cost_reference"]``.
    """
    s, timing, train_s = raw["settings"], raw["seconds_per_call"], raw["round_training_seconds"]
    default, dept_tight, central_tight = _short(DEPARTMENT_DEFAULT), raw["record_level_tightness"], raw["client_level_tightness"]
    eps_targets = ", ".join(f"{t:g}" for t in s["targets"])
    fine = raw["prv_fine_eps_error"]
    dept_target = Target(
        prose(TEMPLATE, "department_target", default=default),
        prose(TEMPLATE, "department_measured", default=default, targets=eps_targets, t=dept_tight,
              ratios=[(_short(o), _over(dept_tight, o)) for o in DEPARTMENT_ORDER[1:]]),
        dept_tight["ok"],
        prose(TEMPLATE, "department_note", fine=fine, fine_call=_t(fine["seconds"]), t=dept_tight, default=default),
    )
    central_target = Target(
        prose(TEMPLATE, "client_target"),
        prose(TEMPLATE, "client_measured", t=central_tight,
              over={o: _over(central_tight, o) for o in ("prv", "rdp", "rdp_dpacc")}),
        central_tight["ok"],
        prose(TEMPLATE, "client_note"),
    )
    rounds = str(s["rounds"])
    per_call = timing[DEPARTMENT_DEFAULT][rounds]
    fraction = per_call / (per_call + train_s)
    fastest = min(TIMED, key=lambda n: timing[n][rounds])
    bigger = [
        {"label": labels.get(c, c), "examples": v["examples"], "epoch": _t(v["seconds"]),
         "percent": 100 * per_call / (per_call + v["seconds"])}
        for c, v in (raw["dp_cost_reference"] or {}).items()
    ]
    m, missed = raw["timing_mechanism"], fraction > s["small_fraction"]
    time_target = Target(
        prose(TEMPLATE, "time_target", s=s),
        prose(TEMPLATE, "time_measured", per_call=_t(per_call), default=default, s=s, train=_t(train_s), m=m,
              fraction=fraction),
        fraction <= s["small_fraction"],
        prose(TEMPLATE, "time_note", m=m, plan_max=raw["plan_seconds_max"], missed=missed, default=default,
              fastest=LABELS[fastest] if fastest != DEPARTMENT_DEFAULT else None,
              speedup=timing[DEPARTMENT_DEFAULT][rounds] / timing[fastest][rounds], bigger=bigger),
    )
    return [dept_target, central_target, time_target]


def text(raw: dict[str, Any], quick: bool) -> str:
    """The paragraph under the title: what was planned, composed and timed."""
    s = raw["settings"]
    return prose(TEMPLATE, "text", s=s, sizes=raw["department_sizes"], quick=quick, m=raw["timing_mechanism"],
                 targets=", ".join(f"{t:g}" for t in s["targets"]), default_label=LABELS[DEPARTMENT_DEFAULT],
                 calls=1 if quick else s["reps"], curve_target=s["curve_target"])


def summarize(raw: dict[str, Any], quick: bool, labels: dict[str, str]) -> dict[str, Any]:
    """Title, text, tables and targets from ``raw`` (``labels``: dp-cost's configuration labels)."""
    return {"title": prose(TEMPLATE, "title"), "text": text(raw, quick), "tables": tables(raw, quick),
            "targets": targets(raw, labels)}


def plot_curve(raw: dict[str, Any], path: Path) -> None:
    """Whole-history ε against rounds for the timed department's mechanism, one line per accountant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, m = raw["settings"], raw["timing_mechanism"]
    target, rounds = s["curve_target"], s["rounds"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, style in (("prv", "-o"), ("rdp", "--s"), ("pld", ":^")):
        points = [(r, e) for r, e in raw["curve"].get(name, []) if e is not None]
        if points:
            ax.plot(*zip(*points), style, markersize=3.5, label=_timed_label(name))
    ax.axhline(target, color="grey", lw=0.8)
    ax.axvline(rounds, color="grey", lw=0.8, ls="--")
    ax.annotate(f"planned: ε={target:g} after {rounds} rounds", (rounds, target), xytext=(4, -14),
                textcoords="offset points", fontsize=8, color="grey")
    ax.set_xlabel("rounds")
    ax.set_ylabel(f"whole-history ε at δ={s['delta']:g}")
    ax.set_title(
        f"One digits department: σ={m['noise_multiplier']:.3g}, q={m['sample_rate']:.3g}, "
        f"{m['steps_per_round']} steps/round", fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
