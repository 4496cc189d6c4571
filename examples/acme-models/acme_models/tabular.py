"""Two tabular models written against fedsilo's factory contract.

``factory(input_shape=(F,), num_outputs=K, task=...) -> nn.Module`` mapping
``(B, F)`` to ``(B, K)``: logits for classification, the prediction for
regression (K = 1).
"""

from __future__ import annotations

import math

from torch import nn


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def residual_mlp(input_shape, num_outputs, task, width: int = 64, blocks: int = 2) -> nn.Module:
    """Linear layers only, with residual connections: every layer has an Opacus ghost norm."""
    features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, width), nn.ReLU(),
        *[_Block(width) for _ in range(blocks)],
        nn.Linear(width, num_outputs),
    )


def batchnorm_mlp(input_shape, num_outputs, task, width: int = 64) -> nn.Module:
    """A common MLP with BatchNorm, which DP-SGD cannot train as is: run it with --fix-model."""
    features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, width), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, num_outputs),
    )
