"""``fedsilo coordinator``: start the coordinator, admit departments, run training."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedsilo.certs.authority import CertError, CertPaths
from fedsilo.shared.config import ConfigError, RunSettings, publish, withdraw
from fedsilo.shared.settings import cli_options
from fedsilo.shared.data import DataError, load_table, table_schema, split_columns
from fedsilo.shared.schema import DataSchema
from fedsilo.shared.flower_cli import FlowerError

from . import coordinator as coord
from .proxy import ProxyError
from fedsilo.shared.record import RECORD_FILE

from fedsilo.shared.runs import create_run_folder, keep_earlier_log, link_latest, new_run_name, refuse_with_resume, typed_options

from .checkpoint import CHECKPOINT_FILE, CheckpointError, resumable
from .progress import RunProgress
from .report import print_run_report
from .robust import check_aggregation
from .summary import SUMMARY_FILE

app = typer.Typer(help="The enterprise coordinator: TLS, registered departments, training runs.", no_args_is_help=True)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _fail(err: object, code: int = 2) -> None:
    err_console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(code)


STATE_HELP = "The coordinator's state folder (the one given to `coordinator start`): where its loopback Control endpoint is recorded."


@app.command("start")
def start(
    certs: Annotated[Path, typer.Option(help="Certificate folder from `fedsilo certs init`.")],
    address: Annotated[str, typer.Option(help="Public HOST:PORT departments reach: nginx serves only their Fleet API there.")] = "0.0.0.0:9443",
    state: Annotated[Path, typer.Option(help="Folder for the database (keeps registrations), logs, proxy config and the SuperExec secret.")] = Path("state"),
    control_port: Annotated[Optional[int], typer.Option(help="The SuperLink's loopback port for Control and Runtime (default: a free one).")] = None,
) -> None:
    """Run the coordinator: a loopback SuperLink and its SuperExec behind nginx, as one unit."""
    node = coord.Coordinator(certs, address, state, control_port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        coord.split_address(address)
        unit = node.launch()
    except (CertError, ValueError, ProxyError, FlowerError) as err:
        _fail(err)
    info = coord.control_endpoint(state)
    console.print(
        f"coordinator on https://{address} (nginx: the departments' Fleet API only) — TLS with "
        f"{CertPaths(certs).coordinator_cert}, only registered departments admitted; Control and "
        f"Runtime on {info['control']} (loopback); state in {state}"
    )
    code = None
    try:
        name, code = unit.wait()
        if code not in (0, None):
            err_console.print(f"[red]error:[/red] {name} stopped with exit code {code}; see {state}; stopping the coordinator")
    except (KeyboardInterrupt, SystemExit):
        code = 0
    finally:
        unit.stop()
    if code not in (0, None, -signal.SIGTERM):
        raise typer.Exit(1)


@app.command("register")
def register(
    names: Annotated[Optional[list[str]], typer.Argument(help="Departments to admit (default with --all: every key in certs/departments).")] = None,
    certs: Annotated[Path, typer.Option(help="Certificate folder (ca.crt, departments/NAME.pub).")] = Path("certs/out"),
    address: Annotated[str, typer.Option(help="The coordinator's public HOST:PORT (shown; Control is reached on loopback via --state).")] = "127.0.0.1:9443",
    state: Annotated[Path, typer.Option(help=STATE_HELP)] = Path("state"),
    all_: Annotated[bool, typer.Option("--all", help="Register every department key in the folder.")] = False,
) -> None:
    """Admit departments by registering their public keys under their names."""
    paths = CertPaths(certs)
    chosen = list(names or [])
    if all_:
        chosen += [p.name[: -len(".pub")] for p in sorted(paths.departments.glob("*.pub"))]
    if not chosen:
        _fail("name at least one department, or pass --all")
    try:
        connection = coord.connect(certs, state)
        for name in dict.fromkeys(chosen):
            console.print(f"{name}: {coord.register(connection, name, paths.department_public(name))}")
    except (FileNotFoundError, FlowerError, ValueError) as err:
        _fail(err, 1)


@app.command("departments")
def departments(
    certs: Annotated[Path, typer.Option(help="Certificate folder (for ca.crt).")] = Path("certs/out"),
    address: Annotated[str, typer.Option(help="The coordinator's public HOST:PORT (shown; Control is reached on loopback via --state).")] = "127.0.0.1:9443",
    state: Annotated[Path, typer.Option(help=STATE_HELP)] = Path("state"),
) -> None:
    """List registered departments and whether they are online."""
    try:
        nodes = coord.registered(coord.connect(certs, state))
    except (FileNotFoundError, FlowerError, ValueError) as err:
        _fail(err, 1)
    table = Table(title=f"departments registered at {address}")
    for column in ("node id", "status", "online since"):
        table.add_column(column)
    for node in nodes:
        table.add_row(str(node["node_id"]), node["status"], str(node["online_at"] or "-"))
    console.print(table)


@app.command("run")
@cli_options("coordinator", tail=("resume", "verbose"))
def run(
    ctx: typer.Context,
    certs: Annotated[Path, typer.Option(help="Certificate folder (for ca.crt).")] = Path("certs/out"),
    address: Annotated[str, typer.Option(help="The coordinator's public HOST:PORT (shown; Control is reached on loopback via --state).")] = "127.0.0.1:9443",
    state: Annotated[Path, typer.Option(help=STATE_HELP)] = Path("state"),
    schema: Annotated[Optional[Path], typer.Option(help="The public data schema every department encodes with (from `fedsilo schema infer`, edited as needed). Default: inferred from --test-data.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this run folder (or OUT, for its latest run) from its last completed round, with its own settings.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's full log.")] = False,
    **options: Any,
) -> None:
    """Train across the connected departments; write RUN_DIR/summary.json."""
    # torch only for the commands that build a model: `coordinator departments` and the like start fast.
    from fedsilo.shared.model_factory import check_spec, describe_grad_sample_mode, model_changes
    from fedsilo.shared.models import build_model
    from fedsilo.shared.pretrained import LoraSettings, bind_tokenizer, open_base, pretrained_schema, resolve_model_option

    o = SimpleNamespace(**options)  # the run settings' options (shared/settings.py)
    if resume is not None:
        return _resume(ctx, resume, certs, state, verbose)
    if o.test_data is None:
        _fail("--test-data is required: the coordinator's own held-out table (only --resume takes the run's own)")
    out = o.out.expanduser().resolve()
    try:
        model, base_dir = resolve_model_option(o.model)  # hf:DIR → the base's digest, and this host's folder
        check_spec(model)
        base = open_base(base_dir) if base_dir else None
        schema = (bind_tokenizer(DataSchema.load(schema), base) if schema is not None
                  else table_schema(o.test_data, o.label_column, split_columns(o.feature_columns), o.task))
        if base is not None and schema.token_column is None:
            schema = pretrained_schema(schema, base, o.max_length)
        # The coordinator's own table must fit the schema, and the model must be trainable with DP-SGD.
        held_out = load_table(o.test_data, schema.label.column, schema=schema)
        changes = model_changes(model, held_out.input_shape, held_out.num_outputs, held_out.task) if o.fix_model else []
        lora = LoraSettings.parse(o.lora_rank, o.lora_alpha, o.lora_targets)
        built = build_model(model, held_out.input_shape, held_out.num_outputs, "tabular", seed=o.seed, task=held_out.task,
                            embeddings=held_out.embeddings, fix=o.fix_model, bases=(base_dir,) if base_dir else (), lora=lora)
        lora = getattr(built, "lora", lora)  # a base's adapted modules by name: every party builds the same
        settings = RunSettings.from_run_config(
            {
                "num-server-rounds": o.rounds, "dataset": str(o.test_data.resolve()), "label-column": schema.label.column,
                "seed": o.seed, "dp": o.dp, "task": schema.task, "fix-model": o.fix_model,
                "noise-multiplier": o.noise_multiplier or 0.0, "target-epsilon": o.target_epsilon or 0.0,
                "max-grad-norm": o.max_grad_norm, "delta": o.delta or 0.0, "max-epsilon": o.max_epsilon or 0.0,
                "accountant": o.accountant or "",
                "local-epochs": o.local_epochs, "batch-size": o.batch_size, "learning-rate": o.learning_rate,
                "momentum": o.momentum, "min-departments": o.min_departments, "round-timeout": o.round_timeout,
                "connect-timeout": o.connect_timeout, "out": str(out), "run-name": new_run_name(),
                "test-data": str(o.test_data.resolve()),
                "aggregation": o.aggregation, "trim-fraction": o.trim_fraction, "byzantine": o.byzantine,
                "max-update-norm": o.max_update_norm,
                "secure-aggregation": o.secure_aggregation, "secagg-threshold": o.secagg_threshold,
                "secagg-bound": o.secagg_bound, "secagg-frac-bits": o.secagg_frac_bits,
                "secagg-max-weight": o.secagg_max_weight,
                "distributed-dp": o.distributed_dp, "sample-rate": o.sample_rate, "ddp-colluders": o.ddp_colluders,
                "ddp-scale": o.ddp_scale,
                "data-schema": schema.to_json(), "model": model, "fraction-train": o.fraction_train,
                "device": o.device, "base-dtype": o.base_dtype,
                "base-model": base_dir, "lora-rank": lora.rank, "lora-alpha": lora.alpha,
                "lora-targets": ",".join(lora.targets), "max-length": o.max_length,
                "central-dp": o.central_dp, "central-noise-multiplier": o.central_noise_multiplier,
                "central-clip-norm": o.central_clip_norm, "central-delta": o.central_delta,
                "central-max-epsilon": o.central_max_epsilon,
                "central-ledger": str(o.central_ledger.expanduser().resolve()),
                # The coordinator signs its ledger with its TLS key: the audit checks it against coordinator.crt.
                "central-signing-key": str(CertPaths(certs).coordinator_key.resolve()) if o.central_dp else "",
                # The coordinator's signed record of acknowledged ledger heads: kept across runs, in its state.
                "record": str((state / "record" / RECORD_FILE).expanduser().resolve()),
                "record-signing-key": str(CertPaths(certs).coordinator_key.resolve()),
            }
        )
        check_aggregation(settings, o.min_departments)  # the rule fits --min-departments
        # Distributed DP: the run-wide σ, planned for the run's ask; each department checks it.
        from .secure_aggregation import planned_distributed

        settings, _ = planned_distributed(settings, built, o.target_epsilon or o.max_epsilon or 0.0, o.delta or 0.0,
                                          rounds_given=bool(typed_options(ctx, ["rounds"])))
        if settings.secure_aggregation:  # three departments or more, a model of float arrays only
            from flwr.app import ArrayRecord

            from .secure_aggregation import check_departments, check_model

            check_departments(o.min_departments, "--min-departments")
            check_model(ArrayRecord(built.state_dict()))
        if not CertPaths(certs).coordinator_key.exists():
            raise FileNotFoundError(
                f"the coordinator signs its record of the departments' ledger heads with "
                f"{CertPaths(certs).coordinator_key}, which is missing; run this on the coordinator host with its --certs folder"
            )
        if o.central_dp and not CertPaths(certs).coordinator_key.exists():
            raise FileNotFoundError(
                f"--central-dp signs the coordinator's ledger with {CertPaths(certs).coordinator_key}, "
                "which is missing; run this on the coordinator host with its --certs folder"
            )
        connection = coord.connect(certs, state)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        _fail(err)
    run_dir = create_run_folder(out, settings.run_name)
    (run_dir / "schema.json").write_text(schema.to_json(indent=2) + "\n", encoding="utf-8")
    console.print(
        f"[bold]fedsilo[/bold]: {settings.num_server_rounds} rounds at {address}, at least {o.min_departments} departments, "
        f"{schema.task} on {schema.num_features} features"
        + (f" ({len(schema.label.classes)} classes)" if schema.label.classes else "")
        + f", model {o.model}, aggregation {o.aggregation}, evaluated on {o.test_data}; run {settings.run_name} in {run_dir}"
    )
    if o.fix_model:
        console.print("--fix-model: " + ("; ".join(changes) if changes else "nothing to change"))
    if o.dp:
        console.print(f"per-sample gradients: {describe_grad_sample_mode('auto', built)}"
                      + ("" if o.noise_multiplier or o.target_epsilon else "; σ: each department plans it to spend its own budget over the rounds"))
    _submit(connection, settings, run_dir, verbose, state)


def _resume(ctx: typer.Context, run: Path, certs: Path, state: Path, verbose: bool) -> None:
    """``--resume RUN_DIR``: the same run, with its own settings, from its last checkpoint.

    Only the timeouts may change (e.g. a longer ``--round-timeout`` for a department
    that came back slow); any other option given beside ``--resume`` is refused.
    """
    try:
        refuse_with_resume(ctx, {"certs", "address", "state", "verbose", "round_timeout", "connect_timeout"})
        run_dir, checkpoint = resumable(run)
        changed = {name.replace("_", "-"): ctx.params[name] for name in typed_options(ctx, ["round_timeout", "connect_timeout"])}
        settings = RunSettings.from_run_config({**checkpoint.settings, **changed, "resume": True})
        connection = coord.connect(certs, state)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as err:
        _fail(err)
    console.print(
        f"[bold]fedsilo[/bold]: resuming {run_dir.name} after round {checkpoint.round} of {settings.num_server_rounds}, "
        "with its own settings" + "".join(f", {key} {value:g} s" for key, value in changed.items())
        + "; a department that already trained the interrupted round sends that update "
        "again instead of training twice"
    )
    link_latest(run_dir.parent, run_dir.name)
    keep_earlier_log(run_dir)  # the killed attempt's Flower log stays, as flower.1.log
    _submit(connection, settings, run_dir, verbose, state)


def _submit(connection, settings: RunSettings, run_dir: Path, verbose: bool, state: Path) -> None:
    """Submit the run through loopback Control, show its events as it goes, print the report.

    The run config carries only the department-scope settings; the coordinator's own
    stay in a 0600 file in the SuperExec's FLWR_HOME, where the ServerApp reads them.
    """
    progress = RunProgress(run_dir, lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True),
                           lambda text: err_console.print(text, markup=False, highlight=False), verbose=verbose)
    home = coord.superexec_home(state)
    run_config = publish(settings, home)
    try:
        with progress:
            outcome = coord.submit(connection, run_config, run_dir / "flower.log", progress.flower_line)
    except FlowerError as err:
        _fail(err, 1)
    finally:
        withdraw(run_config, home)  # the ServerApp read it at its start (and removes it itself)
    summary_path = run_dir / SUMMARY_FILE
    status = print_run_report(run_dir, console).status if summary_path.exists() else "failed"
    if not outcome.ok or status in ("failed", "too-few-updates"):
        if (run_dir / CHECKPOINT_FILE).exists():
            err_console.print(f"Its completed rounds are kept: continue with `fedsilo coordinator run --resume {run_dir}`")
        _fail(f"run {outcome.run_id} ended as '{outcome.status}'; full log: {outcome.log_path}", 1)
    if status in ("declined", "app-refused"):
        _fail(f"run {outcome.run_id}: no department would train it ({status}); see above", 1)
