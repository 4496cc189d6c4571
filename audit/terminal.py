"""The audit as ``fedsilo audit`` prints it: one row per department, the verdict, every problem and finding."""

from __future__ import annotations


from rich.console import Console
from rich.markup import escape

from fedsilo.shared.terminal import Column, fitted_table

from .ledgers import format_date


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
