"""``fedsilo bench all --out bench/ [--quick]``: run the suite, write JSON and BENCHMARKS.md."""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .common import load_average
from .report import render

console = Console()
app = typer.Typer(help="Benchmarks: DP cost, simulation scale, privacy–utility, accounting, robustness, deployment.", no_args_is_help=True)

# name -> module in this package; run in this order (cheap ones first).
SUITE = {
    "dp-cost": "dp_cost",
    "accounting": "accounting_tightness",
    "scale": "scale",
    "utility": "utility",
    "secagg": "secure_aggregation",
    "pretrained": "pretrained",
    "robustness": "robustness",
    "deployment": "deployment_overhead",
}


def run_benchmarks(names: list[str], out: Path, quick: bool, smoke: bool = False) -> list[Path]:
    """Run ``names`` one after the other; save each result as it finishes.

    ``smoke``: each benchmark at its smallest size, in quick mode (results say ``quick``): the test
    suite's check that every benchmark runs end to end and writes complete outputs, in a few minutes.
    """
    out.mkdir(parents=True, exist_ok=True)
    quick = quick or smoke
    saved = []
    for name in names:
        module = importlib.import_module(f"{__package__}.{SUITE[name]}")
        console.print(f"[bold]bench {name}[/bold]{' (smoke)' if smoke else ' (quick)' if quick else ''} …")
        load = load_average()
        started = time.perf_counter()
        result = module.run(out, quick, smoke=True) if smoke else module.run(out, quick)
        result.load_before = load
        result.seconds = round(time.perf_counter() - started, 1)
        saved.append(result.save(out))
        console.print(f"  done in {result.seconds:.0f} s -> {saved[-1]}")
    render(out)
    return saved

SMOKE_HELP = "Smallest sizes, in quick mode: checks that every benchmark runs and writes its outputs (the tests')."


def _names(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise typer.BadParameter(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SUITE)}")
    return names


@app.command("all")
def all_(
    out: Annotated[Path, typer.Option(help="Folder for NAME.json, the PNG plots and BENCHMARKS.md.")] = Path("bench"),
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes: minutes, for CI (checks outputs, not timings).")] = False,
    smoke: Annotated[bool, typer.Option("--smoke", help=SMOKE_HELP)] = False,
) -> None:
    """Run every benchmark on this machine, in one process, one after the other."""
    run_benchmarks(list(SUITE), out, quick, smoke)
    console.print(f"Summary: {out / 'BENCHMARKS.md'}")


@app.command("run")
def run(
    names: Annotated[list[str], typer.Argument(help=f"Benchmarks to run: {', '.join(SUITE)}.")],
    out: Annotated[Path, typer.Option(help="Folder for NAME.json, the PNG plots and BENCHMARKS.md.")] = Path("bench"),
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes, for CI.")] = False,
    smoke: Annotated[bool, typer.Option("--smoke", help=SMOKE_HELP)] = False,
) -> None:
    """Run some benchmarks; BENCHMARKS.md is re-rendered from every result in OUT."""
    run_benchmarks(_names(names), out, quick, smoke)


@app.command("report")
def report(
    out: Annotated[Path, typer.Option(help="Folder holding NAME.json results.")] = Path("bench"),
    to: Annotated[Optional[Path], typer.Option(help="Write the summary here instead of OUT/BENCHMARKS.md (plot links follow).")] = None,
    stored_text: Annotated[bool, typer.Option(
        "--stored-text", help="Use each result's text as saved, instead of re-rendering it from its raw numbers.",
    )] = False,
) -> None:
    """Re-render OUT/BENCHMARKS.md (or --to) from the JSON results already there.

    Each result's title, text, tables and targets are rebuilt from its raw numbers through its
    benchmark's templates (so a wording change reaches the summary without re-measuring); a result
    its benchmark cannot re-render keeps the text it was saved with. Plots are left as they are.
    """
    if not any(out.glob("*.json")):
        console.print(f"[red]error:[/red] no results (*.json) in {out}; run `fedsilo bench all --out {out}` first")
        raise typer.Exit(2)
    console.print(render(out, to, rerender=not stored_text))
