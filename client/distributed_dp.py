"""A department's distributed-DP contribution: one DP-SGD step's noisy integer gradient sum.

Exactly the mechanism of docs/explanation/distributed-dp.md, on this host:

1. Poisson-sample every record at the run's rate q (from the CSPRNG noise stream);
2. each sampled record's gradient (``torch.func``: one per record, in chunks),
   clipped to C — a record whose gradient is not finite contributes zero;
3. scaled by γ, rotated by the round's public Hadamard seed, and rounded to integers
   *one record at a time* by conditional randomized rounding (norm ≤ Δ2, whatever the record);
4. summed, plus this department's Skellam share ``μ / (t − c)``.

Client-level (``central-dp`` under secure aggregation, :func:`noisy_client_update`): the
same steps with the department's whole update Δ as the one unit.

The result never leaves in the clear: it is masked by secure aggregation.  Neither
the sampled count nor any per-record quantity is logged or returned.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from fedsilo.shared.csprng import NoiseStream
from fedsilo.shared.data import Dataset
from fedsilo.shared.distributed_dp import DistributedDpPlan
from fedsilo.shared.models import loss_function
from fedsilo.shared.quantize import conditional_round, flatten, skellam_noise

from .trainer import MAX_SAMPLE_NORM, TrainingStopped

CHUNK = 256  # records whose per-sample gradients are held at once


def noisy_integer_sum(model: nn.Module, data: Dataset, plan: DistributedDpPlan, seed: int, *,
                      device: torch.device | None = None, deadline: float | None = None,
                      stream: NoiseStream | None = None) -> tuple[np.ndarray, float]:
    """This department's noisy integer sum (int64, length D) and the sampled batch's mean loss.

    The mean loss stays on this host (it is a statistic of the sampled records).
    """
    stream = stream or NoiseStream()
    device = device or torch.device("cpu")
    model.to(device).train()
    keys = [key for key, _ in plan.layout]
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state = model.state_dict()
    if set(keys) != set(state):
        raise ValueError("the plan's layout and the model's arrays differ")
    trainable = [key for key in keys if key in params and params[key].requires_grad]
    chosen = np.flatnonzero(stream.bernoulli(plan.sample_rate, len(data))) if len(data) else np.zeros(0, int)
    total = np.zeros(plan.rotated_dimension, dtype=np.int64)
    losses: list[float] = []
    if chosen.size:
        per_record = _per_record_gradients(model, params, buffers, trainable, data.task)
        x_all = torch.from_numpy(np.ascontiguousarray(data.x)).view(-1, *data.input_shape)
        y_all = torch.from_numpy(data.y)
        offsets = _offsets(plan, keys)
        for start in range(0, chosen.size, CHUNK):
            if deadline is not None and time.monotonic() > deadline:
                raise TrainingStopped("the round passed its wall-time limit while computing its gradients")
            index = torch.from_numpy(chosen[start:start + CHUNK])
            xb, yb = x_all[index].to(device), y_all[index].to(device)
            grads, loss = per_record(xb, yb)
            losses.extend(float(v) for v in loss.detach().cpu() if np.isfinite(float(v)))
            rows = np.zeros((len(index), plan.dimension), dtype=np.float64)
            for key in trainable:
                lo, hi = offsets[key]
                rows[:, lo:hi] = grads[key].detach().reshape(len(index), -1).cpu().double().numpy()
            total += _rounded_rows(rows, plan, seed, stream).sum(axis=0)
    total += skellam_noise(plan.share, plan.rotated_dimension, stream)
    return total, float(np.mean(losses)) if losses else float("nan")


def noisy_client_update(delta: dict[str, np.ndarray], plan: DistributedDpPlan, seed: int,
                        stream: NoiseStream | None = None) -> np.ndarray:
    """Client-level distributed DP: this department's whole update Δ as one unit (int64, length D).

    Clipped to C (``central-clip-norm``), scaled by γ, rotated, conditionally rounded
    (norm ≤ Δ2), plus this department's Skellam share μ / (t − c).  An update that is not
    finite contributes zero, as a record's gradient does.
    """
    stream = stream or NoiseStream()
    keys = [key for key, _ in plan.layout]
    if set(keys) != set(delta):
        raise ValueError("the plan's layout and the update's arrays differ")
    row = np.concatenate([np.asarray(delta[key], dtype=np.float64).ravel() for key in keys])[None, :]
    total = _rounded_rows(row, plan, seed, stream)[0].astype(np.int64)
    return total + skellam_noise(plan.share, plan.rotated_dimension, stream)


def _rounded_rows(rows: np.ndarray, plan: DistributedDpPlan, seed: int, stream: NoiseStream) -> np.ndarray:
    """Clip each row to C, scale by γ, rotate, and round each row to integers of norm ≤ Δ2."""
    norms = np.linalg.norm(rows, axis=1)
    ok = np.isfinite(norms) & (norms <= MAX_SAMPLE_NORM)
    rows = np.where(ok[:, None], np.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    norms = np.where(ok, norms, 0.0)
    factor = np.minimum(1.0, plan.max_grad_norm / (norms + 1e-6)) * plan.granularity
    rotated = flatten(rows * factor[:, None], seed)
    return conditional_round(rotated, plan.rounding_bound, stream)


def _offsets(plan: DistributedDpPlan, keys: list[str]) -> dict[str, tuple[int, int]]:
    out, start = {}, 0
    for key, size in zip(keys, plan.sizes):
        out[key] = (start, start + size)
        start += size
    return out


def _per_record_gradients(model: nn.Module, params: dict, buffers: dict, trainable: list[str], task: str):
    """A function (x, y) -> ({key: per-record gradients}, per-record losses), by ``torch.func``."""
    from torch.func import functional_call, grad_and_value, vmap

    criterion = loss_function(task)
    fixed = {k: v.detach() for k, v in params.items() if k not in trainable}

    def loss_of(trained: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**fixed, **trained}, buffers), (x.unsqueeze(0),))
        return criterion(out, y.unsqueeze(0))

    weights = {k: params[k].detach() for k in trainable}
    if not getattr(model, "vmap_safe", True):  # a pretrained base's masking reads values: one record at a time
        each = grad_and_value(loss_of)

        def one_by_one(xb: torch.Tensor, yb: torch.Tensor):
            results = [each(weights, x, y) for x, y in zip(xb, yb)]
            grads = {k: torch.stack([g[k] for g, _ in results]) for k in trainable}
            return grads, torch.stack([v for _, v in results]) if results else torch.zeros(0)

        return one_by_one
    step = vmap(grad_and_value(loss_of), in_dims=(None, 0, 0))

    def run(xb: torch.Tensor, yb: torch.Tensor):
        return step(weights, xb, yb)

    return run
