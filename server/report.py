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

from fedsilo.shared.audit import format_date
from fedsilo.shared.ledger import read_ledgers
from fedsilo.shared.metrics import format_metrics, headline

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
    if not summary["dp"]:
        console.print("[yellow]No record-level DP at the departments: ε is unbounded (∞) for each department's examples.[/yellow]")
        print_central(summary, console)
        return summary

    ledgers = read_ledgers(Path(run_dir) / "ledgers") if (Path(run_dir) / "ledgers").exists() else {}
    source = "ledgers" if ledgers else "reported by the departments (their ledgers stay on their hosts)"
    table = Table(title=f"Privacy report — whole-history ε of each department at its own δ, {source}")
    rounds_label = "rounds (ledger)" if ledgers else "rounds (this run)"
    for column in ("department", rounds_label, "refused", "steps", "σ", "q", "ε", "δ", "budget", "left"):
        table.add_column(column, justify="left" if column == "department" else "right")
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
        table.add_row(
            name,
            str(rounds),
            str(info.get("rounds_refused", 0)),
            str(steps),
            f"{last.noise_multiplier:.3f}" if last else "-",
            f"{last.sample_rate:.4f}" if last else "-",
            f"{eps:.3f}" if math.isfinite(eps) else "∞",
            f"{delta:g}" if delta else "-",
            f"{own:g}",
            f"{max(own - eps, 0.0):.3f}" if math.isfinite(own) and math.isfinite(eps) else "-",
        )
    console.print(table)
    console.print(
        "ε covers each department's entire history (all rounds, all runs) at the stated δ: "
        "record-level DP for the examples of that department."
    )
    print_central(summary, console)
    return summary


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


AUDIT_COLUMNS = ("department", "rounds", "steps", "σ", "q", "ε recorded", "PRV", "RDP", "PLD", "δ", "budget", "left", "signatures", "verified")


def audit_cells(row) -> list[str]:
    """One audited ledger (a ``DepartmentAudit``) as the cells of :data:`AUDIT_COLUMNS`."""

    def num(value, fmt=".3f"):
        return "–" if value is None else format(value, fmt)

    return [
        row.id, str(row.rounds), str(row.steps), num(row.noise_multiplier), num(row.sample_rate, ".4f"),
        num(row.epsilon), num(row.epsilon_prv), num(row.epsilon_rdp), num(row.epsilon_pld),
        num(row.delta, "g"), num(row.budget, "g"), num(row.left), row.signatures, "yes" if row.verified else "NO",
    ]


def print_audit(result, console: Console | None = None) -> None:
    """The privacy officer's table: one row per department, then every problem."""
    console = console or Console()
    table = Table(title="Privacy audit — ε re-derived from the recorded mechanisms")
    for column in AUDIT_COLUMNS:
        table.add_column(column, justify="left" if column in ("department", "signatures", "verified") else "right")
    for row in result.rows:
        cells = audit_cells(row)
        if row is result.central:
            table.add_section()
            cells[0] += " (client-level)"
        cells[-1] = "[green]yes[/green]" if row.verified else "[red]NO[/red]"
        table.add_row(*cells)
    console.print(table)
    for row in result.rows:
        for problem in row.problems:
            console.print(f"[red]{row.id}[/red]: {problem}", soft_wrap=True)
    for problem in result.problems:
        console.print(f"[red]audit[/red]: {problem}", soft_wrap=True)
    for row in result.rows:
        if row.identity:
            console.print(
                f"{row.id}: identity {row.identity}"
                + (f", key {row.key}" if row.key else "")
                + (f", {row.records} records" if row.records else "")
                + (f", entries {format_date(row.first)} – {format_date(row.last)}" if row.first else "")
                + (f", written by {', '.join(row.software)}" if row.software else ""),
                soft_wrap=True, highlight=False,
            )
    if result.central:
        console.print(
            "Department rows: record-level DP of each department's own examples.  The coordinator row: "
            "client-level DP of the released model (σ on the sum of updates clipped to C, departments "
            "sampled at q; one step per round), the whole of a department's data in or out.",
            soft_wrap=True,
        )
    for line in result.checked:
        console.print(f"[green]checked[/green]: {line}", soft_wrap=True, highlight=False)
    for line in result.unavailable:
        console.print(f"[yellow]not available[/yellow]: {line}", soft_wrap=True, highlight=False)
    for finding in result.findings:
        console.print(f"[yellow]finding[/yellow]: {finding}", soft_wrap=True, highlight=False)
    console.print(audit_verdict(result))


def audit_verdict(result) -> str:
    """The one-line verdict: failed, verified with findings, or verified — never green over a finding."""
    if not result.ok:
        return "[red]Verification FAILED.[/red]"
    if result.findings:
        return f"[yellow]Ledgers verified, with {len(result.findings)} finding(s) above (budget, δ or privacy changes).[/yellow]"
    if result.unavailable:
        return "[green]All ledgers verified[/green] — for what was available (see 'not available')."
    return "[green]All ledgers verified.[/green]"
