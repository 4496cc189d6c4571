"""The privacy report printed at the end of a run, read from what is on disk.

ε comes from the department ledgers — the record of everything each department
has ever spent — not from the coordinator's view of this run alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedsilo.shared.audit import format_date
from fedsilo.shared import safe_read
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


@dataclass(frozen=True)
class Column:
    """One column of a terminal table that has to stay readable at 80 columns.

    ``drop`` 0: always shown; otherwise the column may be hidden on a narrow
    terminal, the highest ``drop`` first.  ``wrap``: the cells may wrap at spaces
    (and fold a word longer than the column, never cut it); other cells keep one
    line.  Headers always wrap between words.
    """

    header: str
    justify: str = "right"
    drop: int = 0
    wrap: bool = False


# A rich Table's box: one bar either side of every column, one space of padding each side.
def _table_width(widths) -> int:
    return sum(widths) + 3 * len(widths) + 1


def fitted_table(console: Console, title: str, columns: list[Column], rows: list[list[str]],
                 sections: frozenset[int] = frozenset(), hidden_hint: str = "") -> Table:
    """A table sized for ``console.width``: every kept cell whole, never ``…``.

    Rich alone shrinks every column of a table too wide for the terminal, and
    cuts each cell (``depart…``, ``0.33…``).  Here a column is as wide as its widest
    cell, headers wrap between words, and when even that does not fit the least
    important columns (highest ``drop``) are left out, named in the caption.
    ``sections``: indexes of rows that start a new section.
    """
    def length(cell: str) -> int:
        return Text.from_markup(cell).cell_len

    def words(text: str) -> int:
        return max((length(w) for w in text.split()), default=0)

    cells = [[length(row[i]) for row in rows] for i in range(len(columns))]
    natural, minimum = [], []
    for i, column in enumerate(columns):
        widest = max(cells[i], default=0)
        longest_word = max((words(row[i]) for row in rows), default=0)
        natural.append(max(widest, length(column.header)))
        minimum.append(max(longest_word if column.wrap else widest, words(column.header), 1))
    # A droppable column with nothing in it ("-" in every row) goes before any other.
    empty = [bool(rows) and all(Text.from_markup(row[i]).plain.strip() in ("", "-", "–") for row in rows)
             for i in range(len(columns))]
    rank = lambda i: (empty[i], columns[i].drop, i)  # noqa: E731 - the higher, the sooner dropped
    kept = list(range(len(columns)))
    while _table_width([minimum[i] for i in kept]) > console.width:
        droppable = [i for i in kept if columns[i].drop]
        if not droppable:
            break
        kept.remove(max(droppable, key=rank))
    for i in sorted(set(range(len(columns))) - set(kept), key=rank):
        if not empty[i] and _table_width([minimum[k] for k in kept] + [minimum[i]]) <= console.width:
            kept = sorted([*kept, i])  # a less important column that still fits comes back
    widths = {i: minimum[i] for i in kept}
    spare = console.width - _table_width(list(widths.values()))
    if spare < 0:  # even the columns always shown are too wide: the wrapping ones fold
        for i in kept:
            if columns[i].wrap and spare < 0:
                give = max(min(widths[i] - max(words(columns[i].header), 4), -spare), 0)
                widths[i] -= give
                spare += give
    # What is left puts headers (and wrapping cells) on one line, the smallest need first;
    # a column that cannot get all it needs stays as narrow as it is.
    for i in sorted(kept, key=lambda i: natural[i] - widths[i]):
        if 0 < natural[i] - widths[i] <= spare:
            spare -= natural[i] - widths[i]
            widths[i] = natural[i]
    hidden = [columns[i].header for i in range(len(columns)) if i not in kept]
    caption = None
    if hidden:
        full = _table_width(minimum)
        caption = (f"Hidden to fit {console.width} columns: {', '.join(hidden)} "
                   f"({full} columns show all{', ' + hidden_hint if hidden_hint else ''}).")
    table = Table(title=title, caption=caption)
    for i in kept:
        column = columns[i]
        # Every column may wrap: its header between words; a cell only where ``wrap`` left it
        # narrower than the cell (the other columns are at least as wide as their widest cell).
        table.add_column(column.header, justify=column.justify, width=widths[i], overflow="fold")
    for r, row in enumerate(rows):
        if r in sections:
            table.add_section()
        table.add_row(*(row[i] for i in kept))
    return table


AUDIT_COLUMNS = ("department", "rounds", "steps", "σ", "q", "ε recorded", "PRV", "RDP", "PLD", "δ", "budget", "left", "signatures", "verified")


# How each audit column behaves in the terminal: ``drop`` (hidden first on a narrow terminal,
# highest first), a shorter header.  δ outranks the re-derived ε: an ε without its δ says nothing.
AUDIT_TERMINAL = {
    "department": {"justify": "left", "wrap": True}, "rounds": {"drop": 3}, "steps": {"drop": 5},
    "σ": {"drop": 5}, "q": {"drop": 6}, "ε recorded": {}, "PRV": {"drop": 4}, "RDP": {"drop": 4},
    "PLD": {"drop": 2}, "δ": {"drop": 1}, "budget": {"drop": 1}, "left": {"drop": 1},
    "signatures": {"justify": "left", "header": "signed"}, "verified": {"justify": "left"},
}


def audit_cells(row) -> list[str]:
    """One audited ledger (a ``DepartmentAudit``) as the cells of :data:`AUDIT_COLUMNS`."""

    def num(value, fmt=".3f"):
        return "–" if value is None else format(value, fmt)

    unread = getattr(row, "unreadable", False) and not row.rounds  # no ε was read: none is shown
    return [
        row.id, str(row.rounds), str(row.steps), num(row.noise_multiplier), num(row.sample_rate, ".4f"),
        "–" if unread else num(row.epsilon), num(row.epsilon_prv), num(row.epsilon_rdp), num(row.epsilon_pld),
        num(row.delta, "g"), num(row.budget, "g"), num(row.left), row.signatures,
        "UNREADABLE" if unread else ("yes" if row.verified else "NO"),
    ]


def print_audit(result, console: Console | None = None) -> None:
    """The privacy officer's table: one row per department, then every problem."""
    console = console or Console()
    rows, sections = [], set()
    for row in result.rows:
        cells = audit_cells(row)
        cells[0] = escape(cells[0])
        if row is result.central:
            sections.add(len(rows))
            cells[0] += " (client-level)"
        cells[-1] = "[green]yes[/green]" if row.verified else f"[red]{cells[-1]}[/red]"
        rows.append(cells)
    columns = [Column(**{"header": header, **AUDIT_TERMINAL.get(header, {"drop": 7})}) for header in AUDIT_COLUMNS]
    table = fitted_table(console, "Privacy audit — ε re-derived from the recorded mechanisms", columns, rows,
                         frozenset(sections), hidden_hint="as do --json and --report")
    if rows:  # a deployment's run folder alone has no ledger: no empty table
        console.print(table)
    # Everything below may hold text from the files audited: escaped, so a
    # crafted name or value is shown as written, never read as markup.
    for row in result.rows:
        for problem in row.problems:
            console.print(f"[red]{escape(row.id)}[/red]: {escape(problem)}", soft_wrap=True)
    for problem in result.problems:
        console.print(f"[red]audit[/red]: {escape(problem)}", soft_wrap=True)
    for row in result.rows:
        if row.identity:
            console.print(
                escape(
                    f"{row.id}: identity {row.identity}"
                    + (f", key {row.key}" if row.key else "")
                    + (f", {row.records} records" if row.records else "")
                    + (f", entries {format_date(row.first)} – {format_date(row.last)}" if row.first else "")
                    + (f", written by {', '.join(row.software)}" if row.software else "")
                ),
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
        console.print(f"[green]checked[/green]: {escape(line)}", soft_wrap=True, highlight=False)
    for line in result.unavailable:
        console.print(f"[yellow]not available[/yellow]: {escape(line)}", soft_wrap=True, highlight=False)
    for finding in result.findings:
        console.print(f"[yellow]finding[/yellow]: {escape(finding)}", soft_wrap=True, highlight=False)
    console.print(audit_verdict(result))


def audit_verdict(result) -> str:
    """The one-line verdict: failed, verified with findings, or verified — never green over a finding."""
    if not getattr(result, "readable", True):
        return ("[red]Verification FAILED: a file could not be read (see above); a missing, empty or "
                "unreadable ledger never verifies.[/red]")
    if not result.ok:
        return "[red]Verification FAILED.[/red]"
    if result.findings:
        return f"[yellow]Ledgers verified, with {len(result.findings)} finding(s) above (budget, δ or privacy changes).[/yellow]"
    if not result.rows:
        return "[green]Verified what was given[/green] — but no ledger was among it (see 'not available')."
    if result.unavailable:
        return "[green]All ledgers verified[/green] — for what was available (see 'not available')."
    return "[green]All ledgers verified.[/green]"
