"""Models both sides build identically: an MLP for tabular data, a small CNN for images.

Both are valid for Opacus as they stand: no BatchNorm (it mixes examples, which
breaks per-example gradients); the CNN normalizes with GroupNorm instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .data import Dataset


class MLP(nn.Module):
    """``in -> hidden -> classes`` with ReLU; flattens image inputs."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2 or hidden < 1:
            raise ValueError(
                f"MLP needs in_features >= 1, num_classes >= 2, hidden >= 1; got "
                f"{in_features}, {num_classes}, {hidden}"
            )
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv blocks (conv, GroupNorm, ReLU, pool) and a linear head."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"SmallCNN needs a (C, H, W) input shape, got {input_shape}")
        channels, height, width = input_shape
        if min(height, width) < 4:
            raise ValueError(f"SmallCNN needs images of at least 4x4, got {height}x{width}")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 32 * (height // 4) * (width // 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, *self.input_shape)))


def default_model_name(kind: str, input_shape: tuple[int, ...]) -> str:
    """The CNN for images large enough to benefit, the MLP otherwise.

    The 8x8 ``digits`` images stay on the MLP: it is the measured reference model
    (64-128-10) and a CNN gains nothing at that size.
    """
    if kind == "image" and len(input_shape) == 3 and min(input_shape[1:]) >= 16:
        return "cnn"
    return "mlp"


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, kind: str = "tabular", seed: int = 0
) -> nn.Module:
    """Build the named model (``auto``, ``mlp`` or ``cnn``), seeded for reproducibility."""
    chosen = default_model_name(kind, input_shape) if name == "auto" else name
    if chosen not in ("mlp", "cnn"):
        raise ValueError(f"unknown model '{name}'; use auto, mlp or cnn")
    if chosen == "cnn" and len(input_shape) != 3:
        raise ValueError(
            f"model 'cnn' needs image data; this dataset has tabular shape {input_shape}; "
            "use --model mlp"
        )
    # Seed a forked RNG only: reseeding the global one would make every later
    # draw — DP noise and Poisson sampling included — predictable and identical
    # across departments.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if chosen == "mlp":
            return MLP(math.prod(input_shape), num_classes)
        return SmallCNN(input_shape, num_classes)  # type: ignore[arg-type]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available; use auto or cpu")
    return torch.device(name)


def to_tensor_dataset(data: Dataset) -> TensorDataset:
    """Features shaped as the model expects, with integer labels."""
    x = torch.from_numpy(np.ascontiguousarray(data.x)).view(-1, *data.input_shape)
    return TensorDataset(x, torch.from_numpy(data.y))


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: torch.device | None = None) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``data``."""
    device = device or resolve_device()
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for xb, yb in DataLoader(to_tensor_dataset(data), batch_size=1024):
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb)
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    return loss_sum / len(data), correct / len(data)
