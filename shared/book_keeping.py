"""Book-keeping DP-SGD: per-example clipping from one backward pass, no per-example gradient kept.

Bu, Wang, Zha & Karypis, "Differentially Private Optimization on Large Model at
Small Cost" (ICML 2023).  Every trainable layer's gradient is a product of what
it saw and what came back: for a linear layer, example i's gradient is
``G_iᵀ A_i`` (its output gradients and its inputs over the example's positions).
So one backward pass that asks only for the layers' *output* gradients (never the
parameters' gradients) gives everything DP-SGD needs:

1. each example's gradient norm from ``A_i`` and ``G_i`` (the ghost norm of
   Goodfellow 2015 / Li et al. 2022, or the per-example gradient formed and
   reduced at once where that is cheaper: the mixed rule of Bu et al. 2022);
2. its clip factor ``c_i = min(1, C / (‖g_i‖ + 1e-6))`` (Opacus' rule);
3. the clipped sum ``Σ_i c_i G_iᵀ A_i``, one matrix product per layer.

Opacus' ghost clipping instead runs a second backward through the whole network
with the loss reweighted by ``c_i``; hooks mode keeps every per-example gradient.

The mechanism is DP-SGD's whatever the model computes, as long as each hooked
layer's batch axis is its input's first (checked each step, as Opacus assumes):

* a layer called several times in one forward pass contributes the sum of its
  calls, normed as one (the calls are positions of one product);
* a parameter used outside its own layer's forward contributes nothing there: the
  released gradient is exactly the clipped sum of what was normed;
* an example whose norm is not finite, or past ``MAX_SAMPLE_NORM``, contributes
  zero (its rows are zeroed before any product, so ``0 · inf`` never occurs).

Layers covered, by exact type: ``nn.Linear``, ``nn.Embedding`` (without
``max_norm`` or ``scale_grad_by_freq``, which mix examples or change weights),
``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.Conv1d`` and ``nn.Conv2d`` (on the
input as the kernel sees it: padded by the layer's own padding mode, unfolded
into positions; any stride, dilation and groups).  A model with any other trainable layer
is not eligible (:func:`book_keeping_coverage`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

LAYERS = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.Conv1d, nn.Conv2d)


def _eligible(module: nn.Module) -> bool:
    if type(module) not in LAYERS:
        return False
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq
    return True


def book_keeping_coverage(model: nn.Module) -> tuple[list[str], list[str]]:
    """Trainable layer types of ``model`` that book-keeping covers, and those it does not (by exact type)."""
    trainable = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    covered = sorted({type(m).__name__ for m in trainable if _eligible(m)})
    missing = sorted({type(m).__name__ for m in trainable if not _eligible(m)})
    owned = [id(p) for m in trainable for p in m.parameters(recurse=False) if p.requires_grad]
    if len(set(owned)) != len(owned):
        missing.append("tied weights")  # one parameter in two layers: its gradient is their sum
    return covered, missing


@dataclass
class _Calls:
    """What one layer saw and produced in the forward pass, one entry per call."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


class BookKeeper:
    """Hooks a model's trainable layers and turns one backward pass into the clipped gradient sum.

    Parameters
    ----------
    model : nn.Module
        Every parameter that requires a gradient must belong (directly) to a
        covered layer (:func:`book_keeping_coverage`).
    max_grad_norm : float
        The clip bound C.
    max_sample_norm : float
        A norm past this (or not finite) makes the example contribute zero.

    Use :meth:`clipped_sum` per step, and :meth:`close` (or the context manager)
    to remove the hooks.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, max_sample_norm: float) -> None:
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive; got {max_grad_norm!r}")
        _, missing = book_keeping_coverage(model)
        if missing:
            raise ValueError(f"book-keeping clipping covers Linear, Embedding, LayerNorm, GroupNorm, Conv1d and Conv2d; "
                             f"this model also trains {', '.join(missing)}: use --grad-sample-mode ghost or hooks")
        self.max_grad_norm = float(max_grad_norm)
        self.max_sample_norm = float(max_sample_norm)
        self.layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        self.params = [p for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]
        owned = {id(p) for p in self.params}
        stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
        if stray:  # cannot happen for parameters registered on modules; a guard for shared ones
            raise ValueError(f"parameters outside a covered layer: {', '.join(stray)}")
        self.calls = {id(m): _Calls() for m in self.layers}
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]

    def __enter__(self) -> "BookKeeper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._forget()

    def _forget(self) -> None:
        for calls in self.calls.values():
            calls.inputs.clear()
            calls.outputs.clear()

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        if not args or not isinstance(args[0], torch.Tensor):
            raise RuntimeError(f"a {type(module).__name__} layer was called without its input as the first "
                               "positional argument: book-keeping needs it to form the layer's gradient")
        calls = self.calls[id(module)]
        calls.inputs.append(args[0].detach())
        calls.outputs.append(output)

    # ------------------------------------------------------------------ one step

    def clipped_sum(self, losses: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Σ_i clip_C(∇ loss_i) for the forward pass just run, one tensor per trainable parameter.

        ``losses`` holds the batch's per-example losses (shape (B,)).  Returns the
        clipped sum (in the order of ``self.params``) and the per-example norms.
        The recorded activations are released.
        """
        batch = losses.shape[0]
        try:
            layers = [(m, self.calls[id(m)]) for m in self.layers]
            used = [(m, c) for m, c in layers if c.outputs]
            outputs = [o for _, c in used for o in c.outputs]
            if batch == 0 or not outputs:
                return [torch.zeros_like(p) for p in self.params], losses.new_zeros((batch,), dtype=torch.float32)
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
            per_layer, k = {}, 0
            for m, c in used:
                gs = []
                for o, g in zip(c.outputs, grads[k:k + len(c.outputs)]):
                    gs.append(torch.zeros_like(o) if g is None else g.detach())
                k += len(c.outputs)
                for t in (*c.inputs, *gs):
                    if t.dim() == 0 or t.shape[0] != batch:
                        raise RuntimeError(f"a {type(m).__name__} layer saw a tensor of shape {tuple(t.shape)} in a "
                                           f"batch of {batch}: book-keeping needs the batch on the first axis")
                per_layer[id(m)] = _layer_terms(m, c.inputs, gs)
            sq = torch.zeros(batch, dtype=torch.float32, device=losses.device)
            for terms in per_layer.values():
                sq = sq + terms.norm_sq()
            norms = sq.sqrt()
            ok = torch.isfinite(norms) & (norms <= self.max_sample_norm)
            factor = torch.where(ok, (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0), torch.zeros_like(norms))
            mask = None if bool(ok.all()) else ok  # zero the rows of the examples that contribute nothing
            sums = []
            for m in self.layers:
                terms = per_layer.get(id(m))
                summed = {} if terms is None else terms.weighted_sums(factor, mask)
                for name, p in m.named_parameters(recurse=False):
                    if p.requires_grad:
                        sums.append(summed[name].to(p.dtype) if name in summed else torch.zeros_like(p))
            return sums, norms
        finally:
            self._forget()


# ---------------------------------------------------------------------- per-layer rules


def _positions(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) → (B, T, d): every axis between batch and features is a position."""
    return t.reshape(t.shape[0], -1, t.shape[-1]) if t.dim() > 1 else t.reshape(t.shape[0], 1, 1)


def _joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """A layer's calls as positions of one product (no copy for the usual single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``t`` with the rows of examples outside ``mask`` zeroed (``0 · inf`` would be NaN in a product)."""
    if mask is None:
        return t
    return torch.where(mask.view((-1,) + (1,) * (t.dim() - 1)), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _float(t: torch.Tensor) -> torch.Tensor:
    """At least float32: a low-precision layer must not understate a norm."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class _Linear:
    """``y = x Wᵀ + b``: example i's gradients are ``G_iᵀ A_i`` and ``Σ_t g_it``."""

    def __init__(self, module: nn.Linear, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self.a = _float(_joined([_positions(x) for x in inputs], dim=1))
        self.g = _float(_joined([_positions(g) for g in grads], dim=1))
        self.bias = module.bias is not None and module.bias.requires_grad
        self.weight = module.weight.requires_grad
        self.per_example: torch.Tensor | None = None

    def norm_sq(self) -> torch.Tensor:
        a, g = self.a, self.g
        total = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        if self.weight:
            positions, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
            if positions == 1:
                total = total + a.square().sum((1, 2)) * g.square().sum((1, 2))
            elif 2 * positions * positions < d_in * d_out:  # Gram matrices are the cheaper (Bu et al. 2022)
                total = total + (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
            else:  # formed anyway for the norm: kept, the weighted sum is then a cheap reduction
                self.per_example = torch.bmm(g.transpose(1, 2), a)
                total = total + self.per_example.square().sum((1, 2))
        if self.bias:
            total = total + g.sum(1).square().sum(1)
        return total

    def weighted_sums(self, factor: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {}
        if self.weight and self.per_example is not None:
            out["weight"] = torch.einsum("boi,b->oi", _masked(self.per_example, mask), factor)
        g = _masked(self.g, mask) * factor[:, None, None]
        if self.weight and "weight" not in out:
            out["weight"] = g.reshape(-1, g.shape[-1]).T @ _masked(self.a, mask).reshape(-1, self.a.shape[-1])
        if self.bias:
            out["bias"] = g.sum((0, 1))
        return out


class _Embedding:
    """A lookup: example i's gradient adds ``g_it`` to the row of each of its ids (none for padding_idx)."""

    def __init__(self, module: nn.Embedding, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self.ids = _joined([x.reshape(x.shape[0], -1) for x in inputs], dim=1)
        self.g = _float(_joined([_positions(g) for g in grads], dim=1))
        if module.padding_idx is not None:
            self.g = self.g * (self.ids != module.padding_idx).unsqueeze(-1)
        self.rows = module.num_embeddings

    def norm_sq(self) -> torch.Tensor:
        same = (self.ids.unsqueeze(2) == self.ids.unsqueeze(1)).to(self.g.dtype)
        return (torch.bmm(self.g, self.g.transpose(1, 2)) * same).sum((1, 2))

    def weighted_sums(self, factor: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        g = _masked(self.g, mask) * factor[:, None, None]
        out = torch.zeros(self.rows, g.shape[-1], dtype=g.dtype, device=g.device)
        return {"weight": out.index_add_(0, self.ids.reshape(-1), g.reshape(-1, g.shape[-1]))}


class _Normalization:
    """LayerNorm / GroupNorm: example i's affine gradients ``Σ_pos x̂ ⊙ g`` and ``Σ_pos g``, formed at once (small)."""

    def __init__(self, module: nn.Module, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self.per_example: dict[str, torch.Tensor] = {}
        for x, g in zip(inputs, grads):
            x, g = _float(x), _float(g)
            if isinstance(module, nn.LayerNorm):
                normalized = F.layer_norm(x, module.normalized_shape, eps=module.eps)
                reduce = tuple(range(1, x.dim() - len(module.normalized_shape)))  # positions
            else:
                normalized = F.group_norm(x, module.num_groups, eps=module.eps)
                reduce = tuple(range(2, x.dim()))  # spatial positions; channels stay
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                term = normalized * g if name == "weight" else g
                term = term.sum(reduce) if reduce else term
                self.per_example[name] = self.per_example.get(name, 0) + term

    def norm_sq(self) -> torch.Tensor:
        terms = list(self.per_example.values())
        return sum(t.reshape(t.shape[0], -1).square().sum(1) for t in terms)

    def weighted_sums(self, factor: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in self.per_example.items():
            shape = (-1,) + (1,) * (t.dim() - 1)
            out[name] = (_masked(t, mask) * factor.view(shape)).sum(0)
        return out


class _Convolution:
    """A convolution is a linear layer over the unfolded input: per group, example i's gradient is ``G_i U_iᵀ``.

    Where the mixed rule forms the per-example gradient (most layers on images), it
    comes from the convolution's own weight-gradient kernel with the batch folded
    into the groups (one call for all examples), not from an unfolded copy of the
    input; where the Gram matrices are cheaper, from the unfolded input.
    """

    def __init__(self, module: nn.Conv1d | nn.Conv2d, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        from .ghost_norms import ghost_is_cheaper

        self.module = module
        self.groups, per_group = module.groups, module.out_channels // module.groups
        self.inputs = [_float(x) for x in inputs]
        self.g = _joined([_float(g).reshape(g.shape[0], self.groups, per_group, -1) for g in grads], dim=-1)  # (B, G, p, T)
        self.weight_shape = tuple(module.weight.shape)
        self.weight = module.weight.requires_grad
        self.bias = module.bias is not None and module.bias.requires_grad
        d = module.in_channels // self.groups * math.prod(module.kernel_size)
        self.gram = ghost_is_cheaper(self.g.shape[-1], d, per_group)
        self.grads = grads
        self.per_example: torch.Tensor | None = None
        self.a: torch.Tensor | None = None

    def _per_example_gradients(self) -> torch.Tensor:
        """(B, G, p, d): each example's weight gradient, summed over the layer's calls."""
        from .ghost_norms import padding_of

        module, total = self.module, None
        for x, g in zip(self.inputs, self.grads):
            batch = x.shape[0]
            pads = padding_of(module, x.dim() - 2)
            if any(pads):
                x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
            # The batch folded into the channels: B·groups groups, one weight copy per example.
            folded_x = x.reshape(1, batch * x.shape[1], *x.shape[2:])
            folded_g = _float(g).reshape(1, batch * g.shape[1], *g.shape[2:])
            shape = (batch * module.out_channels, module.in_channels // self.groups, *module.kernel_size)
            _, weight_grad, _ = torch.ops.aten.convolution_backward(
                folded_g, folded_x, folded_x.new_empty(shape), None, list(module.stride), [0] * len(module.kernel_size),
                list(module.dilation), False, [0] * len(module.kernel_size), batch * self.groups, [False, True, False])
            part = weight_grad.reshape(batch, self.groups, module.out_channels // self.groups, -1)
            total = part if total is None else total + part
        return total

    def norm_sq(self) -> torch.Tensor:
        from .ghost_norms import unfolded

        g = self.g
        total = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        if self.weight and g.shape[0]:
            if self.gram:
                self.a = _joined([unfolded(self.module, x) for x in self.inputs], dim=-1)  # (B, G, d, T)
                grams = torch.einsum("bgdt,bgds->bgts", self.a, self.a) * torch.einsum("bgpt,bgps->bgts", g, g)
                total = total + grams.sum((1, 2, 3))
            else:  # formed anyway for the norm: kept, the weighted sum is then a cheap reduction
                self.per_example = self._per_example_gradients()
                total = total + self.per_example.square().sum((1, 2, 3))
        if self.bias:
            total = total + g.sum(-1).flatten(1).square().sum(1)
        return total

    def weighted_sums(self, factor: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        g = _masked(self.g, mask) * factor[:, None, None, None]
        out = {}
        if self.weight and self.per_example is not None:
            out["weight"] = torch.einsum("bgpd,b->gpd", _masked(self.per_example, mask), factor).reshape(self.weight_shape)
        elif self.weight and self.a is not None:
            out["weight"] = torch.einsum("bgpt,bgdt->gpd", g, _masked(self.a, mask)).reshape(self.weight_shape)
        elif self.weight:
            out["weight"] = torch.zeros(self.weight_shape, dtype=g.dtype, device=g.device)
        if self.bias:
            out["bias"] = g.sum((0, 3)).reshape(-1)
        return out


def _layer_terms(module: nn.Module, inputs: list[torch.Tensor], grads: list[torch.Tensor]):
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _Convolution(module, inputs, grads)
    if isinstance(module, nn.Linear):
        return _Linear(module, inputs, grads)
    if isinstance(module, nn.Embedding):
        return _Embedding(module, inputs, grads)
    return _Normalization(module, inputs, grads)
