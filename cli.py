"""The ``fedsilo`` command line: a thin shell over the sides that do the work.

Each subcommand lives with the side it belongs to — ``simulate`` in
``simulations/``, ``certs`` in ``certs/``, ``coordinator`` in ``server/``,
``department`` in ``client/`` — this module only puts them under one name.
"""

from __future__ import annotations

import os

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


@app.callback()
def _root() -> None:
    """fedsilo: Flower + Opacus DP-SGD with honest, per-department privacy ledgers."""


def main() -> None:
    app()
