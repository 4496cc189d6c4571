"""The scale benchmark's figure: seconds per round and peak memory against the number of departments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import DATASET, PLAIN_WORKERS, TARGET_GIB


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Seconds per round and peak memory against the number of departments (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["departments"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    sims = [r["simulation"] for r in rows]
    left.plot(ns, [s["mean_round_s"] for s in sims], "o-", label="simulation (Flower + Ray, 2 workers), all rounds")
    left.plot(ns, [s["steady_round_s"] for s in sims], "o--", label="simulation, rounds ≥ 2")
    for key, label, style in (("plain_parallel", f"plain loop, {PLAIN_WORKERS} processes", "s-"),
                              ("plain_sequential", "plain loop, 1 process", "^-")):
        pts = [(r["departments"], r[key]["mean_round_s"]) for r in rows if r.get(key)]
        if pts:
            left.plot(*zip(*pts), style, label=f"{label}, all rounds")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("departments (log)")
    left.set_ylabel("seconds per round (log)")
    left.set_title("Time per round")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    right.plot(ns, [s["peak_pss_gib"] for s in sims], "o-", label="simulation: whole process tree (PSS)")
    pts = [(r["departments"], r["plain_parallel"]["workers_peak_pss_bytes"] / 2**30) for r in rows if r.get("plain_parallel")]
    if pts:
        right.plot(*zip(*pts), "s-", label=f"plain loop: its {PLAIN_WORKERS} workers (PSS)")
    right.axhline(TARGET_GIB, color="red", linestyle=":", label=f"target {TARGET_GIB:g} GiB")
    right.set_xscale("log")
    right.set_ylim(bottom=0, top=max(TARGET_GIB, *(s["peak_pss_gib"] for s in sims)) * 1.1)
    for ax in (left, right):
        ax.set_xticks(ns)
        ax.set_xticklabels([f"{n:,}" for n in ns])
        ax.minorticks_off()
    right.set_xlabel("departments (log)")
    right.set_ylabel("peak memory (GiB)")
    right.set_title("Peak memory")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(f"fedsilo simulate on {DATASET}, IID, DP-SGD ({rows[0]['simulation']['rounds']} rounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
