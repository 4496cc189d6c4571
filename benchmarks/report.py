"""Render ``BENCHMARKS.md`` from the benchmarks' JSON results."""

from __future__ import annotations

import json
import os
from pathlib import Path

ORDER = ["dp-cost", "scale", "utility", "accounting", "deployment"]


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def render(out: Path, to: Path | None = None) -> Path:
    """Write ``OUT/BENCHMARKS.md`` (or ``to``) from every ``OUT/*.json`` result; return its path.

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
            results.append(data)
    results.sort(key=lambda r: ORDER.index(r["name"]) if r["name"] in ORDER else len(ORDER))
    lines = ["# fedsilo benchmarks", ""]
    if results:
        m = results[0]["machine"]
        lines += [
            f"Measured with `fedsilo bench` on one machine, one benchmark after the other: {m['cpu']}, "
            f"{m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; Python {m['python']}, "
            f"PyTorch {m['torch']}."
            + (" **Quick mode**: small sizes, for CI; the numbers are not the reference ones." if any(r["quick"] for r in results) else "")
            + f" Results: `{out.as_posix()}/*.json`; reproduce with `fedsilo bench all"
            + (" --quick" if any(r["quick"] for r in results) else "") + " --out DIR`.",
            "",
            "## Targets",
            "",
            "| benchmark | target | measured | status | note |",
            "|---|---|---|---|---|",
        ]
        for r in results:
            for t in r["targets"]:
                lines.append(f"| {r['name']} | {t['target']} | {t['measured']} | {_mark(t['met'])} | {t['note']} |")
        lines.append("")
    for r in results:
        load = r.get("load_before")
        load_text = f", load average {load[0]:g} / {load[1]:g} / {load[2]:g} (1/5/15 min) before it started" if load else ""
        lines += [f"## {r['title']}", "",
                  f"*{r['seconds']:.0f} s{' (quick)' if r['quick'] else ''}{load_text}.* {r['text']}".strip(), ""]
        for table in r["tables"]:
            lines += [f"**{table['title']}**", "", "| " + " | ".join(table["columns"]) + " |",
                      "|" + "---|" * len(table["columns"])]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table["rows"]]
            lines.append("")
        lines += [f"![{plot}]({(prefix / plot).as_posix()})" for plot in r["plots"]]
        if r["plots"]:
            lines.append("")
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
