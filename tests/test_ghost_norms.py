"""Ghost norms for Conv1d, Conv2d, LayerNorm and GroupNorm: each example's gradient norm, exactly.

Every norm Opacus' ghost clipping computes through :mod:`fedsilo.shared.ghost_norms`
is checked, parameter by parameter, against the norm of that example's own
gradient from ``torch.func`` (``vmap`` of ``grad``): to 1e-5 relative, on random
layers of every padding, stride, dilation and grouping, on both sides of the mixed
rule, and on fedsilo's default models.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from fedsilo.shared import ghost_norms
from fedsilo.shared.ghost_norms import ghost_is_cheaper, norm_sampler_types
from fedsilo.shared.model_factory import describe_grad_sample_mode, ghost_norm_coverage, resolve_grad_sample_mode
from fedsilo.shared.models import build_model

BATCH = 6
RTOL = 1e-5


def exact_norms(model: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each trainable parameter's per-example gradient norm of Σ output ⊙ weights, from torch.func."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss(p, xi, wi):
        return (functional_call(model, p, (xi.unsqueeze(0),)) * wi.unsqueeze(0)).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, weights)
    return {name: g.reshape(len(x), -1).norm(2, dim=1) for name, g in grads.items()}


def opacus_norms(model: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same norms as Opacus' ghost clipping computes them (its first backward pass)."""
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

    ghost_norms.register()  # as train_dp does: a test run alone must not meet Opacus' own samplers instead
    wrapped = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", use_ghost_clipping=True)
    try:
        (wrapped(x) * weights).sum().backward()
        out = {}
        for name, p in model.named_parameters():
            assert getattr(p, "grad_sample", None) is None, f"{name}: a per-example gradient was materialized"
            out[name] = p._norm_sample.detach().clone()
        return out
    finally:
        wrapped._close()


def check(model: nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(1)
    weights = torch.randn(model(x).shape)
    exact = exact_norms(model, x, weights)
    got = opacus_norms(model, x, weights)
    assert set(got) == set(exact)
    for name in exact:
        torch.testing.assert_close(got[name], exact[name], rtol=RTOL, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_the_norm_samplers_are_registered_for_the_layers_opacus_lacks():
    covered = norm_sampler_types()
    for cls in (nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.Linear, nn.Embedding):
        assert cls in covered, cls
    assert ghost_norms.register() == ()  # idempotent: a second call adds nothing
    assert nn.Conv3d not in covered  # not built: Opacus materializes its per-example gradients


CONVOLUTIONS = [
    # (layer, input shape without the batch, the branch the mixed rule takes)
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (4, 17), "gradient"),
    (lambda: nn.Conv1d(4, 6, 5, padding="same", dilation=2, groups=2, padding_mode="reflect"), (4, 16), "gradient"),
    (lambda: nn.Conv1d(32, 64, 3, bias=False), (32, 6), "ghost"),
    (lambda: nn.Conv1d(8, 8, 3, padding=2, padding_mode="circular", groups=8), (8, 9), "gradient"),
    (lambda: nn.Conv2d(3, 8, 3, padding=1), (3, 9, 9), "gradient"),
    (lambda: nn.Conv2d(4, 8, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 0), groups=4,
                       padding_mode="circular"), (4, 7, 8), "gradient"),
    (lambda: nn.Conv2d(16, 32, 3), (16, 4, 4), "ghost"),
    (lambda: nn.Conv2d(24, 48, 3, padding="same", padding_mode="replicate", groups=2), (24, 3, 3), "ghost"),
    (lambda: nn.Conv2d(2, 4, 3, padding="valid", bias=False), (2, 6, 5), "gradient"),
]


@pytest.mark.parametrize("make, shape, branch", CONVOLUTIONS)
def test_convolution_norms_are_each_examples_own(make, shape, branch):
    torch.manual_seed(0)
    conv = make()
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(BATCH, *shape)
    out_positions = conv(x[:1]).shape[2:].numel()
    inputs = conv.in_channels // conv.groups * conv.kernel_size[0] * (conv.kernel_size[1] if len(shape) == 3 else 1)
    assert ghost_is_cheaper(out_positions, inputs, conv.out_channels // conv.groups) == (branch == "ghost")
    check(model, x)


NORMALIZATIONS = [
    (lambda: nn.LayerNorm(6), (6,)),
    (lambda: nn.LayerNorm(6), (5, 6)),
    (lambda: nn.LayerNorm((4, 6)), (3, 4, 6)),
    (lambda: nn.LayerNorm(6, bias=False), (5, 6)),
    (lambda: nn.GroupNorm(2, 6), (6, 5)),
    (lambda: nn.GroupNorm(3, 6), (6, 4, 4)),
    (lambda: nn.GroupNorm(6, 6), (6, 3, 3)),
]


@pytest.mark.parametrize("make, shape", NORMALIZATIONS)
def test_normalization_norms_are_each_examples_own(make, shape):
    torch.manual_seed(0)
    norm = make()
    with torch.no_grad():  # away from the initial 1 and 0, which would hide a mix-up of weight and bias
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    check(nn.Sequential(norm, nn.Flatten()), torch.randn(BATCH, *shape) * 3 + 1)


def test_an_empty_batch_has_no_norms():
    """An empty Poisson batch is still a step: every norm sampler answers it with empty norms."""
    cases = [(ghost_norms.conv_norm_sample, nn.Conv2d(2, 3, 3), (2, 5, 5), (3, 3, 3)),
             (ghost_norms.conv_norm_sample, nn.Conv1d(2, 3, 3, groups=1), (2, 5), (3, 3)),
             (ghost_norms.layer_norm_norm_sample, nn.LayerNorm(4), (3, 4), (3, 4)),
             (ghost_norms.group_norm_norm_sample, nn.GroupNorm(2, 4), (4, 3), (4, 3))]
    for sampler, layer, x_shape, g_shape in cases:
        norms = sampler(layer, [torch.zeros(0, *x_shape)], torch.zeros(0, *g_shape))
        assert len(norms) == 2 and {tuple(n.shape) for n in norms.values()} == {(0,)}, layer


def test_a_bfloat16_layer_gets_its_norms_in_float32():
    conv = nn.Conv2d(2, 3, 3).to(torch.bfloat16)
    x = torch.randn(BATCH, 2, 5, 5, dtype=torch.bfloat16)
    norms = ghost_norms.conv_norm_sample(conv, [x], torch.randn(BATCH, 3, 3, 3, dtype=torch.bfloat16))
    assert all(n.dtype == torch.float32 for n in norms.values())


@pytest.mark.parametrize("name, shape", [("cnn", (1, 8, 8)), ("cnn", (3, 12, 12)), ("mlp", (20,))])
def test_the_default_models_norms_are_each_examples_own(name, shape):
    model = build_model(name, shape, 4, "image" if len(shape) == 3 else "tabular", seed=0)
    assert ghost_norm_coverage(model)[1] == []  # every trainable layer has a ghost norm now
    torch.manual_seed(2)
    check(model, torch.randn(BATCH, *shape))


def test_auto_runs_book_keeping_where_it_covers_every_layer_else_hooks():
    """Linear, Embedding, the normalizations and the convolutions: book-keeping; another trainable layer: hooks."""
    layer_normed = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    assert resolve_grad_sample_mode("auto", layer_normed) == "bk"
    assert describe_grad_sample_mode("auto", layer_normed) == (
        "book-keeping (one backward a step; every trainable layer is covered: LayerNorm, Linear)")
    cnn = build_model("cnn", (1, 8, 8), 4, "image", seed=0)
    assert resolve_grad_sample_mode("auto", cnn) == "bk" and resolve_grad_sample_mode("ghost", cnn) == "ghost"
    assert describe_grad_sample_mode("auto", cnn).startswith("book-keeping (one backward a step; every trainable layer")
    no_norm = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.PReLU())
    assert describe_grad_sample_mode("auto", no_norm) == "hooks (no book-keeping rule for PReLU)"
