"""``fedsilo department``: run this business unit's department client."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from fedsilo.shared.data import DataError, split_columns
from fedsilo.shared.flower_cli import FlowerError, stop_group, stop_tree, wait_for_port
from fedsilo.shared.ledger import LedgerError
from fedsilo.shared.pretrained import BaseModelError, open_base

from .limits import INPUT_WAIT, LimitError, RunLimits
from .policy import DepartmentPolicy, PolicyError, read_peers
from .supernode import DepartmentNode, DepartmentStartError, explain_exit

app = typer.Typer(help="Run a department client on this host, on this host's data.", no_args_is_help=True)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


@app.command("start")
def start(
    coordinator: Annotated[str, typer.Option(help="The coordinator's HOST:PORT.")],
    ca: Annotated[Path, typer.Option(help="The federation's ca.crt.")],
    key: Annotated[Path, typer.Option(help="This department's private key (from `certs add-department`).")],
    data: Annotated[Path, typer.Option(help="This department's table (.csv or .parquet).")],
    ledger: Annotated[Path, typer.Option(help="Folder for this department's privacy ledger (stays on this host).")],
    label_column: Annotated[str, typer.Option(help="The label column of --data.")] = "label",
    feature_columns: Annotated[str, typer.Option(help="Comma-separated feature columns to check (default: all but the label).")] = "",
    schema: Annotated[Optional[Path], typer.Option(help="The coordinator's published data schema: check that --data encodes with it before joining (each run still sends its own).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Department name shown to the coordinator (default: the key's file name). The ledger belongs to the key, whatever the name.")] = None,
    max_epsilon: Annotated[Optional[float], typer.Option(help="This department's budget: the whole-history ε it will never pass, whatever a run asks. Required.")] = None,
    delta: Annotated[float, typer.Option(help="This department's δ: every ε it states is at this δ; must be below 1/records.")] = 1e-5,
    accountants: Annotated[str, typer.Option(help="Accountants this department accepts, comma-separated; a run asking for none gets the first.")] = "pld,prv,rdp",
    allow_non_private: Annotated[bool, typer.Option("--allow-non-private", help="INSECURE: let runs train here without DP. Voids the ε of this department's whole ledger, for good.")] = False,
    min_noise_multiplier: Annotated[float, typer.Option(help="The smallest σ a round may use (0: only the budget limits it).")] = 0.0,
    max_sample_rate: Annotated[float, typer.Option(help="The largest Poisson sample rate a round may use.")] = 1.0,
    allow_model: Annotated[Optional[list[str]], typer.Option(help="A model factory package.module:callable this department runs, from its own installed environment (repeat for several). Built-in models are always allowed.")] = None,
    base_model: Annotated[Optional[list[Path]], typer.Option(help="A pretrained base this department fine-tunes: a Hugging Face folder (config.json, model.safetensors, tokenizer.json) on this host (repeat for several). A run names its base by the SHA-256 of its weights and is declined when none of these has them.")] = None,
    public_size: Annotated[Optional[int], typer.Option(help="A record count this department declares public: reported as its size (FedAvg weight) and planned from. Default: the count rounded down to its two leading binary digits (1797 → 1536), never the exact count.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Local port for the SuperNode's loopback API (default: a free one).")] = None,
    activation_wait: Annotated[float, typer.Option(min=0, help="Seconds to keep retrying when the coordinator does not accept this department yet (after a crash it counts the old start online for up to a minute).")] = 75.0,
    task_input_wait: Annotated[float, typer.Option(min=1, help="Seconds a task's message may take to arrive complete from the coordinator before it is given up (one left behind by a run that ended while the coordinator was unreachable never does).")] = INPUT_WAIT,
    require_secure_aggregation: Annotated[bool, typer.Option("--require-secure-aggregation", help="Decline every plain train request: this department sends its update only inside a secure sum (needs --peers).")] = False,
    peers: Annotated[Optional[Path], typer.Option(help="Secure aggregation's roster: a folder holding every department's NAME.pub (as `certs add-department` writes them), this department's own included. Without it every secure-aggregation request is declined.")] = None,
    secagg_min_threshold: Annotated[int, typer.Option(help="The smallest secure-aggregation threshold t this department accepts; it assumes c = t - 2 colluding departments and also requires 2t > n + c.")] = 3,
    ddp_min_colluders: Annotated[int, typer.Option(min=0, help="Distributed DP: the fewest departments a run may assume to collude with the coordinator (its noise shares are sized for them).")] = 0,
    limit: Annotated[Optional[list[str]], typer.Option(help="A limit on what one run may ask of this host, NAME=VALUE (repeat for several): max-steps-per-round, max-rounds, max-model-parameters, max-features, max-categories, max-classes, max-run-key-length, max-round-seconds, max-weight-magnitude, max-encoded-values. See docs/privacy.md for the defaults.")] = None,
) -> None:
    """Validate everything, then join the federation over TLS with this department's identity."""
    if max_epsilon is None:
        err_console.print(
            "[red]error:[/red] --max-epsilon is required: it is this department's own budget, the whole-history ε "
            "it will never pass whatever a run asks (e.g. --max-epsilon 8)"
        )
        raise typer.Exit(2)
    try:
        roster = _roster(peers, name or key.name, key, require_secure_aggregation)
        policy = DepartmentPolicy(
            max_epsilon=max_epsilon, delta=delta, accountants=tuple(split_columns(accountants)),
            allow_non_private=allow_non_private, min_noise_multiplier=min_noise_multiplier,
            max_sample_rate=max_sample_rate, public_size=public_size, models=tuple(allow_model or ()),
            limits=RunLimits.from_options(list(limit or ())),
            require_secure_aggregation=require_secure_aggregation, peers=roster,
            secagg_min_threshold=secagg_min_threshold, ddp_min_colluders=ddp_min_colluders,
            base_models=tuple(str(open_base(b).folder) for b in base_model or ()),
        )
    except (PolicyError, LimitError, BaseModelError) as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    node = DepartmentNode(
        name=name or key.name,
        coordinator=coordinator,
        ca=ca,
        key=key,
        data=data,
        label_column=label_column,
        ledger=ledger,
        policy=policy,
        local_port=port,
        feature_columns=split_columns(feature_columns),
        schema=schema,
    )
    from fedsilo.shared.model_factory import ModelError  # torch, which the executor loads next anyway

    try:
        rows = node.preflight()
    except (DepartmentStartError, DataError, LedgerError, PolicyError, ModelError, BaseModelError) as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    if allow_non_private:
        err_console.print(
            "[yellow]warning:[/yellow] --allow-non-private: runs may train on this department's data WITHOUT "
            "differential privacy; its ledger will then carry no finite ε"
        )
    console.print(
        f"department [bold]{node.name}[/bold]: {rows} records in {data}, ledger {node.ledger_file} "
        f"(identity {node.identity}), policy ε ≤ {policy.max_epsilon:g} at δ={policy.delta:g} "
        f"({', '.join(policy.accountants)}), reports size {policy.reported_size(rows)}"
        f"{' (declared public)' if policy.public_size is not None else ' (bucketed: two leading binary digits)'}, "
        f"models: built-in{''.join(', ' + m for m in policy.models)}"
        f"{''.join(', ' + open_base(b).describe() for b in policy.base_models)}, "
        f"{_secagg_summary(policy)}"
        f"coordinator {coordinator} (TLS verified)"
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _log_to(node.home / "department.log")
    deadline = time.monotonic() + activation_wait
    while True:
        code, tail = _serve(node, task_input_wait)
        if code in (0, None, -signal.SIGTERM):
            return
        if _activation_refused(tail) and time.monotonic() + ACTIVATION_RETRY_S < deadline:
            console.print(
                f"department {node.name}: the coordinator did not accept it yet — either its key is not "
                "registered, or the coordinator still counts an earlier start of it online (up to a minute "
                f"after a crash); retrying in {ACTIVATION_RETRY_S:g} s"
            )
            time.sleep(ACTIVATION_RETRY_S)
            continue
        err_console.print(f"[red]error:[/red] {explain_exit(chr(10).join(tail), node.name)}")
        raise typer.Exit(1)


ACTIVATION_RETRY_S = 10.0


def _roster(peers: Path | None, name: str, key: Path, required: bool) -> tuple[tuple[str, str], ...]:
    """``--peers``' roster, its own key checked against ``--key``; none without the option."""
    if peers is None:
        if required:
            raise PolicyError("--require-secure-aggregation needs --peers DIR: the roster of the departments "
                              "it sums with (every department's NAME.pub)")
        return ()
    from fedsilo.shared.signing import Signer, SigningKeyError

    try:
        own = Signer.from_file(key).public_key
    except SigningKeyError as err:
        raise PolicyError(f"--key: {err}") from None
    return read_peers(peers, name, own)


def _secagg_summary(policy: DepartmentPolicy) -> str:
    if not policy.peers:
        return ""
    required = "required" if policy.require_secure_aggregation else "accepted"
    return (f"secure aggregation {required} with {len(policy.peers)} peers (t ≥ {policy.secagg_min_threshold}), ")


def _activation_refused(tail: list[str]) -> bool:
    return any("Failed to activate SuperNode" in line for line in tail)


def _serve(node: DepartmentNode, task_input_wait: float = INPUT_WAIT) -> tuple[int | None, list[str]]:
    """Run the SuperNode and answer its tasks until it stops; its exit code and last lines."""
    proc, runtime = node.launch()
    tail: list[str] = []

    def relay() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            del tail[:-40]
            console.print(line.rstrip(), markup=False, highlight=False)

    # Read in a thread: the executor answers tasks in this (main) thread.
    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    stop = threading.Event()
    executor = None
    try:
        host, port = runtime.rsplit(":", 1)
        wait_for_port(host, int(port), proc, 60.0, node.home / "department.log")
        from .executor import DepartmentExecutor  # Flower's runtime client: only once the node runs

        executor = DepartmentExecutor(node.name, runtime, node.secret.read_bytes(), node.local_config(),
                                      input_wait=task_input_wait)
        # Import torch, Opacus and the ClientApp now, once, not per message.
        executor.app  # noqa: B018
        console.print(f"department [bold]{node.name}[/bold]: answering with the fedsilo installed here "
                      f"(runtime API {runtime}, protected by {node.secret})")
        executor.serve(stop, alive=lambda: proc.poll() is None)
    except (FlowerError, KeyboardInterrupt):
        pass  # a SuperNode that died before opening its API is explained by the caller
    finally:
        stop.set()
        if executor is not None:
            executor.close()
        stop_tree(proc)
        stop_group(proc.pid)
        reader.join(timeout=5)
    return proc.returncode, tail


def _log_to(path: Path) -> None:
    """The executor's log (refusals, full error texts) stays on this host, in this file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fedsilo.department")
    logger.addHandler(handler)
    logger.addHandler(logging.StreamHandler())
    logger.setLevel(logging.INFO)
