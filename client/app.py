"""The department's Flower ClientApp: local DP-SGD training on its own data.

The train handler only trains.  The privacy policy — budget guard and ledger —
wraps it as :class:`~fedsilo.client.budget_guard.PrivacyBudgetMod`, which hands
the handler the department, the run's settings and the mechanism to run
(:func:`~fedsilo.client.budget_guard.guarded_round`).  :func:`department_app`
builds the app for one deployed department's host (its executor does, once);
``app`` is the one Flower loads in a simulation.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.models import department_device

from fedsilo.shared.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, STATUS_KEY, STATUS_TRAINED

from .admission import ModelSpec, build, reference_layout, verified_state_dict
from .budget_guard import PrivacyBudgetMod, guarded_round
from .containment import contain_errors_mod
from .department import DepartmentHost
from .secure_aggregation import QUERY_ACTIONS, masked_reply, query_handler
from .trainer import train_dp, train_plain

log = logging.getLogger("fedsilo.department")


def department_app(host: DepartmentHost | None = None) -> ClientApp:
    """A ClientApp whose guard is built once: for ``host``, or per simulated department without one."""
    client = ClientApp()
    # contain_errors_mod is outermost: no exception text leaves, whichever layer raised.
    guard = PrivacyBudgetMod(host)
    client.train(mods=[contain_errors_mod, guard])(train)
    # Secure aggregation's queries (client/secure_aggregation.py), resolving the department as the guard does.
    for action in QUERY_ACTIONS:
        client.query(action.split(".", 1)[1], mods=[contain_errors_mod])(query_handler(guard.query_department, action))
    return client


def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this department's data, exactly as the guard planned."""
    planned = guarded_round()
    department, settings, plan = planned.department, planned.settings, planned.plan
    # Simulated departments share the machine's cores: one thread each avoids
    # oversubscription (Ray gives every department one CPU by default).
    torch.set_num_threads(1)
    data = department.data
    limits = department.policy.limits
    device, note = department_device(settings.device)
    if note:  # a GPU asked and missing is the operator's business; "auto" on a CPU host only informs
        _say_once(department.name, note, logging.WARNING if settings.device == "cuda" else logging.INFO)
    model = build(settings, ModelSpec.of_data(data), bases=department.policy.base_models, train_on=device)
    # The budget guard admitted this model; loaded only through the same check.
    model.load_state_dict(verified_state_dict(msg.content[ARRAYS_KEY], reference_layout(model), limits.max_weight_magnitude))
    deadline = time.monotonic() + limits.max_round_seconds
    if bool(plan.get("distributed", False)):  # one DP-SGD step; its noisy integer sum leaves only masked
        return _distributed_step(msg, planned, model, device, deadline)
    if bool(plan["private"]):
        mechanism = Mechanism(
            float(plan["noise-multiplier"]), float(plan["sample-rate"]), int(plan["steps"])
        )
        result = train_dp(
            model,
            data,
            mechanism,
            max_grad_norm=float(plan["max-grad-norm"]),
            learning_rate=settings.learning_rate,
            momentum=settings.momentum,
            grad_sample_mode=settings.grad_sample_mode,
            device=device,
            planned_size=int(plan["reported-size"]),
            deadline=deadline,
        )
        noise, rate = mechanism.noise_multiplier, mechanism.sample_rate
    else:  # only when the department's own policy allows it
        result = train_plain(
            model,
            data,
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            momentum=settings.momentum,
            max_grad_norm=settings.max_grad_norm,
            device=device,
            seed=settings.seed + int(msg.content[CONFIG_KEY].get("server-round", 0)),
        )
        noise, rate = 0.0, 0.0
    metrics = _metrics(plan, result.steps, noise, rate)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if planned.secagg is not None:  # masked: Δ leaves only inside the secure sum, never the weights
        return masked_reply(msg, planned.secagg, department, {k: v.numpy() for k, v in state.items()}, metrics)
    status = ConfigRecord({"name": department.name, "status": STATUS_TRAINED, "reason": ""})
    content = RecordDict({ARRAYS_KEY: ArrayRecord(state), METRICS_KEY: metrics, STATUS_KEY: status})
    return Message(content, reply_to=msg)


@functools.lru_cache(maxsize=64)
def _say_once(name: str, note: str, level: int) -> None:
    log.log(level, "[%s] %s", name, note)


def _distributed_step(msg: Message, planned, model, device, deadline: float) -> Message:
    """Distributed DP: this department's noisy integer gradient sum, masked (client/distributed_dp.py)."""
    from fedsilo.shared.distributed_dp import rotation_seed

    from .distributed_dp import noisy_integer_sum

    department, plan, masking = planned.department, planned.plan, planned.secagg
    seed = rotation_seed(masking.request.run_key, masking.request.round)
    noisy, _ = noisy_integer_sum(model, department.data, masking.codec, seed, device=device, deadline=deadline)
    metrics = _metrics(plan, 1, float(plan["noise-multiplier"]), float(plan["sample-rate"]))
    return masked_reply(msg, masking, department, noisy, metrics)


def _metrics(plan, steps: int, noise: float, rate: float) -> MetricRecord:
    """The reply's metrics as training leaves them; the budget guard then sets ε, the budget and δ."""
    return MetricRecord(
        {
            # The size the department's policy reports, never the exact count.
            "num-examples": int(plan["reported-size"]),
            "epsilon": float("inf"),
            "max-epsilon": float("inf"),
            "delta": 0.0,
            "steps": steps,
            "noise-multiplier": noise,
            "sample-rate": rate,
            # 0: trained now; else the ledger entry that charged an update sent again (client/replay.py).
            "replayed-seq": 0,
        }
    )


app = department_app()
