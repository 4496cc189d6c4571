"""``fedsilo simulate``: many departments on one machine, on Flower's Simulation Engine."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Optional

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
from fedsilo.shared.config import ACCOUNTANTS, AGGREGATIONS, DEVICES, GRAD_SAMPLE_MODES, TASKS, ConfigError, RunSettings, publish
from fedsilo.shared.ledger import PrivacyLedger
from fedsilo.shared.settings import cli_options
from fedsilo.shared.runs import LATEST, SIMULATION, create_run_folder, keep_earlier_log, link_latest, new_run_name, refuse_with_resume, typed_options
from fedsilo.shared.data import DataError, simulated_federation, split_columns
from fedsilo.shared.schema import DataSchema

from fedsilo.server.progress import RunProgress, print_log_tail
from fedsilo.shared.flower_cli import FlowerError

from .local_federation import LocalFederation
from .ray_resources import SimulationResources, user_ray_cluster

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=option)
    return value


@cli_options("simulate", tail=("cpus_per_department", "gpus_per_department", "ray_address", "resume", "verbose"))
def simulate(
    ctx: typer.Context,
    departments: Annotated[Optional[int], typer.Option(min=1, help="Number of simulated departments (default 10; by:COLUMN and a folder decide it themselves).")] = None,
    schema: Annotated[Optional[Path], typer.Option(help="The data schema (JSON from `fedsilo schema infer`); default: inferred from the held-out rows.")] = None,
    cpus_per_department: Annotated[int, typer.Option(min=1, help="CPU cores Ray reserves per department.")] = 1,
    gpus_per_department: Annotated[float, typer.Option(min=0.0, help="GPUs Ray reserves per department (0.25: four share one GPU); 0 trains on CPU.")] = 0.0,
    ray_address: Annotated[Optional[str], typer.Option(help="Run the departments on this running Ray cluster (HOST:PORT of its head, ray://HOST:PORT, or auto; default RAY_ADDRESS, else a private Ray on this machine). Its security is yours: docs/how-to/ray-cluster.md.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this run folder (or OUT, for its latest run) from its last completed round, with its own settings.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's full log.")] = False,
    **options: Any,
) -> None:
    """Simulate a federation of departments on embedded data, then print a privacy report."""
    # torch here, not at import: every other `fedsilo` command starts without it.
    from fedsilo.shared.model_factory import check_spec, describe_grad_sample_mode, describe_size, is_factory, model_changes
    from fedsilo.shared.models import build_model
    from fedsilo.shared.pretrained import LoraSettings, resolve_model_option

    o = SimpleNamespace(**options)  # the run settings' options (shared/settings.py)
    _choice(o.accountant, ACCOUNTANTS, "--accountant")
    _choice(o.grad_sample_mode, GRAD_SAMPLE_MODES, "--grad-sample-mode")
    _choice(o.device, DEVICES, "--device")
    _choice(o.task, TASKS, "--task")
    _choice(o.aggregation, AGGREGATIONS, "--aggregation")
    try:
        resources = _resources(cpus_per_department, gpus_per_department, ray_address, o.device)
    except ConfigError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    if resume is not None:
        return _resume(ctx, resume, resources, verbose)
    out = o.out.expanduser().resolve()
    try:
        model, base_dir = resolve_model_option(o.model)  # hf:DIR → the base's digest, and this host's folder
        check_spec(model)
        spec = str(Path(o.dataset).expanduser().resolve()) if Path(o.dataset).expanduser().exists() else o.dataset
        if o.partition is None:  # label skew needs classes, and a folder is split already
            o.partition = "iid" if Path(spec).is_dir() or o.task == "regression" else "dirichlet:0.5"
        named = o.partition.strip().lower().startswith("by:") or Path(spec).is_dir()
        count = departments if departments is not None else (0 if named else 10)
        given = DataSchema.load(schema).to_json() if schema is not None else ""
        held_out = str(o.test_data.expanduser().resolve()) if o.test_data is not None else ""
        # Validate the data and model here, before any process starts.
        federation = simulated_federation(
            spec, o.label_column, split_columns(o.feature_columns), count, o.partition, o.seed,
            schema_json=given, test_data=held_out, task=o.task, base_model=base_dir, max_length=o.max_length,
        )
        parts, test = list(federation.parts), federation.test
        if o.task not in ("auto", test.task):
            raise ConfigError(f"--task {o.task}, but '{o.dataset}'" + (" with the given --schema" if given else "")
                              + f" is a {test.task} task; leave --task out or change the schema's label task")
        departments = len(parts)
        # A robust rule needs enough updates per round to tolerate --byzantine bad ones.
        least = 1 if o.aggregation == "fedavg" else least_updates(o.aggregation, o.byzantine, o.trim_fraction)
        if departments < least:
            raise ConfigError(
                f"--aggregation {o.aggregation} with --byzantine {o.byzantine} needs at least {least} departments "
                f"answering every round, and this federation has {departments}; simulate more departments "
                "or lower --byzantine"
            )
        changes = model_changes(model, test.input_shape, test.num_outputs, test.task) if o.fix_model else []
        lora = LoraSettings.parse(o.lora_rank, o.lora_alpha, o.lora_targets)
        built = build_model(model, test.input_shape, test.num_outputs, test.kind, seed=o.seed, task=test.task,
                            embeddings=test.embeddings, fix=o.fix_model, bases=(base_dir,) if base_dir else (), lora=lora)
        lora = getattr(built, "lora", lora)  # a base's adapted modules by name: every party builds the same
        dp_path = describe_grad_sample_mode(o.grad_sample_mode, built) if o.dp else ""
        settings = RunSettings(
            num_server_rounds=o.rounds,
            dataset=spec,
            label_column=o.label_column,
            feature_columns=o.feature_columns,
            partition=o.partition,
            seed=o.seed,
            model=model,
            base_model=base_dir,
            lora_rank=lora.rank,
            lora_alpha=lora.alpha,
            lora_targets=",".join(lora.targets),
            max_length=o.max_length,
            fix_model=o.fix_model,
            task=test.task,
            dp=o.dp,
            noise_multiplier=o.noise_multiplier or 0.0,
            target_epsilon=o.target_epsilon or 0.0,
            max_grad_norm=o.max_grad_norm,
            # The simulated departments' own policy decides; the run asks nothing beyond it.
            delta=0.0,
            max_epsilon=0.0,
            accountant="",
            local_epochs=o.local_epochs,
            batch_size=o.batch_size,
            learning_rate=o.learning_rate,
            momentum=o.momentum,
            grad_sample_mode=o.grad_sample_mode,
            device=o.device,
            base_dtype=o.base_dtype,
            fraction_train=o.fraction_train,
            aggregation=o.aggregation,
            trim_fraction=o.trim_fraction,
            byzantine=o.byzantine,
            max_update_norm=o.max_update_norm,
            min_departments=least,
            round_timeout=600.0,
            connect_timeout=120.0,
            out=str(out),
            run_name=new_run_name(),
            resume=False,
            test_data=held_out,
            # Every simulated department encodes with exactly the schema shown below.
            data_schema=federation.schema.to_json() if federation.schema is not None else "",
            central_dp=o.central_dp,
            central_noise_multiplier=o.central_noise_multiplier,
            central_clip_norm=o.central_clip_norm,
            central_delta=o.central_delta,
            central_max_epsilon=o.central_max_epsilon,
            central_ledger="",
            central_signing_key="",
            record="",
            record_signing_key="",
            secure_aggregation=o.secure_aggregation, secagg_threshold=o.secagg_threshold,
            secagg_bound=o.secagg_bound, secagg_frac_bits=o.secagg_frac_bits, secagg_max_weight=o.secagg_max_weight,
            distributed_dp=o.distributed_dp, sample_rate=o.sample_rate, ddp_colluders=o.ddp_colluders,
            ddp_scale=o.ddp_scale,
            simulated_policy=DepartmentPolicy(
                max_epsilon=o.max_epsilon, delta=o.delta, accountants=(o.accountant,), allow_non_private=not o.dp,
                models=(model,) if is_factory(model) else (), base_models=(base_dir,) if base_dir else (),
            ).to_json(),
        )
        check_aggregation(settings, least)  # every combination checked before anything starts
        # Distributed DP: the run-wide q and σ, planned as a pooled DP-SGD run would be.
        pooled = sum(len(p) for p in parts)
        from fedsilo.server.secure_aggregation import planned_distributed
        from fedsilo.shared.distributed_dp import DEFAULT_EPOCHS

        settings, layout = planned_distributed(settings, built, o.target_epsilon or o.max_epsilon, o.delta, pooled,
                                               rounds_given=bool(typed_options(ctx, ["rounds"])))
        distributed = distributed_forecast(settings, layout, departments, pooled) if layout else None
        if settings.secure_aggregation:  # three departments or more, a model of float arrays only
            from flwr.app import ArrayRecord

            from fedsilo.server.secure_aggregation import check_departments, check_model

            check_departments(departments)
            check_model(ArrayRecord(built.state_dict()))
        if o.central_dp and o.central_delta >= 1.0 / departments:
            raise ConfigError(
                f"--central-delta {o.central_delta:g} must be below 1/{departments} departments "
                "(at δ ≥ 1/N one department's update could be published outright)"
            )
    except (ConfigError, DataError, ValueError) as err:  # PolicyError, ModelError are ValueErrors
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None

    forecasts = preflight(settings, parts, out / "ledgers", distributed=distributed)
    run_dir = create_run_folder(out, settings.run_name)
    # What the Simulation Engine needs beyond the run config, for --resume.
    (run_dir / SIMULATION).write_text(json.dumps({"departments": departments}) + "\n", encoding="utf-8")
    if federation.schema is not None:
        _show_schema(federation.schema, run_dir, given=bool(given))
    if o.fix_model:
        console.print("--fix-model: " + ("; ".join(changes) if changes else "nothing to change, the model is valid for DP-SGD as it is"))
    if o.dp:
        console.print(f"Model {o.model} ({describe_size(built)}, {test.task}), per-sample gradients: {dp_path}")
    sizes = [len(p) for p in parts]
    console.print(
        f"[bold]fedsilo[/bold]: {departments} departments × {settings.num_server_rounds} rounds on '{Path(o.dataset).name if federation.schema is not None else test.name}' "
        f"({sum(sizes)} training examples, {min(sizes)}–{max(sizes)} per department, "
        f"{len(test)} held out), partition {o.partition}, "
        + (
            f"DP-SGD C={o.max_grad_norm:g}, "
            + (f"target ε={o.target_epsilon:g}" if o.target_epsilon else f"σ={o.noise_multiplier:g}" if o.noise_multiplier
               else "σ planned to spend each budget over the rounds")
            + f", δ={o.delta:g}, budget ε≤{o.max_epsilon:g}"
            if o.dp
            else "[yellow]no DP[/yellow]"
        )
        + (f", aggregation {o.aggregation}" if o.aggregation != "fedavg" else "")
        + (f", updates bounded to norm {o.max_update_norm:g}" if o.max_update_norm else "")
        + (
            f"; client-level DP σ={o.central_noise_multiplier:g}, C={o.central_clip_norm:g}, q={o.fraction_train:g}, "
            f"δ={o.central_delta:g}, budget ε≤{o.central_max_epsilon:g}"
            if o.central_dp
            else ""
        )
    )
    if settings.distributed_dp:
        planned = "" if typed_options(ctx, ["rounds"]) else f" ({DEFAULT_EPOCHS} passes over them: --rounds was not given)"
        console.print(
            f"Distributed DP: each of the {settings.num_server_rounds} rounds is one DP-SGD step over the {sum(sizes)} "
            f"pooled records{planned}, at q={settings.sample_rate:.4g} (expected batch "
            f"{settings.sample_rate * sum(sizes):.1f}), σ={settings.noise_multiplier:.4g}, the noise added in shares by "
            f"the departments under secure aggregation (assuming {settings.ddp_colluders} colluding)")
    console.print(f"Run {settings.run_name} in {run_dir} ({out / LATEST} points at it)")
    _say_history(forecasts, out / "ledgers")
    _run(settings, run_dir, departments, resources, verbose)


def _resources(cpus: int, gpus: float, ray_address: str | None, device: str) -> SimulationResources:
    """Where the departments run, checked against what this machine has when that is this machine."""
    import torch

    cluster = user_ray_cluster(address=ray_address)
    if gpus > 0 and device == "cpu":
        raise ConfigError(f"--gpus-per-department {gpus:g} reserves GPUs that --device cpu would leave idle; "
                          "drop one of the two")
    if gpus > 0 and cluster is None and torch.cuda.device_count() == 0:
        raise ConfigError(f"--gpus-per-department {gpus:g}, but this machine has no GPU that PyTorch can use "
                          f"(torch {torch.__version__}); install PyTorch's CUDA build, or run on a Ray cluster "
                          "with GPU nodes (--ray-address)")
    try:
        return SimulationResources(cpus, float(gpus), cluster)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _resume(ctx: typer.Context, run: Path, resources: SimulationResources, verbose: bool) -> None:
    """``--resume RUN_DIR``: the same run, with its own settings, from its last checkpoint."""
    try:
        refuse_with_resume(ctx, {"cpus_per_department", "gpus_per_department", "ray_address", "verbose"})
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
    _run(settings, run_dir, len(parts), resources, verbose)


def _departments_of(run_dir: Path) -> int:
    """How many departments the run simulated."""
    try:
        return int(json.loads((run_dir / SIMULATION).read_text(encoding="utf-8"))["departments"])
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{run_dir / SIMULATION} is missing or unreadable ({err}): not a run of "
                              "`fedsilo simulate`; resume a deployment run with `fedsilo coordinator run --resume`") from None


def distributed_forecast(settings: RunSettings, layout, departments: int, pooled: int):
    """Distributed DP's one-round mechanism and expected pooled batch, for the forecast."""
    from fedsilo.server.secure_aggregation import default_threshold
    from fedsilo.shared.distributed_dp import DistributedDpPlan

    plan = DistributedDpPlan.for_run(layout, settings, departments, settings.secagg_threshold or default_threshold(departments, True))
    return plan.mechanism(1), settings.sample_rate * pooled


def preflight(settings: RunSettings, parts, ledgers: Path, completed: int = 0, run_id: str = "",
              distributed=None) -> list[Forecast]:
    """Each simulated department's forecast from its ledger; stop here if none can train a round."""
    policy = simulated_policy(settings.simulated_policy, settings.model)
    forecasts = [
        forecast_department(part.name, settings, policy, len(part), _simulated_ledger(ledgers, part.name),
                            completed, run_id, distributed)
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


def _run(settings: RunSettings, run_dir: Path, departments: int, resources: SimulationResources, verbose: bool) -> None:
    """Start the Simulation Engine on ``settings``, show the run's events as it goes, print the report."""
    # On SIGTERM unwind normally, so the SuperLink and its children are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix=".flower-", dir=run_dir))
    if resources.on_cluster:  # else a private Ray on loopback (LocalFederation)
        err_console.print(
            f"[yellow]note:[/yellow] Ray cluster {escape(resources.ray_address)}: the departments' tables go to that "
            "cluster, which fedsilo leaves as it is; Ray runs any code sent to it unless its authentication is on "
            "(RAY_AUTH_MODE=token) or only trusted hosts reach it. Every node needs fedsilo installed and the run "
            "folder, data and ledgers at the same paths (a shared file system). Leave --ray-address out and unset "
            "RAY_ADDRESS for a private Ray on loopback.",
            markup=True, highlight=False,
        )
    try:
        with LocalFederation(workdir, resources=resources) as federation, \
                _progress(run_dir, verbose, federation.progress) as progress:
            # Only the department-scope settings go into the run config; the rest (the coordinator's,
            # the simulated departments' data, ledgers and policy) into the simulation's own FLWR_HOME,
            # which its ServerApp and Ray workers inherit.
            outcome = federation.run(
                publish(settings, federation.connection.home),
                num_supernodes=departments,
                on_line=progress.flower_line,
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
        print_log_tail(outcome.log_path, _say_error)
        if (run_dir / CHECKPOINT_FILE).exists():
            err_console.print(f"Its completed rounds are kept: continue with `fedsilo simulate --resume {run_dir}`")
        raise typer.Exit(1)
    summary = print_run_report(run_dir, console)
    if summary.status == "failed":
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


def _progress(run_dir: Path, verbose: bool, startup=None) -> RunProgress:
    """The run's events as progress lines on stdout, Flower's errors on stderr (``--verbose``: its whole log)."""
    return RunProgress(run_dir, lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True),
                       _say_error, verbose=verbose, startup=startup)


def _say_error(text: str) -> None:
    err_console.print(text, markup=False, highlight=False)
