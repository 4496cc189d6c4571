"""Models both sides build identically: built-in ones, or the user's own factory.

The built-ins — an MLP for tabular data, a small CNN for images — are valid for
Opacus as they stand: no BatchNorm (it mixes examples, which breaks per-example
gradients); the CNN normalizes with GroupNorm instead.  A factory model
(``package.module:factory``, :mod:`fedsilo.shared.model_factory`) is checked
with Opacus' ``ModuleValidator`` before any round.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .data import Dataset


class MLP(nn.Module):
    """``in -> hidden -> outputs`` with ReLU; flattens image inputs.

    ``embeddings`` lists (feature index, number of slots) of categorical columns
    the schema encodes as one index column each: those are embedded (Opacus has
    a ghost norm for ``nn.Embedding``, so ghost clipping still applies).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128,
                 embeddings: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or hidden < 1:
            raise ValueError(
                f"MLP needs in_features >= 1, outputs >= 1, hidden >= 1; got "
                f"{in_features}, {num_classes}, {hidden}"
            )
        self.index_columns = [int(i) for i, _ in embeddings]
        self.dense_columns = [i for i in range(in_features) if i not in set(self.index_columns)]
        self.embed = nn.ModuleList(nn.Embedding(slots, embedding_width(slots)) for _, slots in embeddings)
        width = len(self.dense_columns) + sum(e.embedding_dim for e in self.embed)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.index_columns:
            return self.net(x)
        x = x.flatten(1)
        parts = [x[:, self.dense_columns]]
        for column, embed in zip(self.index_columns, self.embed):
            index = x[:, column].round().long().clamp(0, embed.num_embeddings - 1)
            parts.append(embed(index))
        return self.net(torch.cat(parts, dim=1))


def embedding_width(slots: int) -> int:
    """A common rule of thumb: about half the categories, at most 16."""
    return max(2, min(16, (slots + 1) // 2))


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
    name: str, input_shape: tuple[int, ...], num_classes: int, kind: str = "tabular", seed: int = 0,
    task: str = "multiclass", embeddings: tuple[tuple[int, int], ...] = (), fix: bool = False,
    bases: tuple[str, ...] = (), lora=None, base_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build the named model, seeded for reproducibility, checked for DP-SGD.

    ``name`` is ``auto``, ``mlp``, ``cnn`` or a factory ``package.module:callable``
    (called as ``factory(input_shape=..., num_outputs=..., task=...)``).
    ``num_classes`` is the number of outputs K (1 for regression).  With ``fix``
    Opacus' ``ModuleValidator.fix`` replaces layers DP-SGD cannot train (BatchNorm
    becomes GroupNorm, ...); without it such a model is a :class:`ModelError`
    naming the layer.  ``hf:sha256:DIGEST`` is a pretrained base among the
    folders ``bases`` (this party's own copies), fine-tuned with ``lora``
    (:class:`fedsilo.shared.pretrained.LoraSettings`; None: the defaults), its
    frozen weights in ``base_dtype``.
    """
    from .model_factory import ModelError, check_model, is_factory, load_factory, make_trainable
    from .pretrained import BaseModelError, LoraSettings, find_base, is_pretrained, tokenizer_of

    if is_pretrained(name):
        from .text_model import build_text_model

        try:
            base = find_base(name, bases)
            model = build_text_model(base, int(num_classes), lora or LoraSettings(), tokenizer_of(base).pad_token_id, seed,
                                     base_dtype)
        except BaseModelError as err:
            raise ModelError(str(err)) from None
        if torch.empty(0).device.type != "meta":  # transformers' masking reads values: no forward on shapes alone
            check_model(model, name, tuple(input_shape), int(num_classes))
        return model

    if is_factory(name):
        factory = load_factory(name)
    else:
        chosen = default_model_name(kind, input_shape) if name == "auto" else name
        if chosen not in ("mlp", "cnn"):
            raise ModelError(f"unknown model '{name}'; use auto, mlp, cnn or a factory package.module:callable")
        if chosen == "cnn" and len(input_shape) != 3:
            raise ModelError(
                f"model 'cnn' needs image data; this dataset has tabular shape {input_shape}; "
                "use --model mlp"
            )
        factory = None
    # Seed a forked RNG only: reseeding the global one would make every later
    # draw — DP noise and Poisson sampling included — predictable and identical
    # across departments.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if factory is not None:
            try:
                model = factory(input_shape=tuple(input_shape), num_outputs=int(num_classes), task=task)
            except TypeError as err:
                raise ModelError(
                    f"model '{name}' could not be called as factory(input_shape=..., num_outputs=..., task=...): {err}"
                ) from None
        elif chosen == "mlp":
            model = MLP(math.prod(input_shape), num_classes, embeddings=embeddings)
        else:
            model = SmallCNN(input_shape, num_classes)  # type: ignore[arg-type]
        if fix:
            model, _ = make_trainable(model, name)
    check_model(model, name, tuple(input_shape), int(num_classes))
    return model


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available; use auto or cpu")
    return torch.device(name)


def department_device(name: str) -> tuple[torch.device, str]:
    """Where a department trains a round the run asks to train on ``name``, and a note when not there.

    The department's host decides: a run asking for ``cuda`` of a department without a
    GPU trains on its CPU (slower) rather than failing, and the note says so.
    """
    if name in ("auto", "cuda") and not torch.cuda.is_available():
        return torch.device("cpu"), ("the run asks for a GPU; this department has no CUDA GPU and trains on its CPU (slower)"
                                     if name == "cuda" else "no CUDA GPU on this host: training on the CPU")
    return resolve_device(name), ""


def to_tensor_dataset(data: Dataset) -> TensorDataset:
    """Features shaped as the model expects, with integer labels."""
    x = torch.from_numpy(np.ascontiguousarray(data.x)).view(-1, *data.input_shape)
    return TensorDataset(x, torch.from_numpy(data.y))


class FlatMSELoss(nn.MSELoss):
    """MSE on ``(B, 1)`` predictions against ``(B, 1)`` targets, one loss value per example.

    Flattened so that Opacus' ghost clipping, which reweights a per-example loss
    of shape ``(B,)``, sees one value per example and not a ``(B, 1)`` column.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return super().forward(input.reshape(-1), target.reshape(-1))


def loss_function(task: str) -> nn.Module:
    """Cross-entropy on K logits for classification, MSE on the standardized target for regression."""
    return FlatMSELoss() if task == "regression" else nn.CrossEntropyLoss()


@torch.no_grad()
def predict_outputs(model: nn.Module, x: np.ndarray, input_shape: tuple[int, ...],
                    device: torch.device | None = None) -> np.ndarray:
    """The model's raw outputs (logits, or standardized predictions) for rows ``x``, shape (N, K)."""
    device = device or resolve_device()
    model.to(device).eval()
    tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(-1, *input_shape)
    outs = [model(tensor[i:i + 1024].to(device)).float().cpu() for i in range(0, len(tensor), 1024)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 1), np.float32)


def evaluate(model: nn.Module, data: Dataset, device: torch.device | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``data``; accuracy is NaN for regression.

    :func:`fedsilo.shared.metrics.score` gives every metric of the task.
    """
    from .metrics import score

    metrics = score(model, data, device)
    return metrics["loss"], metrics.get("accuracy", float("nan"))
