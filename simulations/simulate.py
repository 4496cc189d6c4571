"""``fedsilo simulate``: many departments on one machine, on Flower's Simulation Engine."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from fedsilo.client.policy import DepartmentPolicy
from fedsilo.server.report import print_run_report
from fedsilo.server.summary import SUMMARY_FILE
from fedsilo.shared.config import ACCOUNTANTS, DEVICES, GRAD_SAMPLE_MODES, TASKS, ConfigError, RunSettings
from fedsilo.shared.data import DataError, simulated_federation, split_columns
from fedsilo.shared.model_factory import check_spec, describe_grad_sample_mode, is_factory, model_changes
from fedsilo.shared.models import build_model
from fedsilo.shared.schema import DataSchema

from fedsilo.shared.flower_cli import ANSI, FlowerError, progress_filter

from .local_federation import LocalFederation

console = Console()
err_console = Console(stderr=True, soft_wrap=True)



def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=option)
    return value


def simulate(
    departments: Annotated[Optional[int], typer.Option(min=1, help="Number of simulated departments (default 10; by:COLUMN and a folder decide it themselves).")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 20,
    dataset: Annotated[str, typer.Option(help="digits | mnist5k | breast-cancer | PATH to .csv/.parquet | a FOLDER with one table per department.")] = "digits",
    label_column: Annotated[str, typer.Option(help="Label column of a CSV/Parquet dataset.")] = "label",
    feature_columns: Annotated[str, typer.Option(help="Comma-separated feature columns (default: all but the label).")] = "",
    partition: Annotated[Optional[str], typer.Option(help="iid | dirichlet:ALPHA (label skew; smaller = more skewed) | by:COLUMN (one department per value). Default: dirichlet:0.5, or iid for regression and a folder of tables.")] = None,
    task: Annotated[str, typer.Option(help="auto | binary | multiclass | regression (auto refuses to guess a many-valued number).")] = "auto",
    schema: Annotated[Optional[Path], typer.Option(help="The data schema (JSON from `fedsilo schema infer`); default: inferred from the held-out rows.")] = None,
    test_data: Annotated[Optional[Path], typer.Option(help="The coordinator's held-out table (default: a fixed 20 % split off the data).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for partitioning and model initialization.")] = 42,
    model: Annotated[str, typer.Option(help="auto | mlp | cnn | package.module:factory (your own; see the README's contract).")] = "auto",
    fix_model: Annotated[bool, typer.Option("--fix-model", help="Let Opacus' ModuleValidator.fix replace layers DP-SGD cannot train (BatchNorm → GroupNorm), and say what changed.")] = False,
    dp: Annotated[bool, typer.Option("--dp/--no-dp", help="DP-SGD at every department (on by default).")] = True,
    noise_multiplier: Annotated[float, typer.Option(min=0.0, help="σ: Gaussian noise / clipping norm.")] = 1.0,
    target_epsilon: Annotated[Optional[float], typer.Option(help="Derive σ so the planned rounds spend this whole-history ε (overrides --noise-multiplier).")] = None,
    max_grad_norm: Annotated[float, typer.Option(help="Per-example gradient clipping norm C.")] = 1.0,
    delta: Annotated[float, typer.Option(help="δ of the (ε, δ) guarantee.")] = 1e-5,
    max_epsilon: Annotated[float, typer.Option(help="Each department's budget: it refuses rounds past this ε.")] = 10.0,
    accountant: Annotated[str, typer.Option(help="pld (dp-accounting, tightest) | prv (Opacus) | rdp.")] = "pld",
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Expected (Poisson) batch size.")] = 64,
    learning_rate: Annotated[float, typer.Option(help="SGD learning rate.")] = 0.5,
    momentum: Annotated[float, typer.Option(help="SGD momentum (reset every round).")] = 0.5,
    grad_sample_mode: Annotated[str, typer.Option(help="Opacus per-sample gradients: auto (ghost clipping where every layer has a ghost norm, else hooks) | ghost | hooks | functorch | ew.")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    fraction_train: Annotated[float, typer.Option(help="Fraction of departments sampled each round (with --central-dp: each one's Poisson sampling probability).")] = 1.0,
    central_dp: Annotated[bool, typer.Option("--central-dp", help="Client-level DP at the coordinator: clip each department's update, noise the sum, own budget and ledger.")] = False,
    central_noise_multiplier: Annotated[float, typer.Option(help="Client-level σ: noise on the sum / --central-clip-norm.")] = 1.0,
    central_clip_norm: Annotated[float, typer.Option(help="Largest L2 norm of one department's model update.")] = 1.0,
    central_delta: Annotated[float, typer.Option(help="δ of the client-level guarantee; must be below 1/departments.")] = 1e-3,
    central_max_epsilon: Annotated[float, typer.Option(help="The coordinator's client-level budget over its whole ledger.")] = 10.0,
    cpus_per_department: Annotated[int, typer.Option(min=1, help="CPU cores Ray reserves per department.")] = 1,
    out: Annotated[Path, typer.Option(help="Run directory: summary.json, model.safetensors, model-card.json, schema.json, ledgers/.")] = Path("runs/latest"),
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's full log.")] = False,
) -> None:
    """Simulate a federation of departments on embedded data, then print a privacy report."""
    _choice(accountant, ACCOUNTANTS, "--accountant")
    _choice(grad_sample_mode, GRAD_SAMPLE_MODES, "--grad-sample-mode")
    _choice(device, DEVICES, "--device")
    _choice(task, TASKS, "--task")
    out = out.expanduser().resolve()
    try:
        check_spec(model)
        spec = str(Path(dataset).expanduser().resolve()) if Path(dataset).expanduser().exists() else dataset
        if partition is None:  # label skew needs classes, and a folder is split already
            partition = "iid" if Path(spec).is_dir() or task == "regression" else "dirichlet:0.5"
        named = partition.strip().lower().startswith("by:") or Path(spec).is_dir()
        count = departments if departments is not None else (0 if named else 10)
        given = DataSchema.load(schema).to_json() if schema is not None else ""
        held_out = str(test_data.expanduser().resolve()) if test_data is not None else ""
        # Validate the data and model here, before any process starts.
        federation = simulated_federation(
            spec, label_column, split_columns(feature_columns), count, partition, seed,
            schema_json=given, test_data=held_out, task=task,
        )
        parts, test = list(federation.parts), federation.test
        if task not in ("auto", test.task):
            raise ConfigError(f"--task {task}, but '{dataset}'" + (" with the given --schema" if given else "")
                              + f" is a {test.task} task; leave --task out or change the schema's label task")
        departments = len(parts)
        changes = model_changes(model, test.input_shape, test.num_outputs, test.task) if fix_model else []
        built = build_model(model, test.input_shape, test.num_outputs, test.kind, seed=seed, task=test.task,
                            embeddings=test.embeddings, fix=fix_model)
        dp_path = describe_grad_sample_mode(grad_sample_mode, built) if dp else ""
        settings = RunSettings(
            num_server_rounds=rounds,
            dataset=spec,
            label_column=label_column,
            feature_columns=feature_columns,
            partition=partition,
            seed=seed,
            model=model,
            fix_model=fix_model,
            task=test.task,
            dp=dp,
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon or 0.0,
            max_grad_norm=max_grad_norm,
            # The simulated departments' own policy decides; the run asks nothing beyond it.
            delta=0.0,
            max_epsilon=0.0,
            accountant="",
            local_epochs=local_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            momentum=momentum,
            grad_sample_mode=grad_sample_mode,
            device=device,
            fraction_train=fraction_train,
            min_departments=1,
            round_timeout=600.0,
            connect_timeout=120.0,
            out=str(out),
            test_data=held_out,
            # Every simulated department encodes with exactly the schema shown below.
            data_schema=federation.schema.to_json() if federation.schema is not None else "",
            central_dp=central_dp,
            central_noise_multiplier=central_noise_multiplier,
            central_clip_norm=central_clip_norm,
            central_delta=central_delta,
            central_max_epsilon=central_max_epsilon,
            central_ledger="",
            central_signing_key="",
            record="",
            record_signing_key="",
            simulated_policy=DepartmentPolicy(
                max_epsilon=max_epsilon, delta=delta, accountants=(accountant,), allow_non_private=not dp,
                models=(model,) if is_factory(model) else (),
            ).to_json(),
        )
        if central_dp and central_delta >= 1.0 / departments:
            raise ConfigError(
                f"--central-delta {central_delta:g} must be below 1/{departments} departments "
                "(at δ ≥ 1/N one department's update could be published outright)"
            )
    except (ConfigError, DataError, ValueError) as err:  # PolicyError, ModelError are ValueErrors
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None

    _keep_previous_summary(out)
    if federation.schema is not None:
        _show_schema(federation.schema, out, given=bool(given))
    if fix_model:
        console.print("--fix-model: " + ("; ".join(changes) if changes else "nothing to change, the model is valid for DP-SGD as it is"))
    if dp:
        console.print(f"Model {model} ({sum(p.numel() for p in built.parameters())} parameters, {test.task}), per-sample gradients: {dp_path}")
    resumed = sorted((out / "ledgers").glob("*.jsonl")) if (out / "ledgers").exists() else []
    sizes = [len(p) for p in parts]
    console.print(
        f"[bold]fedsilo[/bold]: {departments} departments × {rounds} rounds on '{Path(dataset).name if federation.schema is not None else test.name}' "
        f"({sum(sizes)} training examples, {min(sizes)}–{max(sizes)} per department, "
        f"{len(test)} held out), partition {partition}, "
        + (
            f"DP-SGD C={max_grad_norm:g}, "
            + (f"target ε={target_epsilon:g}" if target_epsilon else f"σ={noise_multiplier:g}")
            + f", δ={delta:g}, budget ε≤{max_epsilon:g}"
            if dp
            else "[yellow]no DP[/yellow]"
        )
        + (
            f"; client-level DP σ={central_noise_multiplier:g}, C={central_clip_norm:g}, q={fraction_train:g}, "
            f"δ={central_delta:g}, budget ε≤{central_max_epsilon:g}"
            if central_dp
            else ""
        )
    )
    if resumed and dp:
        console.print(
            f"Resuming {len(resumed)} department ledger(s) in {out / 'ledgers'}: "
            "their ε continues from the recorded history."
        )

    # On SIGTERM unwind normally, so the SuperLink and its children are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix=".flower-", dir=out))
    show = progress_filter(lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True), verbose)

    try:
        with LocalFederation(workdir) as federation:
            outcome = federation.run(
                settings.to_run_config(),
                num_supernodes=departments,
                cpus_per_department=cpus_per_department,
                on_line=show,
                log_path=out / "flower.log",
            )
    except FlowerError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    summary_path = out / SUMMARY_FILE
    if not outcome.ok or not summary_path.exists():
        err_console.print(
            f"[red]error:[/red] run {outcome.run_id} ended as '{outcome.status}'. "
            f"Full log: {outcome.log_path}"
        )
        _print_tail(outcome.log_path)
        raise typer.Exit(1)
    summary = print_run_report(out, console)
    if summary["status"] == "failed":
        raise typer.Exit(1)
    console.print(f"Summary: {summary_path}")


def _show_schema(schema: DataSchema, out: Path, given: bool) -> None:
    """Print the schema every department encodes with, and keep it in the run folder."""
    (out / "schema.json").write_text(schema.to_json(indent=2) + "\n", encoding="utf-8")
    label = schema.label
    what = f"{label.task}, classes {', '.join(label.classes)}" if label.classes else f"{label.task}, scaled by mean {label.mean:.4g} and {label.scale:.4g}"
    console.print(
        f"Schema ({'given' if given else 'inferred from the held-out rows'}; saved to {out / 'schema.json'}): "
        f"label '{label.column}' ({what}); {schema.num_features} features from"
    )
    for column in schema.columns:
        console.print(f"  {column.name}: {column.describe()}", markup=False, highlight=False)


def _keep_previous_summary(out: Path) -> None:
    """Never overwrite an earlier run's summary in the same directory."""
    previous = out / SUMMARY_FILE
    if not previous.exists():
        out.mkdir(parents=True, exist_ok=True)
        return
    try:
        run_id = json.loads(previous.read_text(encoding="utf-8")).get("run_id", "unknown")
    except ValueError:
        run_id = "unreadable"
    history = out / "history"
    history.mkdir(exist_ok=True)
    previous.replace(history / f"summary-{run_id}.json")


def _print_tail(log_path: Path, lines: int = 25) -> None:
    try:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return
    for line in tail:
        err_console.print(ANSI.sub("", line), markup=False, highlight=False)
