"""The privacy report printed at the end of a run, read from what is on disk.

ε comes from the department ledgers — the record of everything each department
has ever spent — not from the coordinator's view of this run alone.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fedsilo.shared.terminal import Column, fitted_table
from fedsilo.shared.ledger import read_ledgers
from fedsilo.shared.metrics import format_metrics, headline
from fedsilo.shared.summary_format import DepartmentTotals, Summary, read_summary


def print_run_report(run_dir: Path, console: Console | None = None) -> Summary:
    """Print accuracy and the per-department privacy table; return the run's (typed) summary."""
    console = console or Console()
    summary = read_summary(run_dir)
    rounds = summary.rounds
    console.print(
        f"\n[bold]Run {summary.run_id}[/bold] — {summary.status}"
        + (f": {summary.stop_reason}" if summary.stop_reason else "")
    )
    final = summary.final_metrics
    task = summary.task or "multiclass"
    if final:
        head = headline(task)
        initial = summary.initial.get(head)
        console.print(
            f"Final held-out {head} [bold]{final[head]:.4f}[/bold] after {len(rounds)} round(s) "
            f"on {summary.dataset['num_test']} held-out examples"
            + (f" (initial {initial:.4f})" if initial is not None else "")
            + f"; {task}: {format_metrics(final, task)}"
        )
    elif summary.final_accuracy is not None:
        console.print(f"Final test accuracy [bold]{summary.final_accuracy:.4f}[/bold] after {len(rounds)} round(s)")
    if summary.model_card:
        console.print(f"Model: {Path(run_dir) / summary.model} with its signed card {Path(run_dir) / summary.model_card}")
    print_failed_rounds(summary, console)
    print_traffic(summary, console)
    if not summary.dp:
        console.print("[yellow]No record-level DP at the departments: ε is unbounded (∞) for each department's examples.[/yellow]")
        print_central(summary, console)
        return summary

    ledgers = read_ledgers(Path(run_dir) / "ledgers") if (Path(run_dir) / "ledgers").exists() else {}
    source = "from the ledgers" if ledgers else "as reported by the departments (their ledgers stay on their hosts)"
    rows = []
    departments = summary.departments
    for name in sorted(set(departments) | set(ledgers)):
        info = departments.get(name) or DepartmentTotals()
        ledger = ledgers.get(name)
        entries = ledger.entries if ledger else []
        last = entries[-1] if entries else None
        if ledgers:
            eps, rounds, steps = (ledger.epsilon if ledger else 0.0), len(entries), sum(e.steps for e in entries)
        else:
            eps, rounds, steps = info.epsilon, info.rounds_trained, info.steps
            eps = math.inf if eps is None and info.rounds_trained else (eps or 0.0)
        # The budget the department's own policy granted (its ledger records it), else what it reported.
        own = (last.budget if last and last.budget else None) or info.max_epsilon or summary.max_epsilon or math.inf
        delta = last.delta if last else info.delta
        rows.append([
            escape(name),
            str(rounds),
            str(info.rounds_refused),
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
    print_secure_aggregation(summary, console)
    return summary


def print_traffic(summary: Summary, console: Console) -> None:
    """Bytes one department moves per round (median upload over the run), against the whole model."""
    traffic = summary.traffic
    uploads = sorted(b for r in summary.rounds for b in r.upload_bytes.values())
    if traffic is None or not uploads:
        return
    up = uploads[len(uploads) // 2]
    line = f"Traffic per department per round: {up:,} B up (median), {traffic.model_bytes:,} B down"
    if traffic.whole_model_bytes > traffic.model_bytes:
        line += (f"; the whole model is {traffic.whole_model_bytes:,} B, {traffic.whole_model_bytes / max(up, 1):,.0f}× "
                 "an upload (the frozen base never travels)")
    console.print(line, soft_wrap=True)


def print_failed_rounds(summary: Summary, console: Console) -> None:
    """Rounds that produced no model: why, and who was charged for them all the same."""
    for failed in summary.failed_rounds:
        charged = sorted(failed.charged)
        rejected = failed.rejected
        console.print(
            f"[yellow]Round {failed.round} produced no model[/yellow]: {escape(failed.reason)}"
            + (f"; rejected: {escape(', '.join(f'{n} ({why})' for n, why in sorted(rejected.items())))}" if rejected else "")
            + (f"; charged all the same: {escape(', '.join(charged))}" if charged else "")
        )


def print_secure_aggregation(summary: Summary, console: Console) -> None:
    """One line for the run's secure aggregation: t of n, the drops over its rounds, its traffic."""
    if not summary.secure_aggregation:
        return
    setups, rounds = summary.secure_aggregation, [r.secagg for r in [*summary.rounds, *summary.failed_rounds] if r.secagg]
    setup_bytes = sum(s.setup_bytes for s in setups)
    traffic = setup_bytes + sum(sum(s.bytes_sent.values()) + sum(s.bytes_received.values()) for s in rounds)
    last = setups[-1]
    console.print(
        f"Secure aggregation: t={last.threshold} of {len(last.participants)} departments "
        f"({len(last.dealt)} dealt their shares), {last.modulus_bits}-bit sums, {len(setups)} session(s); "
        f"{sum(len(s.dropped_before_masking) for s in rounds)} dropped before masking and "
        f"{sum(len(s.dropped_after_masking) for s in rounds)} after, over {len(rounds)} round(s); "
        f"{traffic} bytes of secure-aggregation messages (setup {setup_bytes} in "
        f"{sum(s.setup_seconds for s in setups):.2f} s). The coordinator saw only each round's weighted sum.",
        soft_wrap=True,
    )


def print_central(summary: Summary, console: Console) -> None:
    """The coordinator's client-level guarantee, stated apart from the departments' own."""
    central = summary.central
    if central is None:
        return
    releases = sum(1 for r in summary.rounds if r.central is not None)
    how = (f"({central.accountant.upper()}: Skellam noise the departments added in shares, each clipping its own "
           "update, under secure aggregation)" if central.distributed else f"({central.accountant.upper()}, dp-accounting)")
    seen = ("the coordinator saw only the noisy sum" if central.distributed
            else "the coordinator itself still sees each update")
    console.print(
        f"Client-level DP at the coordinator: whole-history [bold]ε={central.epsilon:.3f}[/bold] at "
        f"δ={central.delta:g} {how} after {releases} release(s) "
        f"in this run; σ={central.noise_multiplier:g}, update clip C={central.clip_norm:g}, "
        f"departments sampled with q={central.sample_rate:g}; budget {central.max_epsilon:g}, "
        f"left {max(central.max_epsilon - central.epsilon, 0.0):.3f}. It bounds what the released "
        f"model reveals about whether any one department took part, with all its data; {seen}. "
        f"Ledger: {central.ledger}",
        soft_wrap=True,
    )
