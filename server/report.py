"""The privacy report printed at the end of a run, read from what is on disk.

ε comes from the department ledgers — the record of everything each department
has ever spent — not from the coordinator's view of this run alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedsilo.shared.ledger import read_ledgers

from .summary import SUMMARY_FILE


def print_run_report(run_dir: Path, console: Console | None = None) -> dict:
    """Print accuracy and the per-department privacy table; return the summary."""
    console = console or Console()
    summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8"))
    rounds = summary["rounds"]
    accuracy = summary.get("final_accuracy")
    console.print(
        f"\n[bold]Run {summary['run_id']}[/bold] — {summary['status']}"
        + (f": {summary['stop_reason']}" if summary.get("stop_reason") else "")
    )
    if accuracy is not None:
        console.print(
            f"Final test accuracy [bold]{accuracy:.4f}[/bold] after {len(rounds)} round(s) "
            f"on {summary['dataset']['num_test']} held-out examples "
            f"(initial {summary['initial'].get('accuracy', float('nan')):.4f})"
        )
    if not summary["dp"]:
        console.print("[yellow]No differential privacy: ε is unbounded (∞) for every department.[/yellow]")
        return summary

    delta, budget = summary["delta"], summary["max_epsilon"]
    ledgers = read_ledgers(Path(run_dir) / "ledgers") if (Path(run_dir) / "ledgers").exists() else {}
    table = Table(title=f"Privacy report — whole-history ε at δ={delta:g} ({summary['accountant'].upper()})")
    for column in ("department", "rounds", "refused", "steps", "σ", "q", "ε", "budget", "left"):
        table.add_column(column, justify="left" if column == "department" else "right")
    departments = summary["departments"]
    for name in sorted(set(departments) | set(ledgers)):
        ledger = ledgers.get(name)
        info = departments.get(name, {})
        entries = ledger.entries if ledger else []
        eps = entries[-1].epsilon if entries else 0.0
        last = entries[-1] if entries else None
        table.add_row(
            name,
            str(len(entries)),
            str(info.get("rounds_refused", 0)),
            str(sum(e.steps for e in entries)),
            f"{last.noise_multiplier:.3f}" if last else "-",
            f"{last.sample_rate:.4f}" if last else "-",
            f"{eps:.3f}",
            f"{budget:g}",
            f"{max(budget - eps, 0.0):.3f}" if math.isfinite(budget) else "∞",
        )
    console.print(table)
    console.print(
        "ε covers each department's entire ledger (all rounds, all runs) at the stated δ: "
        "record-level DP for the examples of that department."
    )
    return summary
