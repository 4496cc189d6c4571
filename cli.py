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


@app.command("audit")
def audit(
    path: Annotated[Path, typer.Argument(help="A run directory, a ledger directory, or one .jsonl ledger.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    keys: Annotated[Optional[Path], typer.Option(help="Folder of department public keys NAME.pub (default: beside the ledgers).")] = None,
) -> None:
    """Verify ledgers (chain, signatures, coordinator record) and re-derive every ε; exit 1 on any failure."""
    from fedsilo.server.report import print_audit
    from fedsilo.shared.audit import audit_path

    try:
        result = audit_path(path, keys)
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        print_audit(result)
    if not result.ok:
        raise typer.Exit(1)


@app.callback()
def _root() -> None:
    """fedsilo: Flower + Opacus DP-SGD with honest, per-department privacy ledgers."""


def main() -> None:
    app()
