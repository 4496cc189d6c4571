"""The privacy report printed at the end of a run, read from what is on disk.

ε comes from the department ledgers — the record of everything each department
has ever spent — not from the coordinator's view of this run alone.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fedsilo.shared import safe_read
from fedsilo.shared.terminal import Column, fitted_table
from fedsilo.shared.ledger import read_ledgers
from fedsilo.shared.metrics import format_metrics, headline

from .summary import SUMMARY_FILE


def print_run_report(run_dir: Path, console: Console | None = None) -> dict:
    """Print accuracy and the per-department privacy table; return the summary."""
    console = console or Console()
    summary = safe_read.load_json(Path(run_dir) / SUMMARY_FILE, "run summary")
    rounds = summary["rounds"]
    accuracy = summary.get("final_accuracy")
    console.print(
        f"\n[bold]Run {summary['run_id']}[/bold] — {summary['status']}"
        + (f": {summary['stop_reason']}" if summary.get("stop_reason") else "")
    )
    final = summary.get("final_metrics") or {}
    task = summary.get("task") or "multiclass"
    if final:
        head = headline(task)
        initial = (summary.get("initial") or {}).get(head)
        console.print(
            f"Final held-out {head} [bold]{final[head]:.4f}[/bold] after {len(rounds)} round(s) "
            f"on {summary['dataset']['num_test']} held-out examples"
            + (f" (initial {initial:.4f})" if initial is not None else "")
            + f"; {task}: {format_metrics(final, task)}"
        )
    elif accuracy is not None:
        console.print(f"Final test accuracy [bold]{accuracy:.4f}[/bold] after {len(rounds)} round(s)")
    if summary.get("model_card"):
        console.print(f"Model: {Path(run_dir) / summary['model']} with its signed card {Path(run_dir) / summary['model_card']}")
    print_failed_rounds(summary, console)
    if not summary["dp"]:
        console.print("[yellow]No record-level DP at the departments: ε is unbounded (∞) for each department's examples.[/yellow]")
        print_central(summary, console)
        return summary

    ledgers = read_ledgers(Path(run_dir) / "ledgers") if (Path(run_dir) / "ledgers").exists() else {}
    source = "from the ledgers" if ledgers else "as reported by the departments (their ledgers stay on their hosts)"
    rows = []
    departments = summary["departments"]
    for name in sorted(set(departments) | set(ledgers)):
        info = departments.get(name, {})
        ledger = ledgers.get(name)
        entries = ledger.entries if ledger else []
        last = entries[-1] if entries else None
        if ledgers:
            eps, rounds, steps = (ledger.epsilon if ledger else 0.0), len(entries), sum(e.steps for e in entries)
        else:
            eps, rounds, steps = info.get("epsilon"), info.get("rounds_trained", 0), info.get("steps", 0)
            eps = math.inf if eps is None and info.get("rounds_trained") else (eps or 0.0)
        # The budget the department's own policy granted (its ledger records it), else what it reported.
        own = (last.budget if last and last.budget else None) or info.get("max_epsilon") or summary.get("max_epsilon") or math.inf
        delta = last.delta if last else info.get("delta")
        rows.append([
            escape(name),
            str(rounds),
            str(info.get("rounds_refused", 0)),
            str(steps),
            f"{last.noise_multiplier:.3f}" if last else "-",
            f"{last.sample_rate:.4f}" if last else "-",
            f"{eps:.3f}" if math.isfinite(eps) else "∞",
            f"{delta:g}" if delta else "-",
            f"{own:g}",
            f"{max(own - eps, 0.0):.3f}" if math.isfinite(own) and math.isfinite(eps) else "-",
        ])
    refused = any(row[2] != "0" for row in rows)
    columns = [
        Column("department", "left", wrap=True),
        Column("rounds (ledger)" if ledgers else "rounds (this run)", drop=2),
        Column("refused", drop=1 if refused else 6),  # all zeros say little: the first to go
        Column("steps", drop=5),
        Column("σ", drop=4),
        Column("q", drop=5),
        Column("ε"),
        Column("δ", drop=3),
        Column("budget", drop=2),
        Column("left", drop=1),
    ]
    table = fitted_table(
        console, f"Privacy report — whole-history ε of each department at its own δ, {source}", columns, rows,
    )
    console.print(table)
    console.print(
        "ε covers each department's entire history (all rounds, all runs) at the stated δ: "
        "record-level DP for the examples of that department."
    )
    print_central(summary, console)
    return summary


def print_failed_rounds(summary: dict, console: Console) -> None:
    """Rounds that produced no model: why, and who was charged for them all the same."""
    for failed in summary.get("failed_rounds") or []:
        charged = sorted(failed.get("charged") or {})
        rejected = failed.get("rejected") or {}
        console.print(
            f"[yellow]Round {failed.get('round')} produced no model[/yellow]: {escape(str(failed.get('reason', '')))}"
            + (f"; rejected: {escape(', '.join(f'{n} ({why})' for n, why in sorted(rejected.items())))}" if rejected else "")
            + (f"; charged all the same: {escape(', '.join(charged))}" if charged else "")
        )


def print_central(summary: dict, console: Console) -> None:
    """The coordinator's client-level guarantee, stated apart from the departments' own."""
    central = summary.get("central")
    if not central:
        return
    releases = sum(1 for r in summary["rounds"] if "central" in r)
    console.print(
        f"Client-level DP at the coordinator: whole-history [bold]ε={central['epsilon']:.3f}[/bold] at "
        f"δ={central['delta']:g} ({central['accountant'].upper()}, dp-accounting) after {releases} release(s) "
        f"in this run; σ={central['noise_multiplier']:g}, update clip C={central['clip_norm']:g}, "
        f"departments sampled with q={central['sample_rate']:g}; budget {central['max_epsilon']:g}, "
        f"left {max(central['max_epsilon'] - central['epsilon'], 0.0):.3f}. It bounds what the released "
        f"model reveals about whether any one department took part, with all its data; the coordinator "
        f"itself still sees each update. Ledger: {central['ledger']}",
        soft_wrap=True,
    )
