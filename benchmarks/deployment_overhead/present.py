"""The deployment benchmark's result: tables of formatted cells and targets from its numbers; words from the template.

:func:`build_result` is called with what was measured; :func:`from_raw` rebuilds the same
result from a saved result's ``raw``, and :func:`rerender` from the saved ``OUT/deployment.json``
itself (what ``fedsilo bench report`` calls), without measuring again.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..common import BenchResult, Table, Target, rerendered
from .data import DEPARTMENTS, TEST_ROWS
from .figure import plot, steady as steady_mean
from .phases import PATH, PHASES, phases
from .polls import FEDSILO_POLLS, FLOWER_POLLS

NAME = "deployment"
PLOT = "deployment.png"
TEMPLATE = "deployment.md.j2"
TARGET_EXTRA_S = 3.0  # the issue: a deployed round at most 3 s slower than the same round simulated

# Row labels of the phase tables (the template says what each phase is).
PHASE_LABELS = {
    "wait": "round start → the SuperNode receives the message (`Receiving: train message`)",
    "download": "`Receiving` → `Received successfully`",
    "clientapp": "`Received successfully` → the department's ledger entry",
    "reply_wait": "ledger entry → `Sending: train message`",
    "upload": "`Sending` → `Sent successfully`",
    "collect": "last `Sent successfully` → the round's summary.json write",
    "done": "round start → the department's `Sent successfully`",
}
SPAN_LABEL = "sum: previous summary.json write → this round's"
SIMULATED_LABEL = "simulated round, same work"
EVIDENCE_ROWS = ("since", "checks", "runtime", "lag", "processes", "complete")
PROBE_STEPS = ("import_client_app_s", "import_opacus_s", "read_table_s", "epsilon_s", "train_dp_cold_s",
               "train_dp_warm_s", "evaluate_s", "process_wall_s")


def format_s(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _counts(counter: dict) -> str:
    """``{1: 8, 2: 1}`` -> ``1 (8×), 2 (1×)``: how often each whole number came up."""
    return ", ".join(f"{k} ({v}×)" for k, v in sorted(counter.items(), key=lambda kv: int(kv[0]))) or "–"


def _get(block: dict[str, Any] | None, key: str) -> float | None:
    return None if block is None else block.get(key)


def _flower_version() -> str:
    from fedsilo.shared.flower_internals import flower_version

    return flower_version()


def _text(block: str, **values: Any) -> str:
    # Imported here: the probe's fresh interpreter imports this package and should load no more than it did.
    from ..prose import prose

    return prose(TEMPLATE, block, s=format_s, counts=_counts, **values)


def _cells(block: str, count: int, **values: Any) -> list[str]:
    """A template block's paragraphs as ``count`` cells (an empty trailing cell renders as no paragraph)."""
    cells = _text(block, **values).split("\n\n")
    if len(cells) > count:
        raise ValueError(f"{TEMPLATE} block {block!r} gave {len(cells)} cells, expected {count}")
    return cells + [""] * (count - len(cells))


def poll_records(flower: list[tuple] = FLOWER_POLLS, fedsilo: list[tuple] = FEDSILO_POLLS) -> dict[str, list]:
    """The cited intervals as saved in ``raw`` (``file``, ``code``, ``seconds``, ``effect``)."""
    return {
        group: [{"file": f, "code": c, "seconds": v, "effect": _text("poll_effect", key=key)} for f, c, v, key in polls]
        for group, polls in (("flower_polls", flower), ("fedsilo_polls", fedsilo))
    }


def build_result(deploy: dict[str, Any], sim: dict[str, Any], probe_result: dict[str, Any], out: Path | None,
                 quick: bool, rounds: int, polls: dict[str, list] | None = None,
                 flower: str | None = None, secure: dict[str, Any] | None = None) -> BenchResult:
    """The result from what was measured; the plot goes to ``out`` (none when ``out`` is None).

    ``secure``: :func:`.measure.run_secure_deployment`'s record, the secure modes deployed (the
    smoke run and results saved before it existed have none).

    ``polls`` (:func:`poll_records`' shape) and ``flower`` (its version) default to the installed code's.
    """
    split = phases(deploy)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        plot(deploy, sim, split, Path(out) / PLOT)
    polls = polls or poll_records()
    flower = flower or _flower_version()
    d_mean, s_mean = statistics.mean(deploy["seconds"]), statistics.mean(sim["seconds"])
    d_steady, s_steady = steady_mean(deploy["seconds"]), steady_mean(sim["seconds"])
    several = len(deploy["seconds"]) > 1 and len(sim["seconds"]) > 1
    p, p3 = probe_result["median"], probe_result.get("together_median", {})
    first, steady, ev = split.get("first"), split.get("steady"), split["evidence"]
    basis, basis_label = (steady, "rounds ≥ 2") if several else (first, "round 1")
    d_basis = d_steady if several else deploy["seconds"][0]
    s_basis = s_steady if several else sim["seconds"][0]
    values = dict(
        quick=quick, rounds=rounds, flower=flower, test_rows=TEST_ROWS, control=deploy.get("control"),
        examples=deploy.get("examples", 479), coordinator_start_s=deploy.get("coordinator_start_s"),
        departments_online_s=deploy.get("departments_online_s"),
        d_mean=d_mean, s_mean=s_mean, d_steady=d_steady, s_steady=s_steady, several=several,
        split=split, first=first, steady=steady, ev=ev, n_rounds=len(deploy["seconds"]),
        since=ev["since_previous_reply"], rest=ev["since_previous_reply_minus_sleeps"],
        off=ev["received_to_sending_minus_checks"], lag=ev["log_lag"], runtime=ev["clientapp_runtime_per_message"],
        clientapp_all=_get(split["departments"].get("clientapp"), "mean"),
        p=p, p3=p3, together=probe_result.get("together", len(DEPARTMENTS)),
        basis=basis, basis_label=basis_label, d_basis=d_basis, s_basis=s_basis, extra=d_basis - s_basis,
        wait=_get(basis, "wait"), target_extra_s=TARGET_EXTRA_S,
    )

    per_round_rows = []
    for i, d in enumerate(deploy["seconds"]):
        s = sim["seconds"][i] if i < len(sim["seconds"]) else None
        per_round_rows.append([str(i + 1), format_s(d), format_s(s), f"{d - s:+.2f}" if s else "–", f"{d / s:.1f}×" if s else "–"])
    per_round_rows.append(["mean", format_s(d_mean), format_s(s_mean), f"{d_mean - s_mean:+.2f}", f"{d_mean / s_mean:.1f}×"])
    if several:
        per_round_rows.append(["mean of rounds ≥ 2", format_s(d_steady), format_s(s_steady), f"{d_steady - s_steady:+.2f}",
                               f"{d_steady / s_steady:.1f}×"])

    where_rows = [[PHASE_LABELS[key], format_s(_get(first, key)), format_s(_get(steady, key)), _text("explain", phase=key, **values)]
                  for key in PHASES]
    where_rows += [
        [SPAN_LABEL, format_s(_get(first, "span")), format_s(_get(steady, "span")), _text("explain", phase="span", **values)],
        [SIMULATED_LABEL, format_s(sim["seconds"][0]), format_s(s_steady) if several else "–",
         _text("explain", phase="simulated", **values)],
    ]
    spread_rows = [[PHASE_LABELS[key], *(format_s(_get(split["departments"].get(key), stat)) for stat in ("mean", "min", "max"))]
                   for key in (*PATH, "done")]
    evidence_rows = [_cells("evidence", 3, row=row, **values) for row in EVIDENCE_ROWS]
    poll_rows = [[f"{prefix}/{r['file']}", f"`{r['code']}`", f"{r['seconds']:g} s", r["effect"]]
                 for prefix, group in (("flwr", "flower_polls"), ("fedsilo", "fedsilo_polls")) for r in polls[group]]
    probe_rows = [[_text("probe_step", step=key, test_rows=TEST_ROWS), format_s(p.get(key)), format_s(p3.get(key)) if p3 else "–"]
                  for key in PROBE_STEPS]
    probe_rows.append([_text("probe_step", step="bare_interpreter_s"), format_s(probe_result["bare_interpreter_s"]), "–"])

    slower, slower_measured, slower_note = _cells("target_slower", 3, **values)
    accounted, accounted_measured, accounted_note = _cells("target_accounted", 3, **values)
    targets = [
        Target(slower, slower_measured, None if quick else values["extra"] <= TARGET_EXTRA_S, slower_note),
        Target(accounted, accounted_measured, split["complete"], accounted_note),
    ]

    def title(block: str) -> str:
        return _text(block, **values)

    return BenchResult(
        name=NAME,
        title=title("title"),
        quick=quick,
        text=title("text"),
        tables=[
            Table(title("title_per_round"), ["round", "TLS deployment", "simulation", "difference", "ratio"],
                  per_round_rows),
            Table(title("title_where"), ["phase", "round 1", "rounds ≥ 2 (mean)", "what it is (measured)"], where_rows),
            Table(title("title_spread"), ["phase", "mean", "min", "max"], spread_rows),
            Table(title("title_evidence"), ["what", "measured", "reading"], evidence_rows),
            Table(title("title_probe"),
                  ["step", f"alone ({probe_result['repeats']})", f"{values['together']} at once"], probe_rows),
            Table(title("title_polls"), ["file", "code", "interval", "effect"], poll_rows),
            *([secure_table(deploy, secure, title("title_secure"))] if secure else []),
        ],
        plots=[PLOT],
        targets=targets,
        raw={"rounds": rounds, "deployment": deploy, "simulation": sim, "phases": split, "probe": probe_result,
             **polls, "flower": flower, **({"secure": secure} if secure else {})},
    )


def secure_table(deploy: dict[str, Any], secure: dict[str, Any], title: str) -> Table:
    """Plain, secure-aggregation and distributed-DP rounds deployed, in bench secagg's cost columns.

    The plain row is this benchmark's deployment run: every round sends the model's arrays each way.
    """
    from ..secure_aggregation_summary import COST_COLUMNS, cost_rows

    later = deploy["seconds"][1:] or deploy["seconds"]
    model = next(iter(secure["modes"].values()))["model_bytes"]
    plain = {"rounds": len(deploy["seconds"]), "median_round_seconds": statistics.median(later),
             "upload_bytes": model, "download_bytes": model, "setup_seconds": None, "setup_bytes": None,
             "modulus_bits": None, "vector_length": None, "accuracy": deploy["final_accuracy"]}
    return Table(title, COST_COLUMNS, cost_rows({"plain": plain, **secure["modes"]}))


def from_raw(raw: dict[str, Any], quick: bool, out: Path | None = None) -> BenchResult:
    """The result rebuilt from a saved result's ``raw`` (its cited intervals as they were; the plot only with ``out``).

    The Flower version in the polling table's title is the one ``raw`` names; results saved
    before it did are taken to be from the installed Flower.
    """
    polls = {group: raw[group] for group in ("flower_polls", "fedsilo_polls")}
    return build_result(raw["deployment"], raw["simulation"], raw["probe"], out, quick, raw["rounds"],
                        polls=polls, flower=raw.get("flower"), secure=raw.get("secure"))


def rerender(path: Path, draw_plots: bool = True) -> BenchResult:
    """Rebuild a saved ``deployment.json`` (title, text, tables, targets; the plot beside it unless not ``draw_plots``).

    Its time and load average are the saved ones: nothing is measured again.
    """
    return rerendered(path, lambda saved: from_raw(saved["raw"], saved["quick"],
                                                   Path(path).parent if draw_plots else None))
