"""``fedsilo certs``: the CA, the coordinator's certificate, department identities."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import authority
from .authority import CertError

app = typer.Typer(help="Certificate and key tooling (CA, coordinator certificate, department keys).", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _fail(err: Exception) -> None:
    err_console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(2)


@app.command("init")
def init(
    out: Annotated[Path, typer.Option(help="Folder for ca.crt/key and coordinator.crt/key.")] = Path("certs/out"),
    san: Annotated[list[str], typer.Option(help="Host name or IP the departments use to reach the coordinator (repeatable).")] = [],
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = authority.DEFAULT_DAYS,
    force: Annotated[bool, typer.Option(help="Replace existing certificates and keys.")] = False,
) -> None:
    """Create the federation CA and the coordinator's TLS certificate."""
    try:
        paths = authority.init(out, san, days, force)
    except CertError as err:
        _fail(err)
    console.print(f"CA: {paths.ca_cert} (give this file to every department)")
    console.print(f"coordinator: {paths.coordinator_cert}, key {paths.coordinator_key} (0600)")
    console.print(f"names: {', '.join(dict.fromkeys([*san, *authority.ALWAYS_SANS]))}")


@app.command("add-department")
def add_department(
    name: Annotated[str, typer.Argument(help="Department name, e.g. finance.")],
    dir: Annotated[Path, typer.Option("--dir", help="The certificate folder made by `certs init`.")] = Path("certs/out"),
    force: Annotated[bool, typer.Option(help="Replace an existing key pair.")] = False,
) -> None:
    """Create a department's identity key pair (EC P-384, OpenSSH)."""
    try:
        private, public = authority.add_department(name, dir, force)
    except CertError as err:
        _fail(err)
    console.print(f"private key: {private} (0600; give it to department '{name}' only)")
    console.print(f"public key:  {public} (register it at the coordinator)")


@app.command("show")
def show(
    dir: Annotated[Path, typer.Option("--dir", help="The certificate folder.")] = Path("certs/out"),
) -> None:
    """List certificates and keys with expiry dates and problems."""
    try:
        rows = authority.describe(dir)
    except CertError as err:
        _fail(err)
    table = Table(title=f"fedsilo certificates in {dir}")
    for column in ("item", "expires", "status", "names", "path"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["item"], row["expires"], row["status"], row.get("names", ""), row["path"])
    console.print(table)
    if any(row["status"] not in ("ok",) for row in rows):
        raise typer.Exit(1)
