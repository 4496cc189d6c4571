"""What a reader sees of the dp-cost numbers: tables of formatted cells, targets, the plot and the text.

Everything here is a function of the records :mod:`.dp_cost` measured and of the
settings it saved beside them (``raw``), so a saved ``dp-cost.json`` can be re-rendered
without re-measuring; the sentences live in ``templates/dp-cost.md.j2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import Table, Target
from .prose import prose

TEMPLATE = "dp-cost.md.j2"


def _s(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def _x(ratio: float | None) -> str:
    if ratio is None:
        return "–"
    return f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.0f}×"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


def default_mode(records: list[dict[str, Any]], config: str) -> str:
    """What fedsilo's ``auto`` grad-sample-mode ran for ``config``'s model (as its children resolved it)."""
    return next((r["default_mode"] for r in records if r["config"] == config and r.get("default_mode")), "ghost")


def targets_for(records: list[dict[str, Any]], labels: dict[str, str],
                target_ratio: float | dict[str, float]) -> list[Target]:
    """One target row per model (``labels``: config → label, in order): the default DP path within its ratio×.

    ``target_ratio``: one for every model, or per config (a saved result before per-model targets has one).
    """
    by = {(r["config"], r["variant"]): r for r in records}
    targets = []
    for config, label in labels.items():
        ratio_target = target_ratio.get(config, 2.0) if isinstance(target_ratio, dict) else target_ratio
        plain = by.get((config, "plain"))
        default = default_mode(records, config)
        dp = by.get((config, default))
        if plain is None and dp is None:
            continue
        target = prose(TEMPLATE, "target", default=default, target_ratio=ratio_target, label=label)
        if not (plain and plain.get("ok") and dp and dp.get("ok")):
            why = [
                f"{v} " + ("not run" if r is None else f"failed ({r.get('error', '')[:120]})")
                for v, r in (("plain", plain), (default, dp)) if r is None or not r.get("ok")
            ]
            targets.append(Target(target, prose(TEMPLATE, "not_measured", why=why), None))
            continue
        ratio = dp["median_s"] / plain["median_s"]
        steps = max(dp["steps"], 1)
        plain_ms = 1000 * plain["median_s"] / max(plain["steps"], 1)
        others = [
            (v, r["ratio"]) for (c, v), r in by.items()
            if c == config and v not in ("plain", default) and r.get("ok") and r.get("ratio")
        ]
        best = min(others, key=lambda vr: vr[1]) if others else None
        overhead = dp["median_s"] - plain["median_s"]
        setup = dp.get("setup_s")
        ghost_run = by.get((config, "ghost")) or {}
        measured = prose(TEMPLATE, "measured", ratio=ratio, dp_s=_s(dp["median_s"]), plain_s=_s(plain["median_s"]),
                         dp_ms=1000 * dp["median_s"] / steps, plain_ms=plain_ms)
        note = prose(
            TEMPLATE, "note", overhead=overhead, setup=setup, per_step=1000 * (overhead - (setup or 0.0)) / steps,
            plain_ms=plain_ms, default=default, best=(best[0], _x(best[1])) if best else None,
            materialized=dp.get("materialized_layers") or [], ghost_layers=dp.get("ghost_norm_layers") or ["none"],
            ghost_ratio=_x(ghost_run["ratio"]) if ghost_run.get("ok") and ghost_run.get("ratio") else None,
            missed=ratio > ratio_target, slow_setup=setup is not None and setup > 0.25 * overhead,
        )
        targets.append(Target(target, measured, ratio <= ratio_target, note))
    return targets


def tables(records: list[dict[str, Any]], labels: dict[str, str], reps: int) -> list[Table]:
    """Time per epoch and peak memory, one row per (model, variant)."""
    time_rows, mem_rows = [], []
    cuda = any(r.get("cuda_peak_allocated") for r in records)
    for r in records:
        label = labels[r["config"]]
        if r.get("ok"):
            secs = r["seconds"]
            time_rows.append([
                label, r["variant"], str(r["examples"]), str(r["steps"]), _s(r["median_s"]),
                f"{_s(min(secs))}–{_s(max(secs))}", f"{1000 * r['median_s'] / max(r['steps'], 1):.1f}",
                "–" if r.get("setup_s") is None else f"{1000 * r['setup_s']:.1f}", _x(r["ratio"]), "ok",
            ])
        else:
            time_rows.append([label, r["variant"], str(r.get("examples", "–")), "–", "–", "–", "–", "–", "–",
                              f"failed: {r.get('error', '')[:160]}".replace("|", "/").replace("\n", " ")])
        if "rss_peak" in r:
            row = [label, r["variant"], _mib(r["rss_after_imports"]), _mib(r["rss_loading_peak"]),
                   _mib(r["rss_before_training"]), _mib(r["rss_peak"]),
                   _mib(r["rss_peak"] - r["rss_before_training"])]
            if cuda:
                row.append(_mib(r.get("cuda_peak_allocated")))
            mem_rows.append(row)
    mem_columns = ["model", "variant", "RSS after imports", "peak while loading data", "RSS before training",
                   "peak RSS while training", "training increment"]
    if cuda:
        mem_columns.append("GPU peak allocated")
    return [
        Table(prose(TEMPLATE, "time_table", reps=reps),
              ["model", "variant", "examples", "steps", "s/epoch", "range (s)", "ms/step", "set-up (ms)",
               "× plain", "status"],
              time_rows),
        Table(prose(TEMPLATE, "memory_table"), mem_columns, mem_rows),
    ]


def text(records: list[dict[str, Any]], labels: dict[str, str], settings: dict[str, Any],
         ratios: dict[str, dict[str, float]], quick: bool) -> str:
    """The paragraph under the title: how it was measured, on what, and what failed."""
    m512 = ratios.get("mlp512-digits", {})
    return prose(
        TEMPLATE, "text", s=settings, reps=settings["reps"], jobs=settings["parallel_jobs"], quick=quick,
        sizes=[(labels[c], n) for c, n in {r["config"]: r.get("examples") for r in records if r.get("examples")}.items()],
        peak_reset=all(r.get("peak_reset", True) for r in records),
        cuda=any(r.get("cuda_peak_allocated") for r in records),
        device=next((r.get("device") for r in records if r.get("device")), "cpu"),
        threads=next((r.get("torch_threads") for r in records if r.get("torch_threads")), None),
        failed=sorted({f"{r['variant']} ({r['config']})" for r in records if not r.get("ok")}),
        mlp512={"hooks": _x(m512.get("hooks")), "ghost": _x(m512.get("ghost"))} if m512 else None,
    )


def summarize(raw: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Title, text, tables and targets of a result from its ``raw`` data (the measurement and a re-render alike)."""
    records, settings = raw["records"], raw["settings"]
    labels = {c: spec["label"] for c, spec in raw["configs"].items()}
    return {
        "title": prose(TEMPLATE, "title"),
        "text": text(records, labels, settings, raw["ratios"], quick),
        "tables": tables(records, labels, settings["reps"]),
        "targets": targets_for(records, labels, settings["target_ratio"]),
    }


def plot(records: list[dict[str, Any]], labels: dict[str, str], path: Path, reps: int) -> None:
    """Grouped bars: time per epoch by variant, one group per model, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in labels if any(r["config"] == c for r in records)]
    variants = list(dict.fromkeys(r["variant"] for r in records))  # the order they ran in
    by = {(r["config"], r["variant"]): r for r in records}
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    colors = plt.get_cmap("tab10").colors
    ok_values = [r["median_s"] for r in records if r.get("ok")]
    floor = min(ok_values) / 3 if ok_values else 1e-3
    for i, variant in enumerate(variants):
        xs, ys = [], []
        for j, config in enumerate(configs):
            x = j + (i - (len(variants) - 1) / 2) * width
            r = by.get((config, variant))
            if r is not None and r.get("ok"):
                xs.append(x)
                ys.append(r["median_s"])
                if r.get("ratio") and variant != "plain":
                    ax.annotate(_x(r["ratio"]), (x, r["median_s"]), ha="center", va="bottom", fontsize=7)
            elif r is not None:
                ax.annotate("failed", (x, floor), ha="center", va="bottom", fontsize=7, rotation=90, color="red")
        ax.bar(xs, ys, width, label=variant, color=colors[i % len(colors)])
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([labels[c].replace(" on ", "\non ") + f"\n(fedsilo default: {default_mode(records, c)})"
                        for c in configs], fontsize=8)
    ax.set_ylabel("seconds per epoch (log scale)")
    device = next((r.get("device") for r in records if r.get("device")), "cpu")
    ax.set_title(f"DP-SGD time per epoch by grad_sample_mode ({device}, median of {reps}; labels: × plain)", fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
