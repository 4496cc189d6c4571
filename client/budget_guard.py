"""The department's privacy policy at work: the budget guard and the ledger, as a Flower mod.

Training code never decides what a round may spend.  :func:`privacy_budget_mod`
wraps the department's train handler like middleware:

1. it checks that its ledger still holds the head the coordinator last
   acknowledged (an older copy, a deleted ledger or a new folder is refused);
2. it asks the department's own :class:`~fedsilo.client.policy.DepartmentPolicy`
   whether the run's asks are as strict as the policy — every looser one is
   named with both values, and nothing trains;
3. it plans the round's mechanism (σ, sample rate, steps) from the run's
   settings and the size the department reports (never the exact count), and
   asks the :class:`BudgetGuard` — a dry run, at the department's δ and
   accountant — whether the whole history plus this round would pass the budget;
4. otherwise it hands the plan to the handler (:func:`guarded_round`), checks that the
   handler ran exactly that mechanism, appends the round to the ledger with the
   whole-history ε and the budget in force, keeps the update
   (:mod:`fedsilo.client.replay`) and attaches the signed ledger head.

A request for a round this department already trained and released — the same
run, round and global model, after the coordinator restarted — gets the kept
update again and no new ledger entry: one round is never charged twice.

The run is named by the message's ``run-key`` (the coordinator's run name, the
same across its resumes), else Flower's run id.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedsilo.secagg import SecAggError
from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.budget import BudgetDecision, BudgetGuard
from fedsilo.shared.config import RunSettings
from fedsilo.shared.distributed_dp import DistributedDpPlan
from fedsilo.shared.ledger import PrivacyLedger
from fedsilo.shared.model_factory import ModelError, is_factory, load_factory
from fedsilo.shared.protocol import (
    ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, STATUS_TRAINED, STATUS_DECLINED, STATUS_KEY, STATUS_REFUSED, STATUS_ROLLED_BACK,
)
from fedsilo.shared.record import HEAD_KEY, LedgerHead, public_key_line
from fedsilo.shared.train_request import MalformedRequest, TrainRequest

from .admission import AdmissionError, ModelSpec, admit_model, schema_limits, verified_state_dict
from .department import Department, DepartmentHost, department_from_context
from .policy import PolicyError, RunRequest, Terms
from .replay import LastUpdate, request_digest
from .secure_aggregation import MaskPlan, SecAggRefusal, check_mask_request
from .trainer import plan_mechanism

log = logging.getLogger("fedsilo.department")


class PlanError(ValueError):
    """No mechanism fits what the run asks within the department's terms; says the plan's numbers.

    ``spent`` is true when the history alone already reaches the target: a budget matter.
    """

    def __init__(self, message: str, spent: bool = False) -> None:
        super().__init__(message)
        self.spent = spent


@functools.lru_cache(maxsize=64)
def _noise_for_target(prior: tuple, target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    # ``prior``: merged mechanisms of any kind; a history holding a Skellam round is measured in RDP.
    return accounting.noise_for_target_after(list(prior), target, delta, q, steps, accountant)


def plan_round(settings: RunSettings, terms: Terms, size: int, prior: list[Mechanism] = ()) -> Mechanism:
    """This department's mechanism for one round, planned from the size it reports.

    With ``target-epsilon`` set, σ is the smallest noise that keeps the
    department's whole history — ``prior``, its rounds before this run — plus
    all ``num-server-rounds`` planned rounds within the target (capped at its
    budget).  With neither σ nor a target (the default) the target is the
    department's own budget: the run's planned rounds spend what is left of it.
    The budget guard still has the last word.
    """
    mechanism = plan_mechanism(size, settings.batch_size, settings.local_epochs, settings.noise_multiplier or 1.0)
    if settings.target_epsilon <= 0 and settings.noise_multiplier > 0:
        return mechanism
    target = min(settings.target_epsilon, terms.max_epsilon) if settings.target_epsilon > 0 else terms.max_epsilon
    merged = accounting.merge_mechanisms(prior)
    steps = mechanism.steps * settings.num_server_rounds
    try:
        sigma = _noise_for_target(merged, target, terms.delta, mechanism.sample_rate, steps, terms.accountant)
    except ValueError as err:
        what = f"target-epsilon {target:g}" if settings.target_epsilon > 0 else f"its budget ε={target:g}"
        raise PlanError(
            f"{what} over {settings.num_server_rounds} rounds cannot be planned: {err}; "
            "this department has nothing left to spend under that target", spent=True,
        ) from None
    return Mechanism(sigma, mechanism.sample_rate, mechanism.steps)


@dataclass(frozen=True)
class GuardedRound:
    """What the guard hands the train handler for one message: who trains, on which settings, which plan."""

    department: Department
    settings: RunSettings
    plan: ConfigRecord
    secagg: MaskPlan | None = None  # under secure aggregation: the round to mask (client/secure_aggregation.py)


_ROUND: contextvars.ContextVar[GuardedRound] = contextvars.ContextVar("fedsilo_guarded_round")


def guarded_round() -> GuardedRound:
    """The round the privacy budget mod planned for the message being handled (only inside it)."""
    try:
        return _ROUND.get()
    except LookupError:
        raise RuntimeError("no round was planned: training runs only under the privacy budget mod") from None


@functools.lru_cache(maxsize=16)
def _settings(items: tuple) -> RunSettings:
    return RunSettings.from_run_config(dict(items))


def settings_of(context: Context) -> RunSettings:
    """The run's settings, parsed once per distinct run config (not once per message)."""
    return _settings(tuple(sorted(context.run_config.items())))


class PrivacyBudgetMod:
    """Flower client mod enforcing the department's policy and budget and keeping its ledger.

    Like Flower's ``LocalDpMod``, it is given what it enforces at construction:
    a deployed department's executor builds one for its :class:`DepartmentHost`
    (policy, ledger folder, identity key), once per process.  Without a host —
    a simulation, where one process serves many simulated departments — each
    department is resolved from the node config.  Either way the policy is
    parsed, the signing key loaded and the ledger read and verified once; a
    ledger is read again only when its file changed
    (:meth:`~fedsilo.shared.ledger.PrivacyLedger.refresh`).

    Parameters
    ----------
    host : DepartmentHost, optional
        The deployed department this mod guards; None resolves it from each
        message's node config.
    """

    def __init__(self, host: DepartmentHost | None = None) -> None:
        if host is not None and not isinstance(host, DepartmentHost):
            raise ValueError(f"host must be a DepartmentHost, got {type(host).__name__}")
        self.host = host
        self._ledgers: dict[tuple[Path, str], PrivacyLedger] = {}

    def department(self, context: Context, settings: RunSettings) -> Department:
        if self.host is not None:
            return self.host.for_run(settings)
        return department_from_context(context.node_config, settings)

    def query_department(self, context: Context) -> Department:
        """The department a query (secure aggregation's) is for, resolved as a train request's is."""
        return self.department(context, settings_of(context))

    def ledger(self, department: Department) -> PrivacyLedger:
        key = (department.ledger_path, department.signer.fingerprint)
        ledger = self._ledgers.get(key)
        if ledger is None:
            ledger = self._ledgers[key] = PrivacyLedger(department.ledger_path, department.name, department.signer)
        ledger.department = department.name  # the name may change; the ledger belongs to the key
        return ledger.refresh()

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        settings = settings_of(context)
        department = self.department(context, settings)
        return _guard(msg, context, call_next, settings, department, self.ledger(department))


def _guard(msg: Message, context: Context, call_next: ClientAppCallable, settings: RunSettings,
           department: Department, ledger: PrivacyLedger) -> Message:
    policy = department.policy
    config = msg.content.config_records.get(CONFIG_KEY) or ConfigRecord()
    try:
        request = TrainRequest.from_config(config)
    except MalformedRequest as err:  # tampered or from an unknown fedsilo: declined, nothing read or spent
        return _refusal(msg, department, ledger, "", 0, STATUS_DECLINED, f"train request: {err}")
    server_round = request.server_round
    run_id = request.run_key or str(msg.metadata.run_id)  # a coordinator that names no run: Flower's id
    limits = policy.limits
    bad_key = limits.check_run_key(run_id)
    if bad_key:  # it would be written into every ledger entry: declined before anything else
        return _refusal(msg, department, ledger, "", server_round, STATUS_DECLINED, "; ".join(bad_key))
    refuse = functools.partial(_refusal, msg, department, ledger, run_id, server_round)

    # 1. The coordinator's acknowledged head must still be in this ledger.
    behind = ledger.continues(*request.acknowledged) if request.acknowledged else ""
    if behind:
        return refuse(STATUS_ROLLED_BACK, behind)

    # 2. The department's policy decides; the run only asks.
    terms, looser = policy.terms_for(RunRequest.from_settings(settings))
    if terms is None:
        return refuse(STATUS_DECLINED, "; ".join(looser))
    # Within the host's limits, from the run's asks and schema alone: no record read yet.
    over = limits.check_rounds(settings.num_server_rounds)
    if department.schema is not None:
        over += schema_limits(department.schema, limits)
    if over:
        return refuse(STATUS_DECLINED, "; ".join(over))
    if is_factory(settings.model):
        try:
            load_factory(settings.model)  # from this host's own installed environment only
        except ModelError as err:
            return refuse(STATUS_DECLINED, f"model: {err}")
    if ARRAYS_KEY not in msg.content:
        return refuse(STATUS_DECLINED, "global model: the message carries none")
    spec = ModelSpec.of_schema(department.schema) if department.schema is not None else ModelSpec.of_data(department.data)
    try:
        layout = admit_model(settings, spec, limits, policy.base_models)
        verified_state_dict(msg.content[ARRAYS_KEY], layout, limits.max_weight_magnitude)
    except AdmissionError as err:
        return refuse(STATUS_DECLINED, str(err))
    try:
        policy.check_records(department.data.num_records)
    except PolicyError as err:
        log.warning("[%s] %s", department.name, err)  # names N: stays on this host
        return refuse(STATUS_DECLINED, "delta: this department's δ is not below 1/records; its operators must lower --delta")
    size = policy.reported_size(department.data.num_records)
    # Under secure aggregation (or a policy requiring it) the mask request is checked before anything trains.
    try:
        masked = check_mask_request(msg, department, settings, run_id, server_round, size)
    except (SecAggError, SecAggRefusal) as err:
        return refuse(STATUS_DECLINED, str(err))
    if not terms.private:
        return _train_without_dp(msg, context, call_next, department, ledger, terms, settings, size, run_id,
                                 server_round, masked)
    if not ledger.private:
        return refuse(STATUS_REFUSED, "budget: this department trained without DP before (its ledger says so); no finite ε covers its history, so it trains no more")

    # A round already released (the coordinator restarted): the same update again, no new charge.
    # Plain rounds only: a kept plain update never answers a masked request (nor is one kept).
    kept = LastUpdate(department.ledger_path)
    digest = request_digest(run_id, server_round, msg.content[ARRAYS_KEY])
    replay = kept.find(digest, ledger) if masked is None else None
    if replay is not None:
        return _replay(msg, department, ledger, replay, terms, run_id, server_round)

    # 3. Plan the round from the reported size; the guard decides at the department's δ.
    # The steps are bounded before any accountant runs: planning time grows with them.
    over = limits.check_steps(plan_mechanism(size, settings.batch_size, settings.local_epochs, 1.0).steps)
    if over:
        return refuse(STATUS_DECLINED, "; ".join(over))
    setup = None
    if masked is not None and isinstance(masked.codec, DistributedDpPlan) and settings.distributed_dp:
        # Distributed DP: one step whose noise the run's σ and the session fix; this department checks it.
        # (Client-level distributed DP, central-dp, noises the update after a round planned as any other.)
        mechanism, setup = masked.codec.mechanism(1), masked.codec.setup()
        shown = Mechanism(math.sqrt(mechanism.mu) / mechanism.l2, mechanism.sample_rate, mechanism.steps)
    else:
        prior = [e.mechanism for e in ledger.entries if e.private and e.run_id != run_id]
        try:
            mechanism = shown = plan_round(settings, terms, size, prior)
        except PlanError as err:
            # Nothing left to spend under the target is a budget matter, like the guard's refusal.
            return refuse(STATUS_REFUSED if err.spent else STATUS_DECLINED, str(err))
    limits = policy.mechanism_limits(shown)
    if limits:
        return refuse(STATUS_DECLINED, "; ".join(limits))
    guard = BudgetGuard(terms.max_epsilon, terms.delta, terms.accountant)
    history = ledger.history
    accountant = accounting.accountant_for([*history, mechanism], terms.accountant)
    last = ledger.entries[-1] if ledger.entries else None
    known = last.epsilon if (setup is None and last and last.delta == terms.delta
                             and last.accountant == terms.accountant) else None
    decision = guard.would_exceed(history, mechanism, epsilon_before=known)
    if not decision.allowed:
        return refuse(STATUS_REFUSED, decision.reason, decision)

    # 4. Train exactly the plan; record before the update leaves.
    plan = _plan_record(True, shown, settings.max_grad_norm, size, distributed=setup is not None)
    charge = functools.partial(
        ledger.append, run_id=run_id, round=server_round, mechanism=mechanism,
        max_grad_norm=settings.max_grad_norm, delta=terms.delta, accountant=accountant,
        epsilon=decision.epsilon_after, num_examples=department.data.num_records, expected_seq=len(ledger.entries),
        budget=terms.max_epsilon, reported_size=size, **({"setup": setup} if setup is not None else {}),
    )
    try:
        reply = _call_planned(call_next, msg, context, GuardedRound(department, settings, plan, masked))
        failure = "" if not reply.has_error() else f"error reply {reply.error.code}"
    except Exception as err:  # noqa: BLE001 - whatever stopped it, the records were touched
        failure = f"{type(err).__name__}: {err}"
    if not failure:
        metrics = reply.content[METRICS_KEY]
        if int(metrics["steps"]) != mechanism.steps:
            failure = f"trainer ran {metrics['steps']} steps but the guard planned {mechanism.steps}"
    if failure:
        # Training began, so whether it failed may depend on the records (through the noisy
        # steps only: post-processing).  Charged as released; the reply says nothing of why.
        log.warning("[%s] round %s stopped after training began (%s); charged to the ledger, nothing sent",
                    department.name, server_round, failure)
        charge()
        return refuse(STATUS_DECLINED, "training: the round stopped after it began; this department charged it "
                      "to its ledger and sends no update (its operators can read why in its log)")
    _set_privacy_metrics(metrics, size, decision.epsilon_after, terms)
    seen = len(ledger.entries)  # ε above was computed from exactly these
    if masked is None:  # kept first: an update whose charge is in the ledger can always be sent again
        kept.keep(digest, run_id, server_round, seen + 1, reply.content[ARRAYS_KEY], dict(metrics))
    entry = charge()
    _attach_head(reply, department, ledger, run_id, server_round, terms)
    log.info("[%s] round %s: ε=%.3f (δ=%g)", department.name, server_round, entry.epsilon, entry.delta)
    return reply


def _replay(msg: Message, department: Department, ledger: PrivacyLedger, replay, terms: Terms,
            run_id: str, server_round: int) -> Message:
    """The update released for this very request before, charged once (by ``replay.entry``)."""
    metrics = MetricRecord(dict(replay.metrics))
    metrics["replayed-seq"] = replay.entry.seq + 1  # as a head counts: entries up to and including it
    status = ConfigRecord({"name": department.name, "status": STATUS_TRAINED, "reason": "replayed"})
    reply = Message(RecordDict({ARRAYS_KEY: replay.arrays, METRICS_KEY: metrics, STATUS_KEY: status}), reply_to=msg)
    _attach_head(reply, department, ledger, run_id, server_round, terms)
    log.info("[%s] round %s: sent again the update released for it (ledger entry %d); no new charge",
             department.name, server_round, replay.entry.seq)
    return reply


def _train_without_dp(msg, context, call_next, department: Department, ledger: PrivacyLedger,
                      terms: Terms, settings: RunSettings, size: int, run_id: str, server_round: int,
                      masked: MaskPlan | None = None) -> Message:
    """Only when the department's own policy opts in: trained, and the ledger says so for good."""
    plan = _plan_record(False, None, settings.max_grad_norm, size)
    reply = _call_planned(call_next, msg, context, GuardedRound(department, settings, plan, masked))
    if reply.has_error():
        return reply
    metrics = reply.content[METRICS_KEY]
    ledger.append(
        run_id=run_id, round=server_round,
        mechanism=None,  # a non-private round is no mechanism: the entry voids every finite ε
        max_grad_norm=settings.max_grad_norm, delta=terms.delta, accountant=terms.accountant,
        epsilon=ledger.epsilon if ledger.private else 0.0, num_examples=department.data.num_records,
        expected_seq=len(ledger.entries), budget=terms.max_epsilon, private=False, reported_size=size,
    )
    _set_privacy_metrics(metrics, size, float("inf"), terms)
    _attach_head(reply, department, ledger, run_id, server_round, terms)
    log.warning("[%s] round %s trained WITHOUT differential privacy (the policy allows it)", department.name, server_round)
    return reply


def _call_planned(call_next: ClientAppCallable, msg: Message, context: Context, planned: GuardedRound) -> Message:
    token = _ROUND.set(planned)
    try:
        return call_next(msg, context)
    finally:
        _ROUND.reset(token)


# Built from each message's node config: the simulation's mod, and the one tests call directly.
privacy_budget_mod = PrivacyBudgetMod()


def _plan_record(private: bool, mechanism: Mechanism | None, max_grad_norm: float, size: int,
                 distributed: bool = False) -> ConfigRecord:
    return ConfigRecord(
        {
            "private": private,
            "distributed": distributed,
            "noise-multiplier": mechanism.noise_multiplier if mechanism else 0.0,
            "sample-rate": mechanism.sample_rate if mechanism else 0.0,
            "steps": mechanism.steps if mechanism else 0,
            "max-grad-norm": max_grad_norm,
            "reported-size": size,
        }
    )


def _set_privacy_metrics(metrics: MetricRecord, size: int, epsilon: float, terms: Terms) -> None:
    metrics["num-examples"] = size  # the reported size, never the exact count
    metrics["epsilon"] = epsilon
    metrics["max-epsilon"] = terms.max_epsilon
    metrics["delta"] = terms.delta


def _attach_head(reply: Message, department: Department, ledger: PrivacyLedger, run_id: str,
                 server_round: int, terms: Terms | None) -> None:
    seq, head = ledger.head
    epsilon = ledger.epsilon
    statement = LedgerHead(
        identity=department.signer.fingerprint,
        public_key=public_key_line(department.signer.public_key),
        seq=seq, head=head, run_id=run_id, round=server_round,
        epsilon=epsilon if epsilon != float("inf") else -1.0,
        delta=terms.delta if terms else department.policy.delta,
        budget=terms.max_epsilon if terms else department.policy.max_epsilon,
    ).signed(department.signer)
    reply.content[HEAD_KEY] = ConfigRecord(statement.to_record())


def _refusal(msg: Message, department: Department, ledger: PrivacyLedger, run_id: str, server_round: int,
             status: str, reason: str, decision: BudgetDecision | None = None) -> Message:
    """A reply without weights, saying why this department did not train (and where its ledger stands)."""
    log.warning("[%s] round %s %s: %s", department.name, server_round, status, reason)
    policy = department.policy
    epsilon = ledger.epsilon
    metrics = MetricRecord(
        {
            "num-examples": 0,
            "epsilon": decision.epsilon_before if decision else epsilon,
            "max-epsilon": decision.max_epsilon if decision else policy.max_epsilon,
            "delta": decision.delta if decision else policy.delta,
            "steps": 0,
            "noise-multiplier": 0.0,
            "sample-rate": 0.0,
        }
    )
    status_record = ConfigRecord({"name": department.name, "status": status, "reason": reason})
    reply = Message(RecordDict({METRICS_KEY: metrics, STATUS_KEY: status_record}), reply_to=msg)
    terms = Terms(True, decision.max_epsilon, decision.delta, "") if decision else None
    _attach_head(reply, department, ledger, run_id, server_round, terms)
    return reply
