"""The scale benchmark's result: tables of formatted cells and targets from its rows; words from the template.

:func:`build_result` is called with what was measured; :func:`from_raw` rebuilds the same
result from a saved result's ``raw``, and :func:`rerender` from the saved ``OUT/scale.json``
itself (what ``fedsilo bench report`` calls), without measuring again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common import BenchResult, Table, Target, rerendered
from .config import (DATASET, OVERHEAD_AT, PARTITION, PLAIN_WORKERS, TARGET_DEPARTMENTS, TARGET_GIB,
                     TARGET_OVERHEAD, TARGET_SECONDS)
from .figure import plot

NAME = "scale"
PLOT = "scale.png"
TEMPLATE = "scale.md.j2"
TARGETS = dict(target_departments=TARGET_DEPARTMENTS, target_seconds=TARGET_SECONDS, target_gib=TARGET_GIB,
               target_overhead=TARGET_OVERHEAD, overhead_at=OVERHEAD_AT)


def _overhead(sim: float, plain: float) -> float:
    return (sim - plain) / plain


def format_s(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.0f}%"


def _load(record: dict[str, Any]) -> str:
    before, after = record.get("load_before"), record.get("load_after")
    return "–" if before is None or after is None else f"{before:.1f} → {after:.1f}"


def _gib(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _text(block: str, **values: Any) -> str:
    # Imported here: the plain loop's spawned workers import this package and should load no more than they did.
    from ..prose import prose

    return prose(TEMPLATE, block, s=format_s, pct=_pct, n="{:,}".format, **TARGETS, **values)


def _target(block: str, met: bool | None, **values: Any) -> Target:
    """A target from a template block whose three paragraphs are the target, what was measured and the note."""
    cells = _text(block, **values).split("\n\n")
    if not 2 <= len(cells) <= 3:
        raise ValueError(f"{TEMPLATE} block {block!r} gave {len(cells)} paragraphs, expected 3")
    target, measured, note = (*cells, "")[:3]
    return Target(target, measured, met, note)


def _plains(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in (row.get("plain_sequential"), row.get("plain_parallel")) if p]


def targets_for(rows: list[dict[str, Any]], quick: bool, plain_workers: int = PLAIN_WORKERS) -> list[Target]:
    by = {r["departments"]: r for r in rows}
    largest = rows[-1]
    big = by.get(TARGET_DEPARTMENTS)
    context: dict[str, Any] = dict(big=big is not None, largest=largest["simulation"],
                                   largest_departments=largest["departments"], plain_workers=plain_workers)
    if big is None:
        wall_met = memory_met = None
    else:
        sim = big["simulation"]
        context.update(sim=sim, round_seconds=sum(sim["seconds"]),
                       per_department_ms=1000 * sum(sim["seconds"]) / max(sum(sim["trained"]), 1),
                       plain_parallel_s=sum(big["plain_parallel"]["seconds"]) if big.get("plain_parallel") else None,
                       parts=[], loop_ms=None)
        loop = big.get("plain_sequential") or big.get("plain_parallel")
        if loop and loop["worker_seconds"]:
            busy = loop["worker_seconds"] + loop["clock"]["server"]
            context["parts"] = [(k, v / busy) for k, v in sorted(loop["clock"].items(), key=lambda kv: -kv[1])]
            context["loop_ms"] = 1000 * loop["worker_seconds"] / max(sum(loop["trained"]), 1)
        wall_met, memory_met = sim["wall_s"] < TARGET_SECONDS, sim["peak_pss_gib"] < TARGET_GIB
    targets = [_target("target_wall", wall_met, **context), _target("target_memory", memory_met, **context)]

    at = by.get(OVERHEAD_AT)
    base = at or largest
    sim = base["simulation"]
    loops = [(f"{p['workers']}-process", p) for p in _plains(base)]
    if loops:
        # The baseline is the faster of the plain loops: what the same work takes here without Flower.
        name, best = min(loops, key=lambda lp: lp[1]["mean_round_s"])
        over = _overhead(sim["mean_round_s"], best["mean_round_s"])
        overhead = dict(
            quick=quick, at=at is not None, base_departments=base["departments"], sim=sim, best=best, best_name=name,
            over=over, steady_over=_overhead(sim["steady_round_s"], best["steady_round_s"]),
            others=[(n, _overhead(sim["mean_round_s"], o["mean_round_s"])) for n, o in loops if o is not best],
            several_loops=len(loops) > 1,
            extra_ms=1000 * (sim["steady_round_s"] - best["steady_round_s"]) / max(base["departments"], 1),
            big_extra_ms=None, big_over=None,
        )
        big_row = by.get(TARGET_DEPARTMENTS)
        if big_row is not None and big_row is not base and _plains(big_row):
            bb = min(_plains(big_row), key=lambda p: p["mean_round_s"])
            bs = big_row["simulation"]
            overhead.update(big_extra_ms=1000 * (bs["steady_round_s"] - bb["steady_round_s"]) / TARGET_DEPARTMENTS,
                            big_over=_overhead(bs["mean_round_s"], bb["mean_round_s"]))
        targets.append(_target("target_overhead", None if at is None else over < TARGET_OVERHEAD, **overhead))
    plains = [r.get("plain_sequential") or r.get("plain_parallel") for r in rows]
    plains = [p for p in plains if p]
    if plains:
        worst = max(plains, key=lambda p: p["accounting_share"] or 0.0)
        calls = max((p["epsilon_calls_per_department_round"] or 0.0) for p in plains)
        targets.append(_target(
            "target_accounting", calls <= 1.0 + 1e-9 and worst["accounting_share"] < 0.5, worst=worst, calls=calls,
            call_ms=1000 * worst["epsilon_seconds"] / max(worst["epsilon_nonempty_calls"], 1),
        ))
    return targets


def build_result(rows: list[dict[str, Any]], out: Path | None, quick: bool, rounds: int, dataset: str = DATASET,
                 partition: str = PARTITION, plain_workers: int = PLAIN_WORKERS) -> BenchResult:
    """The result from what was measured; the plot goes to ``out`` (none when ``out`` is None)."""
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        plot(rows, Path(out) / PLOT)
    sim_rows, plain_rows, phase_rows = [], [], []
    for r in rows:
        s = r["simulation"]
        sim_rows.append([
            f"{r['departments']:,}", str(s["rounds"]), " / ".join(format_s(x) for x in s["seconds"]),
            format_s(s["mean_round_s"]), format_s(s["steady_round_s"]), f"{s['department_rounds_per_s']:.1f}",
            f"{s['wall_s']:.0f}", _gib(s["peak_pss_gib"]), str(s["max_processes"]), str(s["ray_client_workers"]),
            f"{s['final_accuracy']:.3f}" if s.get("final_accuracy") is not None else "–", _load(s),
        ])
        for key, label in (("plain_sequential", "1 process"), ("plain_parallel", f"{plain_workers} processes")):
            p = r.get(key)
            if not p:
                continue
            plain_rows.append([
                f"{r['departments']:,}", label, " / ".join(format_s(x) for x in p["seconds"]),
                format_s(p["mean_round_s"]), f"{p['department_rounds_per_s']:.1f}",
                _pct(_overhead(s["mean_round_s"], p["mean_round_s"])),
                _pct(_overhead(s["steady_round_s"], p["steady_round_s"])), format_s(p["setup_s"]),
                _gib(p["workers_peak_pss_bytes"] / 2**30), _load(p),
            ])
        p = r.get("plain_sequential") or r.get("plain_parallel")
        if p:
            busy = p["worker_seconds"] + p["clock"]["server"]
            share = {k: v / busy for k, v in p["clock"].items()} if busy else {}
            dr = max(sum(p["trained"]), 1)
            phase_rows.append([
                f"{r['departments']:,}", str(p["workers"]),
                f"{1000 * (p['worker_seconds'] / dr):.0f}",
                *(f"{100 * share.get(k, 0):.0f}%" for k in ("setup", "guard", "training", "ledger", "server")),
                f"{100 * p['accounting_share']:.0f}%",
                f"{p['epsilon_nonempty_calls']} ({p['epsilon_calls_per_department_round']:.2f})",
                f"{1000 * p['epsilon_seconds'] / max(p['epsilon_nonempty_calls'], 1):.0f}",
            ])
    text = _text("text", rounds=rounds, partition=partition, dataset=dataset, plain_workers=plain_workers,
                 sizes=[r["departments"] for r in rows], largest=rows[-1]["simulation"],
                 largest_departments=rows[-1]["departments"], quick=quick)
    return BenchResult(
        name=NAME,
        title=_text("title"),
        quick=quick,
        text=text,
        tables=[
            Table(_text("title_simulation"),
                  ["departments", "rounds", "s per round", "mean s/round", "rounds ≥ 2", "dept-rounds/s",
                   "end to end (s)", "peak GiB (tree PSS)", "processes (max)", "Ray workers (max)", "final accuracy",
                   "load avg before → after"],
                  sim_rows),
            Table(_text("title_plain"),
                  ["departments", "plain loop", "s per round", "mean s/round", "dept-rounds/s",
                   "overhead (all rounds)", "overhead (rounds ≥ 2)", "set-up s (not counted)",
                   "workers' peak GiB (sum of PSS peaks)", "load avg before → after"],
                  plain_rows),
            Table(_text("title_shares"),
                  ["departments", "processes", "worker ms per dept-round", "department + ledger read",
                   "budget guard (ε)", "model + train_dp", "ledger append", "FedAvg + evaluate",
                   "in accounting.epsilon", "ε calls (per dept-round)", "ms per ε call"],
                  phase_rows),
        ],
        plots=[PLOT],
        targets=targets_for(rows, quick, plain_workers),
        raw={"dataset": dataset, "partition": partition, "rounds": rounds, "plain_workers": plain_workers,
             "rows": rows},
    )


def from_raw(raw: dict[str, Any], quick: bool, out: Path | None = None) -> BenchResult:
    """The result rebuilt from a saved result's ``raw`` (the plot only with ``out``)."""
    return build_result(raw["rows"], out, quick, raw["rounds"], dataset=raw["dataset"], partition=raw["partition"],
                        plain_workers=raw["plain_workers"])


def rerender(path: Path, draw_plots: bool = True) -> BenchResult:
    """Rebuild a saved ``scale.json`` (title, text, tables, targets; the plot beside it unless not ``draw_plots``).

    Its time and load average are the saved ones: nothing is measured again.
    """
    return rerendered(path, lambda saved: from_raw(saved["raw"], saved["quick"],
                                                   Path(path).parent if draw_plots else None))
