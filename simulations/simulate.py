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
from rich.markup import escape

from fedsilo.client.department import SIMULATED_DEFAULT_POLICY, Department, simulated_policy
from fedsilo.client.planner import Forecast, forecast_department
from fedsilo.client.policy import DepartmentPolicy
from fedsilo.server.checkpoint import CHECKPOINT_FILE, CheckpointError, resumable
from fedsilo.server.report import print_run_report
from fedsilo.server.robust import check_aggregation, least_updates
from fedsilo.server.summary import SUMMARY_FILE
from fedsilo.shared.config import ACCOUNTANTS, AGGREGATIONS, DEVICES, GRAD_SAMPLE_MODES, TASKS, ConfigError, RunSettings
from fedsilo.shared.ledger import PrivacyLedger
from fedsilo.shared.runs import LATEST, SIMULATION, create_run_folder, keep_earlier_log, link_latest, new_run_name, refuse_with_resume
from fedsilo.shared.data import DataError, simulated_federation, split_columns
from fedsilo.shared.model_factory import check_spec, describe_grad_sample_mode, is_factory, model_changes
from fedsilo.shared.models import build_model
from fedsilo.shared.schema import DataSchema

from fedsilo.shared.flower_cli import ANSI, FlowerError, progress_filter

from .local_federation import LocalFederation, user_ray_cluster

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=option)
    return value


def simulate(
    ctx: typer.Context,
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
    noise_multiplier: Annotated[Optional[float], typer.Option(min=0.0, help="σ: Gaussian noise / clipping norm. Default: each department plans σ so the planned rounds spend its budget.")] = None,
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
    aggregation: Annotated[str, typer.Option(help="fedavg | trimmed-mean | median | krum: how the coordinator combines updates (robust rules resist a bad department).")] = "fedavg",
    trim_fraction: Annotated[float, typer.Option(help="trimmed-mean: share of updates cut at each end, per coordinate.")] = 0.2,
    byzantine: Annotated[int, typer.Option(min=0, help="krum: how many malicious departments to tolerate (needs more than 2f+2 updates).")] = 1,
    max_update_norm: Annotated[float, typer.Option(min=0.0, help="Scale down any update that moves the global model by more than this L2 norm (0: no bound).")] = 0.0,
    central_dp: Annotated[bool, typer.Option("--central-dp", help="Client-level DP at the coordinator: clip each department's update, noise the sum, own budget and ledger.")] = False,
    central_noise_multiplier: Annotated[float, typer.Option(help="Client-level σ: noise on the sum / --central-clip-norm.")] = 1.0,
    central_clip_norm: Annotated[float, typer.Option(help="Largest L2 norm of one department's model update.")] = 1.0,
    central_delta: Annotated[float, typer.Option(help="δ of the client-level guarantee; must be below 1/departments.")] = 1e-3,
    central_max_epsilon: Annotated[float, typer.Option(help="The coordinator's client-level budget over its whole ledger.")] = 10.0,
    cpus_per_department: Annotated[int, typer.Option(min=1, help="CPU cores Ray reserves per department.")] = 1,
    out: Annotated[Path, typer.Option(help="Output folder: each run gets OUT/<run-name>/ (summary.json, checkpoint, model, card, schema.json), OUT/latest points at the newest; the simulated departments' ledgers/ stay in OUT across runs.")] = Path("runs"),
    resume: Annotated[Optional[Path], typer.Option(help="Continue this run folder (or OUT, for its latest run) from its last completed round, with its own settings.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's full log.")] = False,
) -> None:
    """Simulate a federation of departments on embedded data, then print a privacy report."""
    _choice(accountant, ACCOUNTANTS, "--accountant")
    _choice(grad_sample_mode, GRAD_SAMPLE_MODES, "--grad-sample-mode")
    _choice(device, DEVICES, "--device")
    _choice(task, TASKS, "--task")
    _choice(aggregation, AGGREGATIONS, "--aggregation")
    if resume is not None:
        return _resume(ctx, resume, cpus_per_department, verbose)
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
        # A robust rule needs enough updates per round to tolerate --byzantine bad ones.
        least = 1 if aggregation == "fedavg" else least_updates(aggregation, byzantine, trim_fraction)
        if departments < least:
            raise ConfigError(
                f"--aggregation {aggregation} with --byzantine {byzantine} needs at least {least} departments "
                f"answering every round, and this federation has {departments}; simulate more departments "
                "or lower --byzantine"
            )
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
            noise_multiplier=noise_multiplier or 0.0,
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
            aggregation=aggregation,
            trim_fraction=trim_fraction,
            byzantine=byzantine,
            max_update_norm=max_update_norm,
            min_departments=least,
            round_timeout=600.0,
            connect_timeout=120.0,
            out=str(out),
            run_name=new_run_name(),
            resume=False,
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
        check_aggregation(settings, least)  # every combination checked before anything starts
        if central_dp and central_delta >= 1.0 / departments:
            raise ConfigError(
                f"--central-delta {central_delta:g} must be below 1/{departments} departments "
                "(at δ ≥ 1/N one department's update could be published outright)"
            )
    except (ConfigError, DataError, ValueError) as err:  # PolicyError, ModelError are ValueErrors
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None

    forecasts = preflight(settings, parts, out / "ledgers")
    run_dir = create_run_folder(out, settings.run_name)
    # What the Simulation Engine needs beyond the run config, for --resume.
    (run_dir / SIMULATION).write_text(json.dumps({"departments": departments}) + "\n", encoding="utf-8")
    if federation.schema is not None:
        _show_schema(federation.schema, run_dir, given=bool(given))
    if fix_model:
        console.print("--fix-model: " + ("; ".join(changes) if changes else "nothing to change, the model is valid for DP-SGD as it is"))
    if dp:
        console.print(f"Model {model} ({sum(p.numel() for p in built.parameters())} parameters, {test.task}), per-sample gradients: {dp_path}")
    sizes = [len(p) for p in parts]
    console.print(
        f"[bold]fedsilo[/bold]: {departments} departments × {rounds} rounds on '{Path(dataset).name if federation.schema is not None else test.name}' "
        f"({sum(sizes)} training examples, {min(sizes)}–{max(sizes)} per department, "
        f"{len(test)} held out), partition {partition}, "
        + (
            f"DP-SGD C={max_grad_norm:g}, "
            + (f"target ε={target_epsilon:g}" if target_epsilon else f"σ={noise_multiplier:g}" if noise_multiplier
               else "σ planned to spend each budget over the rounds")
            + f", δ={delta:g}, budget ε≤{max_epsilon:g}"
            if dp
            else "[yellow]no DP[/yellow]"
        )
        + (f", aggregation {aggregation}" if aggregation != "fedavg" else "")
        + (f", updates bounded to norm {max_update_norm:g}" if max_update_norm else "")
        + (
            f"; client-level DP σ={central_noise_multiplier:g}, C={central_clip_norm:g}, q={fraction_train:g}, "
            f"δ={central_delta:g}, budget ε≤{central_max_epsilon:g}"
            if central_dp
            else ""
        )
    )
    console.print(f"Run {settings.run_name} in {run_dir} ({out / LATEST} points at it)")
    _say_history(forecasts, out / "ledgers")
    _run(settings, run_dir, departments, cpus_per_department, verbose)


def _resume(ctx: typer.Context, run: Path, cpus_per_department: int, verbose: bool) -> None:
    """``--resume RUN_DIR``: the same run, with its own settings, from its last checkpoint."""
    try:
        refuse_with_resume(ctx, {"cpus_per_department", "verbose"})
        run_dir, checkpoint = resumable(run)
        settings = RunSettings.from_run_config({**checkpoint.settings, "resume": True})
        parts = list(simulated_federation(
            settings.dataset, settings.label_column, split_columns(settings.feature_columns),
            _departments_of(run_dir), settings.partition,
            settings.seed, schema_json=settings.data_schema, test_data=settings.test_data, task=settings.task,
        ).parts)
        forecasts = preflight(settings, parts, Path(settings.out) / "ledgers", checkpoint.round, settings.run_name)
    except (CheckpointError, ConfigError, DataError, ValueError) as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(
        f"[bold]fedsilo[/bold]: resuming {run_dir.name} after round {checkpoint.round} of "
        f"{settings.num_server_rounds} ({len(parts)} departments, its own settings); a department that "
        "already trained the interrupted round sends that update again instead of training twice"
    )
    _say_history(forecasts, Path(settings.out) / "ledgers")
    link_latest(Path(settings.out), run_dir.name)
    keep_earlier_log(run_dir)  # the killed attempt's Flower log stays, as flower.1.log
    _run(settings, run_dir, len(parts), cpus_per_department, verbose)


def _departments_of(run_dir: Path) -> int:
    """How many departments the run simulated."""
    try:
        return int(json.loads((run_dir / SIMULATION).read_text(encoding="utf-8"))["departments"])
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{run_dir / SIMULATION} is missing or unreadable ({err}): not a run of "
                              "`fedsilo simulate`; resume a deployment run with `fedsilo coordinator run --resume`") from None


def preflight(settings: RunSettings, parts, ledgers: Path, completed: int = 0, run_id: str = "") -> list[Forecast]:
    """Each simulated department's forecast from its ledger; stop here if none can train a round."""
    policy = simulated_policy(settings.simulated_policy, settings.model)
    forecasts = [
        forecast_department(part.name, settings, policy, len(part), _simulated_ledger(ledgers, part.name),
                            completed, run_id)
        for part in parts
    ]
    if all(f.remaining for f in forecasts):
        if not any(f.rounds for f in forecasts):
            _stop_before_start(forecasts, ledgers, sorted({f.reason for f in forecasts}))
        planned = settings.noise_multiplier <= 0 or settings.target_epsilon > 0
        if planned and not any(f.useful for f in forecasts):
            # What is left of every budget, spread over the rounds, is noise larger than any gradient.
            worst = min(forecasts, key=lambda f: f.noise_ratio)
            _stop_before_start(forecasts, ledgers, [
                f"what is left of their budgets, spread over {worst.remaining} rounds, needs noise larger than "
                "the largest averaged gradient on every step (σ above the expected batch"
                + (f": σ ≥ {worst.noise_multiplier:.3g}" if worst.noise_multiplier else "")
                + "), so the model would learn nothing"
            ], what="has a round worth training left")
    short = [f for f in forecasts if f.rounds < f.remaining]
    if short:
        fewest = min(short, key=lambda f: f.rounds)
        advice = ("Leave out --noise-multiplier to plan σ for every round, or give --target-epsilon."
                  if settings.noise_multiplier > 0 and settings.target_epsilon <= 0 else
                  "Their recorded history leaves no more; a new --out simulates a fresh federation.")
        err_console.print(
            f"[yellow]warning:[/yellow] the plan stops early: {len(short)} of {len(forecasts)} departments can "
            f"train only {fewest.rounds}–{max(f.rounds for f in short)} of the {fewest.remaining} rounds within "
            f"their budget (e.g. {fewest.department}: "
            + (f"σ={fewest.noise_multiplier:.3g}, " if fewest.noise_multiplier is not None else "")
            + f"budget ε={fewest.budget:g}{', ' + fewest.reason if fewest.reason else ''}). " + advice
        )
    return forecasts


def _stop_before_start(forecasts: list[Forecast], ledgers: Path, reasons: list[str],
                       what: str = "can train a single round") -> None:
    spent = [f for f in forecasts if f.epsilon_before > 0]
    err_console.print(
        f"[red]error:[/red] no department {what}, so nothing was started. "
        + (f"{len(spent)} of {len(forecasts)} departments in {ledgers} have already spent "
           f"ε {min(f.epsilon_before for f in spent):.3f}–{max(f.epsilon_before for f in spent):.3f} "
           f"of their budget ε≤{max(f.budget for f in forecasts):g}. " if spent else "")
        + "Why: " + "; ".join(reasons[:3])
        + ". A simulated department's budget covers every run in its output folder: give a new --out to "
        "simulate a fresh federation, or a larger --max-epsilon."
    )
    raise typer.Exit(2)


def _simulated_ledger(folder: Path, name: str):
    """A simulated department's ledger entries, read without creating anything (none yet: [])."""
    key = folder / f"{name}.key"
    if not key.exists():
        return []
    department = Department(name, None, folder, SIMULATED_DEFAULT_POLICY, key)
    path = department.ledger_path
    return PrivacyLedger(path, name, department.signer).entries if path.exists() else []


def _say_history(forecasts: list[Forecast], ledgers: Path) -> None:
    spent = [f for f in forecasts if f.epsilon_before > 0]
    if spent:
        console.print(
            f"{len(spent)} department ledger(s) in {ledgers} continue: their ε starts from the recorded "
            f"history (ε {min(f.epsilon_before for f in spent):.3f}–{max(f.epsilon_before for f in spent):.3f})."
        )
    nearly = [f for f in spent if f.budget and f.epsilon_before >= 0.9 * f.budget and f.noise_multiplier and f.useful]
    if nearly:
        worst = max(nearly, key=lambda f: f.noise_multiplier)
        err_console.print(
            f"[yellow]warning:[/yellow] {len(nearly)} department(s) have spent 90 % or more of their budget "
            f"(e.g. {worst.department}: ε {worst.epsilon_before:.3f} of {worst.budget:g}); what is left is spread "
            f"over the rounds at σ up to {worst.noise_multiplier:.3g}, so the model will learn little. "
            "A new --out simulates a fresh federation."
        )


def _run(settings: RunSettings, run_dir: Path, departments: int, cpus_per_department: int, verbose: bool) -> None:
    """Start the Simulation Engine on ``settings``, stream its progress, print the report."""
    # On SIGTERM unwind normally, so the SuperLink and its children are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix=".flower-", dir=run_dir))
    show = progress_filter(lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True), verbose)
    cluster = user_ray_cluster()
    if cluster is not None:  # else a private Ray on loopback (LocalFederation)
        err_console.print(
            f"[yellow]note:[/yellow] RAY_ADDRESS={escape(cluster)}: the departments' tables go to that Ray cluster, "
            "which fedsilo leaves as it is; Ray runs any code sent to it unless its authentication is on "
            "(RAY_AUTH_MODE=token) or only trusted hosts reach it. Unset RAY_ADDRESS for a private Ray on loopback.",
            markup=True, highlight=False,
        )
    try:
        with LocalFederation(workdir) as federation:
            outcome = federation.run(
                settings.to_run_config(),
                num_supernodes=departments,
                cpus_per_department=cpus_per_department,
                on_line=show,
                log_path=run_dir / "flower.log",
            )
    except FlowerError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    summary_path = run_dir / SUMMARY_FILE
    if not outcome.ok or not summary_path.exists():
        err_console.print(
            f"[red]error:[/red] run {outcome.run_id} ended as '{outcome.status}'. "
            f"Full log: {outcome.log_path}"
        )
        _print_tail(outcome.log_path)
        if (run_dir / CHECKPOINT_FILE).exists():
            err_console.print(f"Its completed rounds are kept: continue with `fedsilo simulate --resume {run_dir}`")
        raise typer.Exit(1)
    summary = print_run_report(run_dir, console)
    if summary["status"] == "failed":
        raise typer.Exit(1)
    console.print(f"Summary: {summary_path}")


def _show_schema(schema: DataSchema, run_dir: Path, given: bool) -> None:
    """Print the schema every department encodes with, and keep it in the run folder."""
    (run_dir / "schema.json").write_text(schema.to_json(indent=2) + "\n", encoding="utf-8")
    label = schema.label
    what = f"{label.task}, classes {', '.join(label.classes)}" if label.classes else f"{label.task}, scaled by mean {label.mean:.4g} and {label.scale:.4g}"
    console.print(
        f"Schema ({'given' if given else 'inferred from the held-out rows'}; saved to {run_dir / 'schema.json'}): "
        f"label '{label.column}' ({what}); {schema.num_features} features from"
    )
    for column in schema.columns:
        console.print(f"  {column.name}: {column.describe()}", markup=False, highlight=False)


def _print_tail(log_path: Path, lines: int = 25) -> None:
    try:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return
    for line in tail:
        err_console.print(ANSI.sub("", line), markup=False, highlight=False)
