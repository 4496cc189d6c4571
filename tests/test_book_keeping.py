"""Book-keeping clipping: the clipped sum from one backward equals Σ_i clip_C(∇ loss_i), exactly.

Convolutions are checked on the same layers as their ghost norms (``test_ghost_norms.CONVOLUTIONS``).

Every case is checked against each example's own gradient from its own backward pass (the
definition), parameter by parameter, to 1e-5 relative; and the trainer's mode ``bk`` against
a hand-written DP-SGD step, its noise against σC.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.shared.book_keeping import BookKeeper, book_keeping_coverage
from fedsilo.client.trainer import MAX_SAMPLE_NORM, train_dp
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.data import Dataset
from test_ghost_norms import CONVOLUTIONS

C = 1.0


def reference(model: nn.Module, loss_of, xb, yb, clip: float = C):
    """Σ_i clip(g_i) from one backward per example; an example whose norm is not finite contributes zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for i in range(len(xb)):
        grads = torch.autograd.grad(loss_of(model(xb[i:i + 1]), yb[i:i + 1]).sum(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = float(torch.sqrt(sum(g.double().square().sum() for g in grads)))
        norms.append(norm)
        if not math.isfinite(norm):
            continue
        factor = min(1.0, clip / (norm + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g.double()
    return total, norms


def book_kept(model: nn.Module, loss_of, xb, yb, clip: float = C):
    with BookKeeper(model, clip, MAX_SAMPLE_NORM) as keeper:
        sums, norms = keeper.clipped_sum(loss_of(model(xb), yb))
    return sums, norms


def assert_same(model, loss_of, xb, yb, clip: float = C):
    expected, expected_norms = reference(model, loss_of, xb, yb, clip)
    got, norms = book_kept(model, loss_of, xb, yb, clip)
    finite = [i for i, n in enumerate(expected_norms) if math.isfinite(n)]
    np.testing.assert_allclose(norms[finite].double().numpy(), np.array(expected_norms)[finite], rtol=1e-5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(got) == len(expected) == len(names)
    for name, g, e in zip(names, got, expected):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    return norms


def per_example_ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def per_example_sq(out, y):
    return (out - y).square().reshape(len(out), -1).sum(1)


class Sequence(nn.Module):
    """Tokens → embeddings → LayerNorm → a linear layer called twice (shared) → mean → head."""

    def __init__(self, vocab=13, d=6, hidden=5, classes=3, padding_idx=0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(d)
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)
        self.proj = nn.Linear(d, hidden, bias=False)

    def forward(self, ids):
        h = self.norm(self.embed(ids.long()))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))  # the same layer twice
        return self.head(h.mean(1)) + self.proj(h).sum((1, 2)).unsqueeze(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_an_mlp_on_flat_inputs():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(12, 8) * 3, torch.randint(0, 4, (12,))
    norms = assert_same(model, per_example_ce, x, y)
    assert (norms > C).any() and (norms < C * 10).all()  # some examples clipped, some not


@pytest.mark.parametrize("positions, d_in, d_out", [(3, 8, 8), (9, 4, 3)])  # Gram (2T² < pd), then materialized
def test_a_linear_layer_over_positions_on_both_sides_of_the_mixed_rule(positions, d_in, d_out):
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Flatten(), nn.Linear(positions * d_out, 2))
    x, y = torch.randn(7, positions, d_in), torch.randint(0, 2, (7,))
    assert_same(model, per_example_ce, x, y, clip=0.5)


def test_embeddings_layernorm_and_a_layer_called_twice():
    model = Sequence()
    ids = torch.randint(0, 13, (9, 5))
    ids[0, :] = 3  # one id repeated: its rows add up before the norm
    ids[1, :2] = 0  # padding: no gradient
    y = torch.randint(0, 3, (9,))
    assert_same(model, per_example_ce, ids, y, clip=0.3)


@pytest.mark.parametrize("shape", [(6, 4, 5), (6, 4, 3, 3), (6, 4)])
def test_groupnorm_and_layernorm_affine_gradients(shape):
    channels = shape[1]
    model = nn.Sequential(nn.GroupNorm(2, channels), nn.Flatten(), nn.LayerNorm(math.prod(shape[1:])),
                          nn.Linear(math.prod(shape[1:]), 3))
    x, y = torch.randn(*shape) * 2 + 1, torch.randint(0, 3, (shape[0],))
    assert_same(model, per_example_ce, x, y, clip=0.2)


@pytest.mark.parametrize("make, shape, branch", CONVOLUTIONS)
def test_convolutions_of_every_padding_stride_dilation_and_grouping(make, shape, branch):
    conv = make()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten())
    out = model(torch.zeros(1, *shape)).shape[1]
    model.append(nn.Linear(out, 3))
    x, y = torch.randn(5, *shape), torch.randint(0, 3, (5,))
    assert_same(model, per_example_ce, x, y, clip=0.5)


def test_the_default_cnn_and_a_convolution_called_twice():
    from fedsilo.shared.models import SmallCNN

    cnn = SmallCNN((1, 8, 8), 4)
    assert book_keeping_coverage(cnn) == (["Conv2d", "GroupNorm", "Linear"], [])
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    assert_same(cnn, per_example_ce, x, y, clip=0.5)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 3, 3, padding=1)
            self.head = nn.Linear(3 * 7, 2)

        def forward(self, x):
            return self.head(torch.relu(self.conv(torch.relu(self.conv(x)))).flatten(1))

    assert_same(Twice(), per_example_ce, torch.randn(5, 3, 7), torch.randint(0, 2, (5,)), clip=0.3)


def test_frozen_layers_and_a_bias_only_layer():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 1))
    model[0].requires_grad_(False)
    model[2].weight.requires_grad_(False)  # only its bias trains
    x, y = torch.randn(10, 5), torch.randn(10, 1)
    assert_same(model, per_example_sq, x, y)


def test_an_example_that_would_break_clipping_contributes_zero_and_the_rest_stay_exact():
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    x[2, 1] = float("inf")
    x[4, 0] = 1e36  # finite, but its gradient norm is past MAX_SAMPLE_NORM
    got, norms = book_kept(model, per_example_ce, x, y)
    keep = [0, 1, 3, 5]
    expected, _ = reference(model, per_example_ce, x[keep], y[keep])
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)
    assert not math.isfinite(float(norms[2])) or float(norms[2]) > MAX_SAMPLE_NORM


def test_an_empty_batch_is_a_zero_sum():
    model = nn.Sequential(nn.Linear(4, 3))
    got, norms = book_kept(model, per_example_ce, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert norms.shape == (0,) and all(not g.any() for g in got)


def test_bfloat16_layers_are_normed_in_float32():
    model = nn.Sequential(nn.Linear(6, 4)).to(torch.bfloat16)
    x, y = torch.randn(5, 6, dtype=torch.bfloat16) * 4, torch.randint(0, 4, (5,))
    got, norms = book_kept(model, lambda o, t: per_example_ce(o.float(), t), x, y)
    assert norms.dtype == torch.float32 and got[0].dtype == torch.bfloat16


def test_a_layer_whose_batch_is_not_the_first_axis_is_refused():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 3)

        def forward(self, x):  # (4, 6): the layer sees (6, 4), the batch in its features
            return self.inner(x.T).sum(0, keepdim=True).expand(len(x), 3)

    with pytest.raises(RuntimeError, match="batch on the first axis"):
        book_kept(Transposed(), per_example_ce, torch.randn(4, 6), torch.randint(0, 3, (4,)))


def test_coverage_is_by_exact_type_and_options_that_mix_examples_are_not_covered():
    class MyLinear(nn.Linear):
        pass

    assert book_keeping_coverage(Sequence()) == (["Embedding", "LayerNorm", "Linear"], [])
    model = nn.Sequential(nn.Conv3d(1, 2, 3), MyLinear(2, 2), nn.Embedding(4, 2, scale_grad_by_freq=True))
    assert book_keeping_coverage(model) == ([], ["Conv3d", "Embedding", "MyLinear"])
    with pytest.raises(ValueError, match="also trains Conv3d, Embedding, MyLinear"):
        BookKeeper(model, C, MAX_SAMPLE_NORM)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert book_keeping_coverage(tied) == (["Linear"], ["tied weights"])  # auto runs hooks for it
    with pytest.raises(ValueError, match="also trains tied weights"):
        BookKeeper(tied, C, MAX_SAMPLE_NORM)
    keeper = BookKeeper(nn.Linear(2, 2), C, MAX_SAMPLE_NORM)
    keeper.close()
    assert not keeper._handles


# ----------------------------------------------------------------------------- the trainer's mode


def _table(n=40, d=6, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    return Dataset("table", (rng.normal(size=(n, d)) * 2).astype(np.float32), rng.integers(0, classes, n),
                   input_shape=(d,), classes=tuple(range(classes)), kind="tabular")


def test_a_bk_step_is_dp_sgd_s_step_clipped_sum_over_the_planned_size():
    data = _table()
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    expected, _ = reference(model, per_example_ce, x, y)
    # q = 1: every record in the one step; σ ≈ 0; the sum divided by the planned size, not len(data).
    result = train_dp(model, data, Mechanism(1e-9, 1.0, 1), max_grad_norm=C, learning_rate=0.7, momentum=0.0,
                      grad_sample_mode="bk", planned_size=50)
    assert result.grad_sample_mode == "bk" and result.steps == 1
    for p, p0, e in zip(model.parameters(), start, expected):
        torch.testing.assert_close((p0 - p.detach()).double(), 0.7 * e / 50, rtol=1e-5, atol=1e-7)
        assert p.grad is None  # nothing of the step is left on the model


def test_bk_adds_noise_of_sigma_c_once_per_step():
    data = _table(n=30, d=64)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    clipped, _ = reference(model, per_example_ce, x, y)
    train_dp(model, data, Mechanism(2.0, 1.0, 1), max_grad_norm=0.5, learning_rate=1.0, momentum=0.0,
             grad_sample_mode="bk", planned_size=30)
    drawn = torch.cat([((p0 - p.detach()).double() * 30 - e).reshape(-1)
                       for p, p0, e in zip(model.parameters(), start, clipped)])
    assert drawn.numel() > 4000
    assert abs(float(drawn.std()) - 2.0 * 0.5) < 0.05 and abs(float(drawn.mean())) < 0.05


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
@pytest.mark.parametrize("frozen", [nn.BatchNorm1d(4, affine=False), nn.BatchNorm1d(4).requires_grad_(False)])
def test_every_mode_refuses_a_batchnorm_without_trainable_parameters(mode, frozen):
    """Opacus validates trainable layers only; in training this one still normalizes by the batch's statistics."""
    data = _table()
    model = nn.Sequential(nn.Linear(6, 4), frozen, nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"layer '1' \(BatchNorm1d\): it normalizes each record with its batch's"):
        train_dp(model, data, Mechanism(1.0, 0.5, 2), max_grad_norm=C, learning_rate=0.1, grad_sample_mode=mode,
                 planned_size=40)
