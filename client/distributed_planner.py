"""``fedsilo plan --distributed-dp``: σ and the ε curve of a distributed-DP run, before any run.

A distributed-DP round is one DP-SGD step over the pooled records of every department,
its noise added in Skellam shares (shared/distributed_dp.py).  σ is planned exactly as
``simulate`` and ``coordinator run`` plan it (:func:`~fedsilo.shared.distributed_dp.plan_noise_multiplier`,
from the model's parameter count, the clipping norm and q), so the σ shown is the σ the run
uses; ε is the accountant the departments' budget guards use for such rounds
(:func:`~fedsilo.shared.accounting.epsilon`, Skellam RDP).  Beside it, the σ a centralized
DP-SGD run with Gaussian noise would need for the same ε, q and steps (PLD): the price of the
discrete, distributed mechanism's analysis.
"""

from __future__ import annotations

import math

from fedsilo.shared import accounting
from fedsilo.shared.distributed_dp import DistributedDpPlan, default_rounds, plan_noise_multiplier

from .planner import PlanError, PrivacyPlan, _positive, _quiet, first_round_past, shown_rounds


def plan_distributed_privacy(
    pooled_records: int,
    batch_size: int,
    rounds: int | None,
    delta: float,
    parameters: int,
    *,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    sample_rate: float | None = None,
    max_grad_norm: float = 1.0,
    scale: float = 0.0,
    max_epsilon: float | None = None,
) -> PrivacyPlan:
    """Plan a distributed-DP run of ``rounds`` steps (``None``: the commands' default for q).

    Parameters
    ----------
    pooled_records : int
        The records of all departments together.
    batch_size : int
        The expected pooled batch; q = batch / pooled records (unless ``sample_rate``).
    rounds : int or None
        Rounds, i.e. steps; ``None`` plans them as the commands do without ``--rounds``.
    delta : float
        δ at which ε is measured, in (0, 1).
    parameters : int
        The model's floating-point parameters d (``fedsilo simulate`` prints them).
    target_epsilon, noise_multiplier : float, optional
        Exactly one: a whole-run ε to plan σ for, or a σ to see its ε.
    sample_rate : float, optional
        q directly (a deployment's ``--sample-rate``).
    max_grad_norm, scale : float
        The clipping norm C and ``ddp-scale`` (0: automatic).
    max_epsilon : float, optional
        A budget; the plan then names the first round that would pass it.

    Raises
    ------
    PlanError
        A :class:`ValueError` naming the bad setting.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise PlanError("target-epsilon", "or noise-multiplier: give exactly one (a target ε to plan σ for, or a σ)")
    checks = [
        ("target-epsilon", target_epsilon is None or _positive(target_epsilon), "must be a positive number, e.g. 3"),
        ("noise-multiplier", noise_multiplier is None or _positive(noise_multiplier), "must be a positive number"),
        ("max-epsilon", max_epsilon is None or _positive(max_epsilon), "must be a positive number, e.g. 10"),
        ("delta", 0 < delta < 1, "must be in (0, 1); use e.g. 1e-5 (below 1/dataset-size)"),
        ("dataset-size", pooled_records >= 1, "must be at least 1 (with --distributed-dp: all departments' records)"),
        ("batch-size", batch_size >= 1, "must be at least 1 (the expected pooled batch)"),
        ("sample-rate", sample_rate is None or 0 < sample_rate <= 1, "must be in (0, 1]"),
        ("rounds", rounds is None or rounds >= 1, "must be at least 1"),
        ("parameters", parameters >= 1, "must be at least 1: the model's float parameters, as `fedsilo simulate` "
                                        "prints them"),
        ("max-grad-norm", _positive(max_grad_norm), "must be a positive number, e.g. 1.0"),
        ("ddp-scale", scale == 0 or (math.isfinite(scale) and scale >= 1), "must be 0 (automatic) or at least 1"),
    ]
    for option, ok, reason in checks:
        if not ok:
            raise PlanError(option, reason)
    q = sample_rate if sample_rate is not None else min(1.0, batch_size / pooled_records)
    rounds = rounds if rounds is not None else default_rounds(q)
    layout = {"parameters": (parameters,)}
    sigma = noise_multiplier if noise_multiplier is not None else plan_noise_multiplier(
        target_epsilon, delta, rounds, layout, max_grad_norm, q, scale)
    # One department, threshold 1: σ, μ and the sensitivity do not depend on the session.
    plan = DistributedDpPlan.of(layout, max_grad_norm=max_grad_norm, noise_multiplier=sigma, sample_rate=q,
                                participants=1, threshold=1, colluders=0, max_weight=1, scale=scale)

    cache: dict[int, float] = {}

    def eps(r: int) -> float:
        if r not in cache:
            cache[r] = accounting.epsilon([plan.mechanism(r)], delta)
        return cache[r]

    curve = tuple((r, eps(r)) for r in shown_rounds(rounds))
    exhausted = first_round_past(curve, eps, rounds, max_epsilon)
    # The same ε with Gaussian noise in the clear, at the same q and steps (PLD, the tightest).
    gaussian = _quiet(accounting.noise_for_target, eps(rounds), delta, q, rounds, "pld")
    return PrivacyPlan(
        float(sigma), q, 1, rounds, pooled_records, delta, accounting.MIXED_ACCOUNTANT, curve,
        target_epsilon, max_epsilon, exhausted, gaussian_noise_multiplier=float(gaussian),
    )
