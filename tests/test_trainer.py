"""DP-SGD training runs exactly the planned mechanism and learns."""

import numpy as np
import pytest
import torch

from fedsilo.client.trainer import plan_mechanism, train_dp, train_plain
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.data import load_dataset, train_test_split
from fedsilo.shared.models import MLP, SmallCNN, build_model, evaluate


@pytest.fixture(scope="module")
def digits():
    return train_test_split(load_dataset("digits"))


def test_plan_matches_opacus_poisson_convention():
    m = plan_mechanism(num_examples=100, batch_size=32, epochs=2, noise_multiplier=1.3)
    assert m.sample_rate == pytest.approx(1 / 4) and m.steps == 8


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_dp_training_runs_the_planned_steps_and_learns(digits, mode):
    train, test = digits
    model = build_model("mlp", train.input_shape, train.num_classes, train.kind, seed=0)
    _, acc0 = evaluate(model, test)
    mechanism = plan_mechanism(len(train), 64, 1, 1.0)
    for _ in range(5):
        result = train_dp(model, train, mechanism, max_grad_norm=1.0, learning_rate=0.5, grad_sample_mode=mode)
        assert result.steps == mechanism.steps
    _, acc = evaluate(model, test)
    assert acc > acc0 + 0.4
    # Opacus' hooks are gone: the model is a plain module again
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_empty_poisson_batches_are_steps_not_skips(digits):
    train, _ = digits
    tiny = train.subset(np.arange(3))
    # q = 1/3 on 3 examples: many batches are empty; every one must count.
    mechanism = Mechanism(1.0, 1 / 3, 30)
    model = build_model("mlp", tiny.input_shape, tiny.num_classes, tiny.kind)
    result = train_dp(model, tiny, mechanism, max_grad_norm=1.0, learning_rate=0.1)
    assert result.steps == 30
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_noise_is_fresh_even_when_everything_else_is_seeded(digits):
    """Two departments with the same model seed and the same global RNG state must
    still draw different noise: predictable noise would void the DP guarantee."""
    train, _ = digits
    mechanism = Mechanism(2.0, 1.0, 1)  # one full-batch step: only the noise differs
    a = build_model("mlp", train.input_shape, 10, seed=3)
    b = build_model("mlp", train.input_shape, 10, seed=3)
    assert torch.equal(a.net[1].weight, b.net[1].weight)
    torch.manual_seed(0)
    train_dp(a, train, mechanism, max_grad_norm=1.0, learning_rate=0.1)
    torch.manual_seed(0)
    train_dp(b, train, mechanism, max_grad_norm=1.0, learning_rate=0.1)
    assert not torch.allclose(a.net[1].weight, b.net[1].weight)


def test_building_a_model_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_model("mlp", (64,), 10, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_plain_baseline_and_models(digits):
    train, test = digits
    model = build_model("auto", train.input_shape, 10, train.kind)
    assert isinstance(model, MLP)
    train_plain(model, train, epochs=3, batch_size=32, learning_rate=0.1)
    assert evaluate(model, test)[1] > 0.85
    cnn = build_model("auto", (1, 28, 28), 10, "image")
    assert isinstance(cnn, SmallCNN)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.modules())
    with pytest.raises(ValueError, match="use --model mlp"):
        build_model("cnn", (30,), 2, "tabular")


def test_cnn_trains_with_dp_in_ghost_mode():
    train, _ = train_test_split(load_dataset("mnist5k"))
    small = train.subset(np.arange(256))
    model = build_model("auto", small.input_shape, 10, small.kind)
    assert isinstance(model, SmallCNN)
    mechanism = plan_mechanism(len(small), 64, 1, 1.0)
    result = train_dp(model, small, mechanism, max_grad_norm=1.0, learning_rate=0.5)
    assert result.steps == mechanism.steps and np.isfinite(result.train_loss)


def test_auto_mode_picks_book_keeping_where_it_covers_every_layer(digits):
    from fedsilo.client.trainer import resolve_grad_sample_mode

    mlp = build_model("mlp", (64,), 10, seed=0)
    cnn = SmallCNN((1, 28, 28), 10)
    assert resolve_grad_sample_mode("auto", mlp) == "bk"
    assert resolve_grad_sample_mode("auto", cnn) == "bk"  # Conv2d, GroupNorm and Linear all have a rule
    assert resolve_grad_sample_mode("ew", cnn) == "ew"  # an explicit choice is kept
    train, _ = digits
    result = train_dp(mlp, train.subset(np.arange(50)), Mechanism(1.0, 0.5, 2), max_grad_norm=1.0, learning_rate=0.1)
    assert result.grad_sample_mode == "bk"


def test_plain_training_clips_the_batch_gradient_when_asked(digits):
    train, _ = digits
    batch = train.subset(np.arange(64))

    def step_norm(max_grad_norm):
        model = build_model("mlp", batch.input_shape, batch.num_classes, batch.kind, seed=0)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train_plain(model, batch, epochs=1, batch_size=64, learning_rate=1.0, momentum=0.0,
                    max_grad_norm=max_grad_norm)
        return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())

    assert step_norm(None) > 0.05  # one SGD step of lr 1: the raw gradient's norm
    assert step_norm(0.01) == pytest.approx(0.01, rel=1e-3)  # clipped to C: lr × C
