"""The ``fedsilo`` command line: a thin shell over the sides that do the work.

Each subcommand lives with the side it belongs to — ``simulate`` in
``simulations/``, ``certs`` in ``certs/``, ``coordinator`` in ``server/``,
``department`` in ``client/`` — this module only puts them under one name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

# Every Flower process fedsilo starts inherits these: no runtime `uv sync`
# (it would try to download packages) and no telemetry.
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedsilo.certs.cli import app as certs_app  # noqa: E402
from fedsilo.client.cli import app as department_app  # noqa: E402
from fedsilo.server.cli import app as coordinator_app  # noqa: E402
from fedsilo.simulations.bench.cli import app as bench_app  # noqa: E402
from fedsilo.simulations.simulate import simulate  # noqa: E402

app = typer.Typer(
    name="fedsilo",
    help="Privacy-preserving federated learning across the departments of one enterprise.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("simulate")(simulate)
app.add_typer(certs_app, name="certs")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(department_app, name="department")
app.add_typer(bench_app, name="bench")


@app.command("audit")
def audit(
    path: Annotated[Path, typer.Argument(help="A run directory, a ledger directory, or one .jsonl ledger.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    keys: Annotated[Optional[Path], typer.Option(help="Folder of the public keys you trust (*.pub, coordinator.crt), matched by fingerprint. Without it, keys beside the ledgers prove only consistency.")] = None,
    record: Annotated[Optional[Path], typer.Option(help="The coordinator's record of acknowledged ledger heads (STATE/record/acknowledged.jsonl); a run folder names its own.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Also write an HTML report with plots to this folder (index.html).")] = None,
) -> None:
    """Verify ledgers (chain, signatures, coordinator record) and re-derive every ε; exit 1 on any failure."""
    from fedsilo.server.report import print_audit
    from fedsilo.shared.audit import audit_path

    try:
        result = audit_path(path, keys, record)
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        print_audit(result)
    if report is not None:
        from fedsilo.server.audit_report import load_summary, render_report

        page = render_report(result, load_summary(path), report)
        typer.echo(f"report: {page}", err=json_out)
    if not result.ok:
        raise typer.Exit(1)


@app.command("plan")
def plan(
    rounds: Annotated[int, typer.Option(help="Planned federated rounds.")],
    dataset_size: Annotated[int, typer.Option(help="The department's training records N.")],
    target_epsilon: Annotated[Optional[float], typer.Option(help="Whole-history ε the planned rounds may spend: derive σ.")] = None,
    noise_multiplier: Annotated[Optional[float], typer.Option(help="A given σ instead of a target: show its ε curve.")] = None,
    delta: Annotated[float, typer.Option(help="δ of every ε.")] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Expected Poisson batch (sample rate 1/ceil(N/B)).")] = 64,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    accountant: Annotated[str, typer.Option(help="pld (tightest) | prv | rdp.")] = "pld",
    max_epsilon: Annotated[Optional[float], typer.Option(help="A budget: name the round that would pass it.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Plan a department's DP-SGD: σ for a target ε (or ε for a σ) and the ε curve over the rounds."""
    from fedsilo.client.planner import PlanError, plan_privacy, print_plan

    if (target_epsilon is None) == (noise_multiplier is None):
        typer.echo("error: give exactly one of --target-epsilon (plan σ for it) or --noise-multiplier (see its ε)", err=True)
        raise typer.Exit(2)
    try:
        result = plan_privacy(
            dataset_size, batch_size, rounds, delta,
            target_epsilon=target_epsilon, noise_multiplier=noise_multiplier,
            local_epochs=local_epochs, accountant=accountant, max_epsilon=max_epsilon,
        )
    except PlanError as err:
        typer.echo(f"error: --{err.option} {err.reason}", err=True)
        raise typer.Exit(2) from None
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        print_plan(result)


@app.callback()
def _root() -> None:
    """fedsilo: Flower + Opacus DP-SGD with honest, per-department privacy ledgers."""


def main() -> None:
    app()
