"""The ``fedsilo`` command line: a thin shell over the sides that do the work.

Each subcommand lives with the side it belongs to — ``simulate`` in
``simulations/``, ``certs`` in ``certs/``, ``coordinator`` in ``server/``,
``department`` in ``client/`` — this module only puts them under one name.

Any subcommand that meets a file it cannot use — a ledger, record, card,
schema, table or key that is missing, not a regular file, not UTF-8, malformed
or past a limit — ends with one red line naming the file and exit code 2,
never a traceback (:class:`_Fedsilo` catches the typed errors of the readers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from typer.core import TyperGroup

# Every Flower process fedsilo starts inherits these: no runtime `uv sync`
# (it would try to download packages) and no telemetry.
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedsilo.certs.cli import app as certs_app  # noqa: E402
from fedsilo.client.cli import app as department_app  # noqa: E402
from fedsilo.server.cli import app as coordinator_app  # noqa: E402
from fedsilo.benchmarks.cli import app as bench_app  # noqa: E402
from fedsilo.simulations.simulate import simulate  # noqa: E402

def reader_errors() -> tuple[type[BaseException], ...]:
    """The typed errors a reader raises for a file it cannot use (imported late: the CLI starts fast)."""
    from fedsilo.shared.ledger import LedgerError
    from fedsilo.shared.model_card import CardError
    from fedsilo.shared.safe_read import UnreadableFile
    from fedsilo.shared.schema import DataError
    from fedsilo.shared.signing import SigningKeyError

    return (UnreadableFile, DataError, CardError, SigningKeyError, LedgerError)


class _Fedsilo(TyperGroup):
    """The root command: a reader's typed error becomes one red line and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except reader_errors() as err:
            message = " ".join(str(err).split())  # one line, whatever the file held
            typer.secho(f"error: {message[:2000]}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Fedsilo,
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


schema_app = typer.Typer(help="The federation's public data schema: draft it, check a table against it.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")


@schema_app.command("infer")
def schema_infer(
    table: Annotated[Path, typer.Argument(help="A table the coordinator may look at (.csv/.parquet): its own held-out table. Every statistic in the schema comes from it.")],
    label_column: Annotated[str, typer.Option(help="The label column.")] = "label",
    task: Annotated[str, typer.Option(help="auto | binary | multiclass | regression (auto refuses to guess a many-valued number).")] = "auto",
    feature_columns: Annotated[str, typer.Option(help="Comma-separated input columns (default: all but the label).")] = "",
    max_categories: Annotated[int, typer.Option(min=1, help="A text column with at most this many distinct values is categorical.")] = 50,
    text_features: Annotated[int, typer.Option(min=1, help="Hashed n-gram features per text column.")] = 64,
    model: Annotated[Optional[str], typer.Option(help="hf:DIR: draft for this pretrained base, its text column tokenized with the base's tokenizer.")] = None,
    max_length: Annotated[int, typer.Option(min=1, help="With --model hf:DIR: tokens per text.")] = 128,
    out: Annotated[Optional[Path], typer.Option(help="Write the schema here (default: print it).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Draft the schema every department encodes its table with; edit it by hand as needed."""
    from fedsilo.shared.data import split_columns
    from fedsilo.shared.pretrained import BaseModelError, is_pretrained, open_base, pretrained_schema
    from fedsilo.shared.schema import DataError, infer_schema, read_table

    try:
        schema = infer_schema(read_table(table), label_column, task, f"'{table}'", max_categories, text_features,
                              split_columns(feature_columns))
        if model is not None:
            if not is_pretrained(model):
                raise BaseModelError(f"--model {model}: schema infer drafts for a pretrained base only (hf:DIR)")
            schema = pretrained_schema(schema, open_base(model[len("hf:"):]), max_length)
        if out is not None and out.exists() and not force:
            raise FileExistsError(f"'{out}' already exists; choose another --out or pass --force to replace it")
    except (DataError, FileExistsError, BaseModelError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    text = schema.to_json(indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    label = schema.label
    typer.echo(f"wrote {out}: label '{label.column}' ({label.task}"
               + (f", classes {', '.join(label.classes)}" if label.classes else "") + f"), {schema.num_features} features from:")
    for column in schema.columns:
        typer.echo(f"  {column.name}: {column.describe()}")
    typer.echo("Every value above comes from the table given: it is public to the federation once the schema is sent.")


@schema_app.command("check")
def schema_check(
    schema_file: Annotated[Path, typer.Argument(help="The schema (JSON).")],
    data: Annotated[Path, typer.Option(help="A table to encode with it.")],
    label_column: Annotated[Optional[str], typer.Option(help="The table's label column, if named differently.")] = None,
    base_model: Annotated[Optional[list[Path]], typer.Option(help="A pretrained base folder whose tokenizer a tokenized text column names (repeatable).")] = None,
) -> None:
    """Encode a table with the schema, as a department would; say what does not fit."""
    from fedsilo.shared.data import load_table
    from fedsilo.shared.pretrained import BaseModelError, schema_with_own_tokenizer
    from fedsilo.shared.schema import DataError, DataSchema

    try:
        schema = DataSchema.load(schema_file)
        if label_column:
            schema = schema.with_label_column(label_column)
        schema = schema_with_own_tokenizer(schema, base_model or ())
        encoded = load_table(data, schema.label.column, schema=schema)
    except (DataError, BaseModelError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{data}: {len(encoded)} rows encode to {schema.num_features} features ({schema.task}); it fits the schema")


@app.command("predict")
def predict(
    model: Annotated[Path, typer.Option(help="A run folder (model.safetensors and model-card.json).")],
    data: Annotated[Path, typer.Option(help="New rows (.csv/.parquet) with the schema's columns.")],
    out: Annotated[Path, typer.Option(help="Where to write the rows with their predictions (.csv/.parquet).")],
    keys: Annotated[Optional[Path], typer.Option(help="Folder with the coordinator's key you trust (coordinator.crt or .pub) to check the card's signer.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    base_model: Annotated[Optional[list[Path]], typer.Option(help="Your copy of the pretrained base a run fine-tuned (a Hugging Face folder), found by the SHA-256 of its weights that the card names (repeat for several).")] = None,
) -> None:
    """Apply a run's model to new rows: checks the signed card, encodes with its schema, writes predictions."""
    from fedsilo.shared.model_card import CardError
    from fedsilo.serving.predict import predict_file, write_predictions
    from fedsilo.shared.metrics import format_metrics
    from fedsilo.shared.model_factory import ModelError
    from fedsilo.shared.schema import DataError

    try:
        if out.exists() and not overwrite:
            raise FileExistsError(f"'{out}' already exists; choose another --out, or pass --overwrite to replace it")
        result = predict_file(model, data, keys, tuple(base_model or ()))
        write_predictions(result.frame, out, overwrite)
    except (CardError, DataError, ModelError, FileExistsError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    card = result.card
    typer.echo(f"model of run {card['run_id']} ({card['model']['architecture']}, {card['task']}); card verified with {result.trusted}")
    typer.echo(f"wrote {len(result.frame)} predictions to {out}")
    if result.metrics is not None:
        typer.echo(f"metrics on these rows: {format_metrics(result.metrics, card['task'])}")


@app.command("audit")
def audit(
    path: Annotated[Path, typer.Argument(help="A run folder (or an output folder: its latest run), a ledger directory, or one .jsonl ledger.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    keys: Annotated[Optional[Path], typer.Option(help="Folder of the public keys you trust (*.pub, coordinator.crt), matched by fingerprint. Without it, keys beside the ledgers prove only consistency.")] = None,
    record: Annotated[Optional[Path], typer.Option(help="The coordinator's record of acknowledged ledger heads (STATE/record/acknowledged.jsonl); a run folder names its own.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Also write an HTML report with plots to this folder (index.html).")] = None,
    ledgers: Annotated[Optional[list[Path]], typer.Option("--ledgers", help="More ledgers to audit with PATH (repeatable): a folder of ledgers collected from the departments' hosts, or one .jsonl. A deployment's run folder holds none of its own.")] = None,
) -> None:
    """Verify ledgers (chain, signatures, coordinator record) and re-derive every ε.

    Exit 0: verified; 1: a ledger or record was read and does not verify; 2: a
    file could not be read at all (missing, empty, not a regular file, not
    ledger entries) — it never verifies.
    """
    from fedsilo.audit import audit_path
    from fedsilo.audit.terminal import print_audit
    from fedsilo.shared.runs import resolve_run_dir

    path = resolve_run_dir(path)
    try:
        result = audit_path(path, keys, record, ledgers or ())
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        print_audit(result)
    if report is not None:
        from fedsilo.audit.html import load_summary, render_report

        page = render_report(result, load_summary(path), report)
        typer.echo(f"report: {page}", err=json_out)
    if not result.readable:
        raise typer.Exit(2)
    if not result.ok:
        raise typer.Exit(1)


@app.command("plan")
def plan(
    dataset_size: Annotated[int, typer.Option(help="The department's training records N (with --distributed-dp: "
                                                    "all departments' records together).")],
    rounds: Annotated[Optional[int], typer.Option(help="Planned federated rounds (with --distributed-dp: steps; "
                                                       "left out, planned as the commands plan them).")] = None,
    target_epsilon: Annotated[Optional[float], typer.Option(help="Whole-history ε the planned rounds may spend: derive σ.")] = None,
    noise_multiplier: Annotated[Optional[float], typer.Option(help="A given σ instead of a target: show its ε curve.")] = None,
    delta: Annotated[float, typer.Option(help="δ of every ε.")] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Expected Poisson batch (sample rate 1/ceil(N/B); with "
                                                 "--distributed-dp, B/N).")] = 64,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    accountant: Annotated[str, typer.Option(help="pld (tightest) | prv | rdp.")] = "pld",
    max_epsilon: Annotated[Optional[float], typer.Option(help="A budget: name the round that would pass it.")] = None,
    distributed_dp: Annotated[bool, typer.Option("--distributed-dp", help="Plan a distributed-DP run: each round one "
                                                 "DP-SGD step over the pooled records, noise added in Skellam shares.")] = False,
    parameters: Annotated[Optional[int], typer.Option(help="With --distributed-dp: the model's float parameters "
                                                           "(`fedsilo simulate` prints them).")] = None,
    sample_rate: Annotated[Optional[float], typer.Option(help="With --distributed-dp: q itself instead of "
                                                              "batch-size / dataset-size.")] = None,
    max_grad_norm: Annotated[float, typer.Option(help="With --distributed-dp: the clipping norm C.")] = 1.0,
    ddp_scale: Annotated[float, typer.Option(help="With --distributed-dp: ddp-scale (0: automatic).")] = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Plan DP-SGD before a run: σ for a target ε (or ε for a σ) and the ε curve over the rounds.

    A department's own rounds by default; a distributed-DP run's with --distributed-dp.
    """
    from fedsilo.client.planner import PlanError, plan_privacy, print_plan

    if (target_epsilon is None) == (noise_multiplier is None):
        typer.echo("error: give exactly one of --target-epsilon (plan σ for it) or --noise-multiplier (see its ε)", err=True)
        raise typer.Exit(2)
    try:
        if distributed_dp:
            from fedsilo.client.distributed_planner import plan_distributed_privacy

            if parameters is None:
                raise PlanError("parameters", "is needed with --distributed-dp: the model's float parameters, as "
                                              "`fedsilo simulate` prints them")
            result = plan_distributed_privacy(
                dataset_size, batch_size, rounds, delta, parameters, target_epsilon=target_epsilon,
                noise_multiplier=noise_multiplier, sample_rate=sample_rate, max_grad_norm=max_grad_norm,
                scale=ddp_scale, max_epsilon=max_epsilon)
        else:
            given = [name for name, value in (("parameters", parameters), ("sample-rate", sample_rate)) if value is not None]
            if given:
                raise PlanError(given[0], "applies only with --distributed-dp")
            if rounds is None:
                raise PlanError("rounds", "is needed: the run's planned rounds")
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
