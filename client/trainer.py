"""Local training: DP-SGD with Opacus, or plain SGD for a non-private baseline.

This module only trains.  *Whether* a round may run and what it costs in ε is
decided by the budget guard (``client/budget_guard.py``); the trainer executes
exactly the mechanism it is handed, so the steps it reports are the steps the
ledger charges.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedsilo.shared.accounting import Mechanism, plan_mechanism  # noqa: F401 (plan_mechanism re-exported)

# Opacus' hooks fire on inputs that need no gradient; harmless and very noisy.
warnings.filterwarnings("ignore", message="Full backward hook is firing")
from fedsilo.shared.data import Dataset
from fedsilo.shared.model_factory import dp_problems, ghost_norm_coverage, resolve_grad_sample_mode  # noqa: F401 (re-exported)
from fedsilo.shared.models import loss_function, resolve_device, to_tensor_dataset


# A per-sample gradient past this norm (or not finite) contributes zero: its clip
# factor would fall below float32's normal range and lose the bound's precision.
MAX_SAMPLE_NORM = 1e30


class TrainingStopped(RuntimeError):
    """Training began but its result may not leave (past the wall-time limit, or not finite).

    The records were touched: the round is charged as if it had been released.
    """


@dataclass(frozen=True)
class TrainResult:
    steps: int
    num_examples: int
    train_loss: float
    grad_sample_mode: str = ""  # the Opacus mode that ran ("" for plain SGD)


def train_dp(
    model: nn.Module,
    data: Dataset,
    mechanism: Mechanism,
    *,
    max_grad_norm: float,
    learning_rate: float,
    momentum: float = 0.5,
    grad_sample_mode: str = "auto",
    device: torch.device | None = None,
    planned_size: int | None = None,
    deadline: float | None = None,
) -> TrainResult:
    """Run ``mechanism.steps`` DP-SGD steps on ``model`` in place.

    Every Poisson batch is taken, empty ones included: an empty batch is still a
    step of the mechanism that the plan charged for.

    The mechanism is DP whatever ``model`` is (a coordinator may craft it):

    * the noisy sum is divided by ``planned_size · q`` — the size the round was
      planned from (public or reported), never ``len(data)``, which would put the
      exact count into the update's spread;
    * a record whose per-sample gradient is not finite, or past
      :data:`MAX_SAMPLE_NORM`, contributes zero (:func:`robust_clipped_sum`), so
      no record can turn the release non-finite;
    * the result must be finite; otherwise :class:`TrainingStopped` — a function
      of the noisy steps only, so post-processing.

    ``deadline`` (``time.monotonic()``) stops a round past its wall time with
    :class:`TrainingStopped`.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    from fedsilo.shared.ghost_norms import register

    register()  # ghost norms for Conv1d/Conv2d/LayerNorm/GroupNorm, before Opacus wraps the model
    problems = dp_problems(model)
    if problems:  # Opacus checks trainable layers only; a frozen BatchNorm still mixes a batch's records
        raise ValueError("this model cannot be trained with DP-SGD: " + "; ".join(problems))
    grad_sample_mode = resolve_grad_sample_mode(grad_sample_mode, model)
    device = device or resolve_device()
    model.to(device).train()
    if len(data) == 0:
        # No record encoded with the run's schema: every step is noise alone, as Opacus'
        # would be on empty batches (it cannot sample from an empty table).
        return _noise_only(model, data, mechanism, max_grad_norm, learning_rate, momentum, device,
                           planned_size, deadline, grad_sample_mode)
    if grad_sample_mode == "bk":
        return _train_book_keeping(model, data, mechanism, max_grad_norm, learning_rate, momentum, device,
                                   planned_size, deadline)
    # Opacus samples each record at 1/len(loader) for len(loader) steps an epoch: a
    # loader of exactly `batches` index chunks gives the planned rate, also when
    # the plan came from a reported size other than the exact count.
    batches = round(1.0 / mechanism.sample_rate)
    chunks = [chunk.tolist() for chunk in np.array_split(np.arange(len(data)), batches)]
    # Who is in a batch must be as unpredictable as the noise: a generator of its
    # own from fresh OS entropy, never the process-wide one a factory could seed.
    sampling = torch.Generator().manual_seed(secrets.randbits(63))
    loader = DPDataLoader.from_data_loader(
        DataLoader(to_tensor_dataset(data), batch_sampler=chunks), generator=sampling)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    criterion = loss_function(data.task)
    per_sample_loss = loss_function(data.task)
    # DP noise must be unpredictable: draw it from a generator seeded with fresh OS
    # entropy every round, never from a seeded global RNG.
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' note on secure RNG
        engine = PrivacyEngine(accountant="prv")
        kwargs = dict(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=mechanism.noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,  # the loader above already samples
            grad_sample_mode=grad_sample_mode,
            noise_generator=noise,
        )
        if grad_sample_mode == "ghost":
            private, optimizer, criterion, dp_loader = engine.make_private(criterion=criterion, **kwargs)
        else:
            private, optimizer, dp_loader = engine.make_private(**kwargs)
    # Opacus divides by int(len(dataset) · q): the exact count.  The plan's size instead.
    optimizer.expected_batch_size = (planned_size if planned_size is not None else len(data)) * mechanism.sample_rate
    steps, losses = 0, []
    epochs = mechanism.steps // batches
    for _ in range(epochs):
        for xb, yb in dp_loader:
            if deadline is not None and time.monotonic() > deadline:
                private._close()
                raise TrainingStopped(f"the round passed its wall-time limit after {steps} of {mechanism.steps} steps")
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            # An empty Poisson batch still goes through: Opacus adds noise to a
            # zero gradient sum, which is exactly the mechanism's step.
            loss = criterion(private(xb), yb)
            loss.backward()
            if grad_sample_mode == "ghost":
                _ghost_guard(private, per_sample_loss, xb, yb, max_grad_norm)
            else:
                _zero_unbounded_samples(optimizer.params)
            optimizer.step()
            if len(yb):
                value = float(loss.detach())
                if math.isfinite(value):
                    losses.append(value)
            steps += 1
    if steps != mechanism.steps:
        raise RuntimeError(f"ran {steps} steps, the mechanism charged {mechanism.steps}")
    private._close()  # remove Opacus' hooks and per-sample buffers: a plain module again
    _require_finite(model)
    return TrainResult(steps, len(data), float(np.mean(losses)) if losses else float("nan"), grad_sample_mode)


def _train_book_keeping(model, data, mechanism, max_grad_norm, learning_rate, momentum, device, planned_size,
                        deadline) -> TrainResult:
    """DP-SGD with book-keeping clipping (:mod:`.book_keeping`): one backward a step, Opacus' mechanism.

    The same mechanism as Opacus' DPOptimizer: each step a Poisson sample at
    ``mechanism.sample_rate`` (each record independently, from a generator of
    fresh OS entropy), every record's gradient clipped to C, N(0, σ²C²) added
    to the sum in one draw, divided by ``planned_size · q``, then SGD.
    """
    from fedsilo.shared.book_keeping import BookKeeper

    tensors = to_tensor_dataset(data).tensors
    x_all, y_all = tensors[0].to(device), tensors[1].to(device)
    criterion = loss_function(data.task)
    criterion.reduction = "none"  # one loss per record: each is clipped alone
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    sampling = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    scale = 1.0 / ((planned_size if planned_size is not None else len(data)) * mechanism.sample_rate)
    std = mechanism.noise_multiplier * max_grad_norm
    losses = []
    with BookKeeper(model, max_grad_norm, MAX_SAMPLE_NORM) as keeper:
        params = keeper.params
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        for step in range(mechanism.steps):
            if deadline is not None and time.monotonic() > deadline:
                raise TrainingStopped(f"the round passed its wall-time limit after {step} of {mechanism.steps} steps")
            chosen = (torch.rand(len(x_all), generator=sampling, device=device) < mechanism.sample_rate).nonzero().view(-1)
            xb, yb = x_all[chosen], y_all[chosen]
            per_example = criterion(model(xb), yb)
            sums, _ = keeper.clipped_sum(per_example)
            draws = torch.normal(0.0, std, (total,), generator=noise, device=device)
            for p, summed, drawn in zip(params, sums, draws.split(sizes)):
                p.grad = (summed + drawn.view_as(summed).to(summed.dtype)) * scale
            optimizer.step()
            if len(yb):
                value = float(per_example.detach().mean())
                if math.isfinite(value):
                    losses.append(value)
    for p in model.parameters():
        p.grad = None
    _require_finite(model)
    return TrainResult(mechanism.steps, len(data), float(np.mean(losses)) if losses else float("nan"), "bk")


def _sample_ok(norms: torch.Tensor) -> torch.Tensor:
    """Which per-sample gradient norms are finite and within :data:`MAX_SAMPLE_NORM`."""
    return torch.isfinite(norms) & (norms <= MAX_SAMPLE_NORM)


def _zero_unbounded_samples(params) -> None:
    """Per-sample gradients (hooks modes) of records that would break clipping become zero.

    Opacus clips by ``C / (norm + 1e-6)``: an infinite entry makes ``0 · inf``
    = NaN in the sum.  Zeroing a record's whole gradient keeps its contribution
    (0) within C and is a function of that record alone.
    """
    samples = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
    if not samples or not isinstance(samples[0], torch.Tensor) or len(samples[0]) == 0:
        return
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
    ok = _sample_ok(norms)
    if bool(ok.all()):
        return
    for p in params:
        g = getattr(p, "grad_sample", None)
        if isinstance(g, torch.Tensor):
            p.grad_sample = torch.where(ok.view(-1, *([1] * (g.dim() - 1))).to(g.device), g, torch.zeros((), dtype=g.dtype, device=g.device))


def _ghost_guard(private, per_sample_loss: nn.Module, xb: torch.Tensor, yb: torch.Tensor, max_grad_norm: float) -> None:
    """Ghost clipping never materializes per-sample gradients; when one would break it, recompute the batch.

    Ghost clipping's second backward multiplies each record's gradient by its clip
    factor inside autograd, where ``0 · inf`` is NaN.  When any norm is not
    finite (or past the bound) or the clipped sum is not finite, the clipped sum
    is recomputed exactly from per-sample gradients (:func:`robust_clipped_sum`).
    """
    norms = getattr(private, "per_sample_gradient_norms", None)
    params = [p for p in private._module.parameters() if p.requires_grad]
    fine = norms is None or bool(_sample_ok(norms).all())
    if fine and all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params):
        return
    clipped = robust_clipped_sum(private, per_sample_loss, xb, yb, max_grad_norm)
    for p, g in zip(params, clipped):
        p.grad = g


def _require_finite(model: nn.Module) -> None:
    """A trained model must be finite; whether it is, is post-processing of the noisy steps."""
    if not all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point()):
        raise TrainingStopped("the trained model is not finite (the run's learning rate or model diverged)")


def _noise_only(model, data, mechanism, max_grad_norm, learning_rate, momentum, device, planned_size, deadline,
                grad_sample_mode) -> TrainResult:
    """DP-SGD's steps on a sum of no gradients: N(0, σ²C²) / (n·q) each, then SGD."""
    if planned_size is None:
        raise ValueError("an empty table trains only from a planned size")
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    scale = mechanism.noise_multiplier * max_grad_norm / (planned_size * mechanism.sample_rate)
    for step in range(mechanism.steps):
        if deadline is not None and time.monotonic() > deadline:
            raise TrainingStopped(f"the round passed its wall-time limit after {step} of {mechanism.steps} steps")
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.normal(0.0, scale, p.shape, generator=noise, device=device, dtype=p.dtype)
        optimizer.step()
    _require_finite(model)
    return TrainResult(mechanism.steps, 0, float("nan"), grad_sample_mode)


def robust_clipped_sum(private, per_sample_loss: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                       max_grad_norm: float) -> list[torch.Tensor]:
    """Σ_i clip_C(g_i) over the batch from each record's own gradient, unbounded ones zero.

    The same clipping as Opacus' (factor ``min(1, C / (‖g_i‖ + 1e-6))``).  One
    backward per record, with Opacus' hooks off: only for a batch that ghost
    clipping cannot bound, so its cost is no concern.  Returns one tensor per
    trainable parameter of ``private._module``, in order.
    """
    module = private._module
    params = [p for p in module.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    private.disable_hooks()
    try:
        for i in range(len(xb)):
            loss = per_sample_loss(module(xb[i:i + 1]), yb[i:i + 1])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            norm = torch.stack([g.norm(2) for g in grads]).norm(2)
            if not bool(_sample_ok(norm)):
                continue  # contributes zero
            factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
            for t, g in zip(total, grads):
                t.add_(g, alpha=factor)
    finally:
        private.enable_hooks()
    return total


def train_plain(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float = 0.5,
    max_grad_norm: float | None = None,
    device: torch.device | None = None,
    seed: int = 0,
) -> TrainResult:
    """Non-private SGD baseline with the same optimizer and batch size.

    ``max_grad_norm`` clips each batch gradient (not each record's: this is no
    privacy mechanism).  A DP-SGD step is bounded by C through per-record
    clipping; without any bound the learning rate tuned for DP diverges (the
    mnist5k CNN ends at chance, 10 %, at lr 0.5 unclipped; 96.6 % clipped to 1).
    """
    device = device or resolve_device()
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    x_all, y_all = to_tensor_dataset(data).tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    criterion = loss_function(data.task)
    steps, losses = 0, []
    for _ in range(epochs):
        # The order a shuffling DataLoader draws (torch.randperm on the generator), taken by indexing
        # the tensors at once rather than record by record.
        for chosen in torch.randperm(len(x_all), generator=generator).split(batch_size):
            xb, yb = x_all[chosen].to(device), y_all[chosen].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            steps += 1
    return TrainResult(steps, len(data), float(np.mean(losses)))
