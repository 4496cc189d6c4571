"""The department's privacy policy: the budget guard and the ledger, as a Flower mod.

Training code never decides what a round may spend.  :func:`privacy_budget_mod`
wraps the department's train handler like middleware:

1. it plans the round's mechanism (σ, sample rate, steps) from the run settings
   and the department's data size;
2. it asks the :class:`BudgetGuard` — a dry run, nothing is composed — whether the
   whole history plus this round would pass ``max-epsilon``; if so it replies with
   the reason and the handler never runs;
3. otherwise it hands the plan to the handler in the message (``dp-plan``), checks
   that the handler ran exactly that mechanism, appends the round to the ledger
   with the whole-history ε, and reports that ε to the coordinator.
"""

from __future__ import annotations

import functools
import math
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log

from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.budget import BudgetDecision, BudgetExhaustedError, BudgetGuard  # noqa: F401 (re-exported)
from fedsilo.shared.config import RunSettings
from fedsilo.shared.ledger import PrivacyLedger
from fedsilo.shared.protocol import CONFIG_KEY, METRICS_KEY, STATUS_KEY, STATUS_REFUSED

from .department import department_from_context
from .trainer import plan_mechanism

PLAN_KEY = "dp-plan"


@functools.lru_cache(maxsize=64)
def _noise_for_target(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    return accounting.noise_for_target(target, delta, q, steps, accountant)


def plan_round(settings: RunSettings, num_examples: int) -> Mechanism:
    """This department's mechanism for one round.

    With ``target-epsilon`` set, σ is the smallest noise that keeps all
    ``num-server-rounds`` planned rounds within it (for this department's own
    sample rate); the budget guard still has the last word.
    """
    mechanism = plan_mechanism(
        num_examples, settings.batch_size, settings.local_epochs, settings.noise_multiplier or 1.0
    )
    if settings.target_epsilon > 0:
        sigma = _noise_for_target(
            settings.target_epsilon,
            settings.delta,
            mechanism.sample_rate,
            mechanism.steps * settings.num_server_rounds,
            settings.accountant,
        )
        mechanism = Mechanism(sigma, mechanism.sample_rate, mechanism.steps)
    return mechanism


def privacy_budget_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod enforcing the department's budget and keeping its ledger."""
    settings = RunSettings.from_run_config(context.run_config)
    department = department_from_context(context.node_config, settings)
    if not settings.dp:
        return call_next(msg, context)

    ledger = PrivacyLedger(department.ledger_path, department.name, department.signer)
    mechanism = plan_round(settings, len(department.data))
    guard = BudgetGuard(department.max_epsilon, settings.delta, settings.accountant)
    last = ledger.entries[-1] if ledger.entries else None
    known = (
        last.epsilon
        if last and last.delta == settings.delta and last.accountant == settings.accountant
        else None
    )
    decision = guard.would_exceed(ledger.history, mechanism, epsilon_before=known)
    config = msg.content.config_records.get(CONFIG_KEY)
    server_round = int(config.get("server-round", 0)) if config is not None else 0
    if not decision.allowed:
        log(WARNING, "[%s] round %s refused: %s", department.name, server_round, decision.reason)
        return refusal_reply(msg, department.name, decision)

    msg.content[PLAN_KEY] = ConfigRecord(
        {
            "noise-multiplier": mechanism.noise_multiplier,
            "sample-rate": mechanism.sample_rate,
            "steps": mechanism.steps,
            "max-grad-norm": settings.max_grad_norm,
        }
    )
    reply = call_next(msg, context)
    if reply.has_error():
        return reply  # nothing was released, so nothing is charged
    metrics = reply.content[METRICS_KEY]
    if int(metrics["steps"]) != mechanism.steps:
        raise RuntimeError(
            f"trainer ran {metrics['steps']} steps but the guard planned {mechanism.steps}; "
            "refusing to release an unaccounted update"
        )
    entry = ledger.append(
        run_id=str(msg.metadata.run_id),
        round=server_round,
        mechanism=mechanism,
        max_grad_norm=settings.max_grad_norm,
        delta=settings.delta,
        accountant=settings.accountant,
        epsilon=decision.epsilon_after,
        num_examples=len(department.data),
        expected_seq=len(ledger.entries),  # ε above was computed from exactly these
    )
    metrics["epsilon"] = entry.epsilon
    metrics["max-epsilon"] = department.max_epsilon
    log(INFO, "[%s] round %s: ε=%.3f (δ=%g)", department.name, server_round, entry.epsilon, entry.delta)
    return reply


def refusal_reply(msg: Message, department: str, decision: BudgetDecision) -> Message:
    """A reply without weights, saying why this department did not train."""
    metrics = MetricRecord(
        {
            "num-examples": 0,
            "epsilon": decision.epsilon_before,
            "max-epsilon": decision.max_epsilon,
            "steps": 0,
            "noise-multiplier": 0.0,
            "sample-rate": 0.0,
        }
    )
    status = ConfigRecord({"name": department, "status": STATUS_REFUSED, "reason": decision.reason})
    return Message(RecordDict({METRICS_KEY: metrics, STATUS_KEY: status}), reply_to=msg)
