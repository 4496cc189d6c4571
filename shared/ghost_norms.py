"""Per-example gradient norms for the layers Opacus' ghost clipping lacks: Conv1d, Conv2d, LayerNorm, GroupNorm.

Ghost clipping (Li et al., ICLR 2022) needs, per trainable layer, each example's
gradient norm without the per-example gradients themselves; Opacus 1.6 has such a
*norm sampler* only for ``nn.Linear`` and ``nn.Embedding``.  For any other layer it
materializes per-example gradients after all, so a convolutional network pays for
both.  The norm samplers here are registered through Opacus' own extension point
(:func:`opacus.grad_sample.utils.register_norm_sampler`), only for the layer types
that have none, so every other part of Opacus' ghost clipping (the second, reweighted
backward pass; the optimizer) is Opacus' own.

Convolutions follow mixed ghost clipping (Bu, Mao & Xu, "Scalable and Efficient
Training of Large Convolutional Neural Networks with Differential Privacy",
NeurIPS 2022): unfolded, a convolution is a linear layer applied at ``T`` output
positions, its input ``A_i`` (``T × d``) and output gradient ``G_i`` (``T × p``) per
group; the weight's gradient is ``G_iᵀ A_i`` and

    ‖G_iᵀ A_i‖²_F = Σ_{t,s} (A_i A_iᵀ)_{ts} (G_i G_iᵀ)_{ts},

which costs ``O(T²(d + p))`` against ``O(T d p)`` for the gradient itself.  Per layer
and batch, the cheaper one is taken: the ghost norm when ``2T² < p d``.  The
normalization layers' per-example gradients are the size of their affine
parameters (``(x̂ ⊙ g)`` and ``g`` summed over every position of an example): they
are formed and reduced at once, never stored.

This module is the only place that touches Opacus' norm-sampler registry.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def norm_sampler_types() -> tuple[type, ...]:
    """The layer types Opacus' ghost clipping has a norm sampler for, this module's included (:func:`register`)."""
    register()
    return _registered()


def _registered() -> tuple[type, ...]:
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleModuleFastGradientClipping,
    )

    return tuple(GradSampleModuleFastGradientClipping.NORM_SAMPLERS)


def ghost_is_cheaper(positions: int, inputs: int, outputs: int) -> bool:
    """Bu et al.'s rule for one convolution: the ghost norm when ``2T² < p·d``, else the per-example gradient."""
    return 2 * positions * positions < inputs * outputs


def _norm_dtype(backprops: torch.Tensor) -> torch.dtype:
    # A norm computed in half precision could come out low and let a record past the clip bound.
    return torch.promote_types(backprops.dtype, torch.float32)


def padding_of(layer: nn.Conv1d | nn.Conv2d, spatial: int) -> list[int]:
    """``F.pad``'s list (last dimension first) for the padding ``layer`` applies before its kernel."""
    pads = []
    for i in range(spatial):
        if layer.padding == "valid":
            left = right = 0
        elif layer.padding == "same":
            total = layer.dilation[i] * (layer.kernel_size[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = layer.padding[i]
        pads.append((left, right))
    return [side for pair in reversed(pads) for side in pair]


def unfolded(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input as the kernel sees it: ``(B, groups, d, T)``, ``d`` inputs per output position and group."""
    spatial = x.dim() - 2
    pads = padding_of(layer, spatial)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    if spatial == 1:  # as a 2-D convolution of height 1
        x = x.unsqueeze(-2)
        kernel, dilation, stride = (1, *layer.kernel_size), (1, *layer.dilation), (1, *layer.stride)
    else:
        kernel, dilation, stride = layer.kernel_size, layer.dilation, layer.stride
    columns = F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)  # (B, C_in·K, T), channel-major
    return columns.reshape(len(x), layer.groups, -1, columns.shape[-1])


def conv_norm_sample(layer: nn.Conv1d | nn.Conv2d, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Each example's gradient norm of a convolution's weight and bias (mixed ghost clipping)."""
    dtype = _norm_dtype(backprops)
    batch = len(backprops)
    positions = backprops.shape[2:].numel()
    g = backprops.to(dtype).reshape(batch, layer.groups, layer.out_channels // layer.groups, positions)  # (B, G, p, T)
    out = {}
    if layer.weight.requires_grad:
        if batch == 0:
            out[layer.weight] = torch.zeros(0, dtype=dtype, device=backprops.device)
        else:
            a = unfolded(layer, activations[0].to(dtype))  # (B, G, d, T)
            if ghost_is_cheaper(positions, a.shape[-2], g.shape[-2]):
                # Two Gram matrices over positions, never the (p × d) gradient.
                grams = torch.einsum("bgdt,bgds->bgts", a, a) * torch.einsum("bgpt,bgps->bgts", g, g)
                squared = grams.sum(dim=(1, 2, 3))
            else:
                squared = torch.einsum("bgpt,bgdt->bgpd", g, a).square().sum(dim=(1, 2, 3))
            out[layer.weight] = squared.clamp_min(0.0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=-1).flatten(1).norm(2, dim=1)
    return out


def _affine_norms(layer: nn.LayerNorm | nn.GroupNorm, normalized: torch.Tensor, g: torch.Tensor,
                  positions_dim: int) -> dict[nn.Parameter, torch.Tensor]:
    """Norms of Σ x̂ ⊙ g (the weight's gradient) and Σ g (the bias') over an example's positions.

    ``normalized`` and ``g`` are 3-D, batch first; ``positions_dim`` is the axis of positions.
    """
    out = {}
    for param, grad in ((layer.weight, normalized * g), (layer.bias, g)):
        if param is not None and param.requires_grad:
            out[param] = grad.sum(dim=positions_dim).norm(2, dim=1)
    return out


def layer_norm_norm_sample(layer: nn.LayerNorm, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Each example's gradient norm of a LayerNorm's weight and bias (summed over its leading positions)."""
    dtype = _norm_dtype(backprops)
    x, g = activations[0].to(dtype), backprops.to(dtype)
    normalized = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    features = math.prod(layer.normalized_shape)
    shape = (len(g), g.shape[1:].numel() // features, features)  # (B, positions, features)
    return _affine_norms(layer, normalized.reshape(shape), g.reshape(shape), positions_dim=1)


def group_norm_norm_sample(layer: nn.GroupNorm, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Each example's gradient norm of a GroupNorm's per-channel weight and bias."""
    dtype = _norm_dtype(backprops)
    x, g = activations[0].to(dtype), backprops.to(dtype)
    normalized = F.group_norm(x, layer.num_groups, eps=layer.eps)
    shape = (len(g), layer.num_channels, g.shape[2:].numel())  # (B, channels, positions)
    return _affine_norms(layer, normalized.reshape(shape), g.reshape(shape), positions_dim=2)


NORM_SAMPLERS = {
    nn.Conv1d: conv_norm_sample,
    nn.Conv2d: conv_norm_sample,
    nn.LayerNorm: layer_norm_norm_sample,
    nn.GroupNorm: group_norm_norm_sample,
}


def register() -> tuple[type, ...]:
    """Register the norm samplers above with Opacus for each layer type it has none for; idempotent.

    Called before any model is made private (:func:`fedsilo.client.trainer.train_dp`) and by
    :func:`norm_sampler_types`.  Returns the types registered by this call.
    """
    from opacus.grad_sample.utils import register_norm_sampler

    present = _registered()
    added = tuple(cls for cls in NORM_SAMPLERS if cls not in present)
    for cls in added:
        register_norm_sampler(cls)(NORM_SAMPLERS[cls])
    return added
