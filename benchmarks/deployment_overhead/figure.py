"""The deployment benchmark's figure: seconds per round, a deployed round's critical path, every department's timeline."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .phases import PATH, PHASES


def steady(seconds: list[float]) -> float:
    """Mean of rounds ≥ 2 (round 1 alone when there is only one)."""
    return statistics.mean(seconds[1:]) if len(seconds) > 1 else seconds[0]


PHASE_COLOURS = {"wait": "#bbbbbb", "download": "#4c72b0", "clientapp": "#55a868", "reply_wait": "#dd8452",
                 "upload": "#8172b3", "collect": "#c44e52"}
PHASE_SHORT = {"wait": "SuperNode idle wait (3 s sleep)", "download": "download via nginx",
               "clientapp": "executor + ClientApp (guard, DP-SGD, ledger)", "reply_wait": "reply check (0.5 s)",
               "upload": "upload via nginx", "collect": "ServerApp pull, FedAvg, evaluation"}


def plot(deploy: dict[str, Any], sim: dict[str, Any], split: dict[str, Any], path: Path) -> None:
    """Per-round seconds; the critical path's phases vs the simulated round; every department's timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 8))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1])
    left, right, bottom = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    rounds = range(1, len(deploy["seconds"]) + 1)
    width = 0.38
    left.bar([r - width / 2 for r in rounds], deploy["seconds"], width, label="TLS deployment on loopback")
    left.bar([r + width / 2 for r in range(1, len(sim["seconds"]) + 1)], sim["seconds"], width,
             label="fedsilo simulate (same data)")
    left.set_xlabel("round")
    left.set_ylabel("seconds (ServerApp's clock)")
    left.set_xticks(list(rounds))
    left.set_title("Seconds per round, 3 departments")
    left.set_ylim(top=max([*deploy["seconds"], *sim["seconds"]]) * 1.3)
    left.legend(fontsize=8, loc="upper right")

    basis, label = (split.get("steady"), "rounds ≥ 2") if split.get("steady") else (split.get("first"), "round 1")
    if basis:
        bottom_ = 0.0
        for key in PHASES:
            value = max(basis[key], 0.0)
            right.bar([f"deployment\n({label})"], [value], bottom=bottom_, color=PHASE_COLOURS[key],
                      label=f"{PHASE_SHORT[key]}: {value:.2f} s")
            bottom_ += value
        sim_value = steady(sim["seconds"]) if label == "rounds ≥ 2" else sim["seconds"][0]
        right.bar([f"simulation\n({label})"], [sim_value], color="grey")
        right.set_ylabel("seconds (mean round)")
        right.set_title("A deployed round's critical path (measured)")
        right.set_ylim(top=max(bottom_, sim_value) * 1.6)
        right.legend(fontsize=7, loc="upper right")

    rows = split.get("rounds", [])
    if rows:
        t0 = rows[0]["start"]
        names = [*sorted({d["department"] for r in rows for d in r["departments"]}), "ServerApp"]
        seen = set()
        for r in rows:
            bottom.axvline(r["end"] - t0, color="black", lw=0.8, ls="--")
            bottom.broken_barh([(r["end"] - r["collect"] - t0, max(r["collect"], 0.0))], (len(names) - 1.35, 0.7),
                               color=PHASE_COLOURS["collect"], label=PHASE_SHORT["collect"] if "collect" not in seen else None)
            seen.add("collect")
            for d in r["departments"]:
                y = names.index(d["department"])
                edges = [r["start"], d["receiving"], d["received"], d["ledger"], d["sending"], d["sent"]]
                for key, a, b in zip(PATH, edges, edges[1:]):
                    bottom.broken_barh([(a - t0, max(b - a, 0.0))], (y - 0.35, 0.7), color=PHASE_COLOURS[key],
                                       label=PHASE_SHORT[key] if key not in seen else None)
                    seen.add(key)
        bottom.set_yticks(range(len(names)))
        bottom.set_yticklabels(names)
        bottom.set_xlabel("seconds since round 1 started (dashed: a round's summary.json write)")
        bottom.set_title("Each department's rounds, from its logged events")
        bottom.legend(fontsize=7, loc="upper center", ncol=6, bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

