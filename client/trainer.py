"""Local training: DP-SGD with Opacus, or plain SGD for a non-private baseline.

This module only trains.  *Whether* a round may run and what it costs in ε is
decided by the budget guard (``client/budget_guard.py``); the trainer executes
exactly the mechanism it is handed, so the steps it reports are the steps the
ledger charges.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedsilo.shared.accounting import Mechanism

# Opacus' hooks fire on inputs that need no gradient; harmless and very noisy.
warnings.filterwarnings("ignore", message="Full backward hook is firing")
from fedsilo.shared.data import Dataset
from fedsilo.shared.model_factory import ghost_norm_coverage, resolve_grad_sample_mode  # noqa: F401 (re-exported)
from fedsilo.shared.models import loss_function, resolve_device, to_tensor_dataset


@dataclass(frozen=True)
class TrainResult:
    steps: int
    num_examples: int
    train_loss: float
    grad_sample_mode: str = ""  # the Opacus mode that ran ("" for plain SGD)


def plan_mechanism(
    num_examples: int, batch_size: int, epochs: int, noise_multiplier: float
) -> Mechanism:
    """The mechanism one round of local DP-SGD runs.

    Poisson sampling at ``q = 1 / ceil(N / B)`` (an expected batch of about ``B``)
    for ``epochs * ceil(N / B)`` steps — the same convention as Opacus'
    ``make_private``, so the plan and the executed run agree step for step.
    A department plans from the size it reports (its policy's public size or
    size bucket), so q, the steps and ε reveal nothing finer about N.
    """
    if num_examples < 1:
        raise ValueError("a department needs at least one training example")
    batches = math.ceil(num_examples / batch_size)
    return Mechanism(noise_multiplier, 1.0 / batches, epochs * batches)


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
) -> TrainResult:
    """Run ``mechanism.steps`` DP-SGD steps on ``model`` in place.

    Every Poisson batch is taken, empty ones included: an empty batch is still a
    step of the mechanism that the plan charged for.
    """
    from opacus import PrivacyEngine

    grad_sample_mode = resolve_grad_sample_mode(grad_sample_mode, model)
    device = device or resolve_device()
    model.to(device).train()
    # Opacus samples each record at 1/len(loader) for len(loader) steps an epoch: a
    # loader of exactly `batches` index chunks gives the planned rate, also when
    # the plan came from a reported size other than the exact count.
    batches = round(1.0 / mechanism.sample_rate)
    chunks = [chunk.tolist() for chunk in np.array_split(np.arange(len(data)), batches)]
    loader = DataLoader(to_tensor_dataset(data), batch_sampler=chunks)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    criterion = loss_function(data.task)
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
            poisson_sampling=True,
            grad_sample_mode=grad_sample_mode,
            noise_generator=noise,
        )
        if grad_sample_mode == "ghost":
            private, optimizer, criterion, dp_loader = engine.make_private(criterion=criterion, **kwargs)
        else:
            private, optimizer, dp_loader = engine.make_private(**kwargs)
    steps, losses = 0, []
    epochs = mechanism.steps // batches
    for _ in range(epochs):
        for xb, yb in dp_loader:
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            # An empty Poisson batch still goes through: Opacus adds noise to a
            # zero gradient sum, which is exactly the mechanism's step.
            loss = criterion(private(xb), yb)
            loss.backward()
            optimizer.step()
            if len(yb):
                losses.append(float(loss.detach()))
            steps += 1
    if steps != mechanism.steps:
        raise RuntimeError(f"ran {steps} steps, the mechanism charged {mechanism.steps}")
    private._close()  # remove Opacus' hooks and per-sample buffers: a plain module again
    return TrainResult(steps, len(data), float(np.mean(losses)) if losses else float("nan"), grad_sample_mode)


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
    loader = DataLoader(to_tensor_dataset(data), batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    criterion = loss_function(data.task)
    steps, losses = 0, []
    for _ in range(epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            steps += 1
    return TrainResult(steps, len(data), float(np.mean(losses)))
