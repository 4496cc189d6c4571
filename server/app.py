"""The coordinator's Flower ServerApp: weighted FedAvg, evaluation, summary, model.

Each round: send the global model to the sampled departments, average the
updates of those that trained, score it on the coordinator's held-out table
with the task's metrics, and rewrite ``RUN_DIR/summary.json``.  The run ends
early — cleanly — when every department that answered refused on budget
grounds.  At the end the model is written as safetensors with a model card
signed by the coordinator (:mod:`fedsilo.shared.model_card`).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

import torch

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedsilo.shared.config import RunSettings, withdraw
from fedsilo.shared.data import Dataset, load_table, simulated_federation, split_columns
from fedsilo.shared.metrics import score
from fedsilo.shared.model_factory import describe_grad_sample_mode
from fedsilo.shared.models import build_model
from fedsilo.shared.pretrained import bind_tokenizer, find_base, is_pretrained, lora_of
from fedsilo.shared.record import verify_record
from fedsilo.shared.runs import create_run_folder, link_ledgers, new_run_name
from fedsilo.shared.schema import DataSchema
from fedsilo.shared.train_request import TrainRequest

from .acknowledgements import HeadKeeper, open_record, registered_keys
from .central_dp import ClientLevelDP, CoordinatorBudgetExhausted, client_level_dp
from fedsilo.shared.model_card import CARD_FILE, WEIGHTS_FILE, build_card, pretrained_section, save_weights, sign_card, write_card
from .checkpoint import Checkpoint, resumable
from .grid_exchange import exchange
from .robust import TooFewUpdates, department_strategy
from fedsilo.secagg import SecAggAborted
from .secure_aggregation import SecureAggregation
from .secure_fedavg import SecureFedAvg
from .strategy import DepartmentFedAvg
from .events import ECHO_TAG, DepartmentLeftOut, Event, EventLog, Notice, RoundCompleted, RunEnded, RunResumed, RunStarted
from .summary import RunSummary

MODEL_FILE = WEIGHTS_FILE
PROGRESS_TAG = ECHO_TAG

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # The run config holds the department-scope settings; the coordinator's own (paths, keys,
    # aggregation, client-level DP, timeouts) are read on this host (shared/config.py).
    try:
        settings = RunSettings.from_run_config(context.run_config).with_host_settings()
        out = Path(settings.out).expanduser().resolve()
        # The run's name is its folder and its id in every ledger, the same across resumes.
        name = settings.run_name or new_run_name()
        run_dir = out / name if settings.resume else create_run_folder(out, name)
        run_federation(grid, settings, out, run_dir, run_id=name, flower_run_id=str(context.run_id))
    finally:
        withdraw(context.run_config)  # read once, at the start; a resume is submitted afresh


def run_federation(grid: Grid, settings: RunSettings, out: Path, run_dir: Path, run_id: str,
                   flower_run_id: str = "") -> RunSummary:
    """The round loop; returns the finished summary (also written to ``run_dir``).

    ``out`` holds what outlives the run (a simulation's ledgers, the record, the
    client-level ledger); ``run_dir`` is this run's own folder.  With
    ``settings.resume`` the run continues from ``run_dir``'s checkpoint.
    """
    checkpoint = resume_point(settings, run_dir) if settings.resume else None
    test = coordinator_test_set(settings)
    model = build_model(settings.model, test.input_shape, test.num_outputs, test.kind, seed=settings.seed,
                        task=test.task, embeddings=test.embeddings, fix=settings.fix_model,
                        bases=coordinator_bases(settings), lora=lora_of(settings))
    dp_path = describe_grad_sample_mode(settings.grad_sample_mode, model) if settings.dp else "none (no DP)"
    if checkpoint is not None:
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in checkpoint.arrays.items()})
    arrays = ArrayRecord(model.state_dict())
    # Secure aggregation refuses what it cannot do (robust rules, --central-dp, non-float models) here.
    secure = SecureAggregation(settings, run_id, arrays) if settings.secure_aggregation or settings.distributed_dp else None
    departments = department_strategy(
        settings,
        # With client-level DP the wrapper Poisson-samples at fraction-train itself.
        fraction_train=1.0 if settings.central_dp else settings.fraction_train,
        min_train_nodes=settings.min_departments,
        min_available_nodes=settings.min_departments,
    ) if secure is None else SecureFedAvg(secure=secure, fraction_train=1.0, min_train_nodes=settings.min_departments,
                                          min_available_nodes=settings.min_departments)
    departments.heads = HeadKeeper(open_record(settings, out))
    if checkpoint is not None and checkpoint.optimizer and isinstance(departments, SecureFedAvg):
        departments.restore_optimizer_state(checkpoint.optimizer)
    strategy = client_level_dp(settings, departments, out, run_id) if settings.central_dp else departments
    metrics = score(model, test)
    if checkpoint is None:
        summary = RunSummary(
            run_dir, run_id, settings.to_run_config(),
            {"name": test.name, "num_test": len(test), "num_classes": test.num_classes, "task": test.task},
            record=departments.heads.record.path,
        )
        summary.set_initial(metrics, test.task)
        summary.summary.dp_path = dp_path
        summary.set_traffic(arrays, model)
        if isinstance(strategy, ClientLevelDP):
            summary.set_central(strategy)
        announce(summary, RunStarted(run=run_id, run_dir=str(run_dir), task=test.task, model=settings.model,
                                     per_sample_gradients=dp_path, rounds=settings.num_server_rounds,
                                     initial=dict(metrics)))
    else:
        summary = RunSummary.restore(run_dir, checkpoint.summary)
        summary.events = EventLog(run_dir)
        summary.resumed(checkpoint.round, flower_run_id)
        if isinstance(strategy, ClientLevelDP) and checkpoint.central_entries is not None:
            charged = len(strategy.ledger.entries) - checkpoint.central_entries
            if charged > 0:  # released into a run that died before its checkpoint: it stays counted
                summary.summary.resumes[-1].central_charged_and_rerun = charged
                announce(summary, Notice(text=f"{charged} client-level release(s) were charged after the last "
                                          "checkpoint; the re-run round is charged again (the coordinator's ε counts "
                                          "both: an over-count, never an under-count)"), WARNING)
        announce(summary, RunResumed(run=run_id, after_round=checkpoint.round, rounds=settings.num_server_rounds,
                                     task=test.task, metrics=dict(metrics)))
    summary.summary.flower_run_ids.append(flower_run_id)
    link_ledgers(out, run_dir)

    status, reason = "completed", ""
    exhausted: set[str] = set(checkpoint.exhausted) if checkpoint else set()  # refused on budget grounds
    first = checkpoint.round + 1 if checkpoint else 1
    for rnd in range(first, settings.num_server_rounds + 1):
        started = time.time()
        connected = wait_for_departments(grid, settings.min_departments, settings.connect_timeout)
        if connected < settings.min_departments:
            reason = (
                f"round {rnd}: only {connected} department(s) connected within "
                f"{settings.connect_timeout:g} s, fewer than --min-departments "
                f"{settings.min_departments}; stopping"
            )
            announce(summary, Notice(text=reason, round=rnd), WARNING)
            summary.finish("failed", reason)
            raise RuntimeError(reason)
        if settings.central_dp and settings.central_delta >= 1.0 / connected:
            reason = (
                f"central-delta {settings.central_delta:g} is not below 1/{connected} departments: "
                "at that δ a mechanism may publish one department's update outright; lower --central-delta"
            )
            summary.finish("failed", reason)
            raise RuntimeError(reason)
        departments.node_names, departments.heads.registered = node_registry(grid)
        if secure is not None and secure.session is None:  # one session per run, opened before its first round
            try:
                setup = secure.open(grid, departments.node_names, rnd, settings.num_server_rounds - rnd + 1,
                                    departments.heads.registered)
            except SecAggAborted as err:
                status, reason = "secure-aggregation-aborted", f"round {rnd}: secure aggregation could not start: {err}"
                announce(summary, Notice(text=reason, round=rnd), WARNING)
                break
            summary.add_secagg_session(setup)
            announce(summary, Notice(text=(
                f"secure aggregation: {len(setup.dealt)}/{len(setup.participants)} departments dealt their shares, "
                f"threshold {setup.threshold}, {setup.modulus_bits}-bit sums of {setup.vector_length} coordinates; "
                f"setup {setup.setup_bytes} bytes in {setup.setup_seconds:.2f} s"), round=rnd))
        if secure is not None and secure.session is not None and not departments.node_names:
            departments.node_names = dict(secure.name_of)  # a simulation: the names its departments gave
        # The client-level ledger before this round: a release charged in a round that then fails is
        # named when the run resumes (and the round is charged again: an over-count, never an under-count).
        central_before = len(strategy.ledger.entries) if isinstance(strategy, ClientLevelDP) else None
        optimizer_before = _optimizer_state(departments)

        def keep_failed(reason: str, report=None) -> None:
            """The failed round in the summary, and a checkpoint of the rounds before it to resume from."""
            summary.add_failed_round(rnd, report, reason, time.time() - started)
            Checkpoint(run_id, rnd - 1, settings.to_run_config(), summary.summary.to_dict(),
                       {k: v.numpy() for k, v in arrays.items()}, sorted(exhausted), central_before,
                       optimizer_before).save(run_dir)

        try:
            # The run's name, not Flower's run id, names the run in the departments' ledgers.
            request = ConfigRecord(TrainRequest(run_key=run_id, server_round=rnd).to_config())
            messages = list(strategy.configure_train(rnd, arrays, request, grid))
        except CoordinatorBudgetExhausted as err:
            status, reason = "central-budget-exhausted", f"round {rnd}: {err}; the run ends here"
            announce(summary, Notice(text=reason, round=rnd), WARNING)
            break
        except Exception as err:
            reason = failure_reason(rnd, "could not start the round", err)
            keep_failed(reason)
            summary.finish("failed", reason)
            raise RuntimeError(reason) from err
        replies = exchange(grid, messages, settings.round_timeout) if messages else []
        try:
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
            if new_arrays is not None:
                model.load_state_dict(new_arrays.to_torch_state_dict())
                new_metrics = score(model, test)
        except SecAggAborted as err:  # too few answered to unmask: nothing released, the model unchanged
            said = str(err) if str(err).startswith(f"round {rnd}:") else f"round {rnd}: {err}"
            status, reason = "secure-aggregation-aborted", f"{said}; the run ends here"
            keep_failed(reason, departments.last_report)
            announce(summary, Notice(text=reason, round=rnd), WARNING)
            break
        except TooFewUpdates as err:  # a robust rule without its guarantee: keep the model, end cleanly
            status, reason = "too-few-updates", f"{err}; the run ends here"
            keep_failed(reason, departments.last_report)
            announce(summary, Notice(text=reason, round=rnd), WARNING)
            break
        except Exception as err:  # never a summary left "running": the rounds so far, why, a checkpoint
            reason = failure_reason(rnd, "could not aggregate the round", err)
            announce(summary, Notice(text=reason, round=rnd), WARNING)
            keep_failed(reason, departments.last_report)
            summary.finish("failed", reason)
            raise RuntimeError(reason) from err
        report = departments.last_report
        release = strategy.last_release if isinstance(strategy, ClientLevelDP) else None
        if new_arrays is not None:
            arrays, metrics = new_arrays, new_metrics
        summary.add_round(rnd, metrics, report, time.time() - started, release)
        link_ledgers(out, run_dir)
        for status_name, left_out in (("refused", report.refused), ("rejected", report.rejected),
                                      ("failed", report.failed), ("incompatible", report.incompatible),
                                      ("declined", report.declined), ("rolled-back", report.rolled_back)):
            for name, why in sorted(left_out.items()):
                summary.events.emit(DepartmentLeftOut(round=rnd, department=name, status=status_name, reason=str(why)))
        for name, why in sorted((report.secagg.left_out if report.secagg else {}).items()):
            if name not in report.rejected:  # a bad secure-aggregation answer after masking: it counts as dropped
                summary.events.emit(DepartmentLeftOut(round=rnd, department=name, status="secagg-left-out", reason=why))
        counts = {"trained": len(report.trained), "refused": len(report.refused),
                  "failed": len(report.failed) + len(report.rejected), "refused-app": len(report.incompatible),
                  "declined": len(report.declined), "rolled-back": len(report.rolled_back),
                  "replayed": len(report.replayed), "bounded": len(report.clipped)}
        announce(summary, RoundCompleted(
            round=rnd, rounds=settings.num_server_rounds, task=test.task, metrics=dict(metrics),
            epsilon=dict(report.epsilon), counts=counts,
            client_level=({"sampled": release.sampled, "population": release.population, "epsilon": release.epsilon}
                          if release else None),
            secure_aggregation=_secagg_line(report.secagg),
        ))
        exhausted |= set(report.refused)
        exhausted -= set(report.trained)
        # The round is complete: from here a restart resumes after it.
        Checkpoint(run_id, rnd, settings.to_run_config(), summary.summary.to_dict(), {k: v.numpy() for k, v in arrays.items()},
                   sorted(exhausted), len(strategy.ledger.entries) if isinstance(strategy, ClientLevelDP) else None,
                   _optimizer_state(departments)).save(run_dir)
        if report.trained or (release is not None and not messages):
            continue  # a Poisson sample may be empty: the noisy release still happened
        if release is not None and report.refused and len(exhausted) < release.population:
            continue  # only this round's sample is out of budget; others may still train
        status, reason = no_one_trained(rnd, report)
        if status:
            announce(summary, Notice(text=reason, round=rnd), WARNING)
            break
        summary.finish("failed", f"round {rnd}: no department trained: {report.failed or report.rejected}")
        raise RuntimeError(f"round {rnd}: no department produced a usable update")

    write_model(run_dir, model, settings, test, metrics, summary, departments, status, run_id, dp_path)
    summary.finish(status, reason, MODEL_FILE, CARD_FILE)
    log(INFO, "%s %s", PROGRESS_TAG, RunEnded(status=status, reason=reason, task=test.task, metrics=dict(metrics)).describe())
    return summary


def announce(summary: RunSummary, event: Event, level: int = INFO) -> None:
    """Append ``event`` to the run's events (what the CLI follows) and say it in the log, as before."""
    if summary.events is None:
        summary.events = EventLog(summary.path.parent)
    summary.events.emit(event)
    log(level, "%s %s", PROGRESS_TAG, event.describe())


def _secagg_line(facts) -> dict | None:
    """A round's secure-aggregation facts, short enough for its event line."""
    if facts is None:
        return None
    return {"u2": len(facts.u2), "u3": len(facts.u3), "dropped_before_masking": len(facts.dropped_before_masking),
            "dropped_after_masking": len(facts.dropped_after_masking), "consistency": facts.consistency,
            "bytes": sum(facts.bytes_sent.values()) + sum(facts.bytes_received.values())}


def failure_reason(rnd: int, what: str, err: BaseException) -> str:
    """Why a round failed, for the summary and the log: the error's kind and a short text."""
    text = str(err)
    text = text if len(text) <= 500 else text[:497] + "..."
    return (f"round {rnd}: the coordinator {what} ({type(err).__name__}: {text}); the rounds before it are kept "
            "and checkpointed: fix the cause and resume the run")


def _optimizer_state(departments) -> dict:
    """The coordinator's optimizer state to checkpoint: distributed DP's momentum, else nothing."""
    return departments.optimizer_state() if isinstance(departments, SecureFedAvg) else {}


def resume_point(settings: RunSettings, run_dir: Path) -> Checkpoint:
    """The checkpoint to continue from, once the run may continue and its settings are the same."""
    _, checkpoint = resumable(run_dir)
    checkpoint.check_settings(settings.to_run_config())
    return checkpoint


def write_model(out_dir: Path, model, settings: RunSettings, test: Dataset, metrics: dict, summary: RunSummary,
                departments: DepartmentFedAvg, status: str, run_id: str, dp_path: str) -> None:
    """``model.safetensors`` and ``model-card.json``, signed with the key that signs the record."""
    sha = save_weights(model.state_dict(), out_dir / WEIGHTS_FILE)
    record = departments.heads.record
    acknowledged = {}
    for ack in verify_record(record.path).entries if record.path.exists() else []:
        if ack.run_id == run_id:
            acknowledged[ack.identity] = ack  # the latest of this run, per identity
    privacy = [
        {"department": ack.department, "identity": ack.identity, "epsilon": ack.epsilon if ack.epsilon >= 0 else None,
         "private": ack.epsilon >= 0, "delta": ack.delta, "budget": ack.budget,
         "ledger_seq": ack.ledger_seq, "ledger_head": ack.ledger_head}
        for ack in sorted(acknowledged.values(), key=lambda a: a.department)
    ]
    central = summary.summary.central
    client_level = ({"epsilon": central.epsilon, "delta": central.delta, "accountant": central.accountant,
                     "noise_multiplier": central.noise_multiplier, "clip_norm": central.clip_norm}
                    if central else None)
    card = build_card(
        run_id=run_id, model=settings.model, fix_model=settings.fix_model, input_shape=test.input_shape,
        num_outputs=test.num_outputs, task=test.task, classes=test.classes,
        schema=test.schema.to_dict() if test.schema is not None else None, dataset=settings.dataset,
        held_out={"name": test.name, "rows": len(test), "source": settings.test_data or "split off the dataset"},
        metrics=metrics, departments=privacy, client_level=client_level, weights_sha256=sha,
        grad_sample_mode=dp_path, status=status, rounds=len(summary.summary.rounds),
        pretrained=_pretrained_card(settings, model, test),
    )
    write_card(sign_card(card, record.signer), out_dir / CARD_FILE)


def _pretrained_card(settings: RunSettings, model, test: Dataset) -> dict | None:
    if not is_pretrained(settings.model):
        return None
    base = find_base(settings.model, coordinator_bases(settings), "the coordinator's base model (--model hf:DIR)")
    column = test.schema.token_column if test.schema is not None else None
    return pretrained_section(base, lora_of(settings), model, column.max_length if column else test.input_shape[0])


def coordinator_test_set(settings: RunSettings) -> Dataset:
    """The held-out set the coordinator scores the global model on.

    With ``test-data`` (a deployment, or a simulation given one): the
    coordinator's own table, read with the run's schema.  Otherwise the fixed
    held-out split of the simulated dataset.
    """
    if settings.test_data and settings.data_schema:
        schema = DataSchema.from_json(settings.data_schema, "the run's data schema")
        base = find_base(settings.model, coordinator_bases(settings), "the coordinator's base model (--model hf:DIR)") if is_pretrained(settings.model) else None
        return load_table(Path(settings.test_data), schema.label.column, schema=bind_tokenizer(schema, base))
    # The held-out rows do not depend on how the rest is partitioned: one iid
    # department is the cheapest split to build, except where the data names the
    # departments itself (by:COLUMN, a folder of tables).
    named = settings.partition.strip().lower().startswith("by:") or Path(settings.dataset).expanduser().is_dir()
    return simulated_federation(
        settings.dataset, settings.label_column, split_columns(settings.feature_columns), 0 if named else 1,
        settings.partition if named else "iid", settings.seed, schema_json=settings.data_schema,
        test_data=settings.test_data, task=settings.task, base_model=settings.base_model, max_length=settings.max_length,
    ).test


def coordinator_bases(settings: RunSettings) -> tuple[str, ...]:
    """The coordinator's own copy of the run's pretrained base (``--model hf:DIR``), if the run has one."""
    return (settings.base_model,) if settings.base_model else ()


def wait_for_departments(grid: Grid, minimum: int, timeout: float) -> int:
    """Wait up to ``timeout`` seconds for ``minimum`` connected departments."""
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= minimum or time.monotonic() >= deadline:
            return connected
        time.sleep(1.0)


def no_one_trained(rnd: int, report) -> tuple[str, str]:
    """Why a round in which nobody trained ends the run: (status, reason), or ("", "") to fail it."""
    said = {
        "refused the run's app": report.incompatible,
        "declined (its policy is stricter than the run asks)": report.declined,
        "refused: its ledger went backwards": report.rolled_back,
    }
    lines = [f"{name} {what}: {why}" for what, named in said.items() for name, why in sorted(named.items())]
    if report.refused and not lines:
        reason = f"round {rnd}: no department can train: {len(report.refused)} refused on budget grounds"
        if report.failed or report.rejected:
            reason += f", {len(report.failed) + len(report.rejected)} failed or sent unusable updates"
        return "budget-exhausted", reason + "; the run ends here"
    if not lines:
        return "", ""
    if report.refused:
        lines.append(f"{len(report.refused)} refused on budget grounds")
    status = "app-refused" if report.incompatible and len(lines) == len(report.incompatible) else "declined"
    return status, f"round {rnd}: " + "; ".join(lines) + "; the run ends here"


def node_registry(grid: Grid) -> tuple[dict[int, str], dict]:
    """Node id -> registered name, and node id -> registered public key (deployment); empty in simulation."""
    try:
        nodes = list(grid.get_nodes())
    except Exception:  # the simulation grid has no registry
        return {}, {}
    names = {int(n.node_id): str(n.name) for n in nodes if getattr(n, "name", "")}
    return names, registered_keys(nodes)
