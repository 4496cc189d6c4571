"""Tables that fit the terminal: columns drop, in a stated order, when the console is narrow."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text


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
