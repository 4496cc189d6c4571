"""Render ``BENCHMARKS.md`` from the benchmarks' JSON results, each re-rendered from its raw numbers where it can be.

The layout (header, targets, one section per benchmark) is ``templates/report.md.j2``.
A benchmark module with ``rerender(path, draw_plots=True)`` rebuilds its title, text,
tables and targets from the saved ``raw`` data, so a wording change in its template
reaches the summary without re-measuring; a result it cannot re-render (an older
format, a benchmark without ``rerender``) keeps the text it was saved with.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .prose import document

ORDER = ["dp-cost", "scale", "utility", "secagg", "accounting", "deployment"]
PRESENTED = ("title", "text", "tables", "targets")  # what a re-render replaces in a saved result


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def rerendered(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (the result saved at ``path``) with its presented parts rebuilt by its benchmark's ``rerender``.

    Plots are left as they are.  Falls back to ``data`` unchanged, with a note on stderr,
    when the benchmark has no ``rerender`` or it fails on this result.
    """
    from .cli import SUITE  # cli imports this module: look its table up when called

    module_name = SUITE.get(data["name"])
    if module_name is None:
        return data
    module = importlib.import_module(f"{__package__}.{module_name}")
    rerender = getattr(module, "rerender", None)
    if rerender is None:
        return data
    try:
        # A rerender that cannot skip its plots would rewrite them: keep the stored text then.
        if "draw_plots" not in inspect.signature(rerender).parameters:
            return data
        result = asdict(rerender(path, draw_plots=False))
    except Exception as err:  # an older or hand-edited result: its stored text still renders
        print(f"bench report: {path.name} kept its stored text (re-rendering failed: {type(err).__name__}: {err})",
              file=sys.stderr)
        return data
    return {**data, **{key: result[key] for key in PRESENTED}}


def render(out: Path, to: Path | None = None, rerender: bool = True) -> Path:
    """Write ``OUT/BENCHMARKS.md`` (or ``to``) from every ``OUT/*.json`` result; return its path.

    ``rerender``: rebuild each result's text from its raw numbers first (see the module's doc).
    Plot links are relative to the summary's own folder, so a summary written
    elsewhere (the repository's root ``BENCHMARKS.md``) still shows them.
    """
    out = Path(out)
    path = Path(to) if to is not None else out / "BENCHMARKS.md"
    prefix = Path(os.path.relpath(out.resolve(), path.parent.resolve()))
    results = []
    for result_path in sorted(out.glob("*.json")):
        try:
            data = json.loads(result_path.read_text())
        except ValueError:
            continue
        if {"name", "title", "tables", "targets"} <= set(data):
            results.append(rerendered(result_path, data) if rerender else data)
    results.sort(key=lambda r: ORDER.index(r["name"]) if r["name"] in ORDER else len(ORDER))
    text = document(
        "report.md.j2", results=results, out=out.as_posix(), quick=any(r["quick"] for r in results),
        mark=_mark, link=lambda plot: (prefix / plot).as_posix(),
    )
    path.write_text(text.rstrip() + "\n")
    return path
