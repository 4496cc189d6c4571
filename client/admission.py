"""What the coordinator sends is checked before any of this department's records is touched.

A DP guarantee must hold for *any* global model and settings a coordinator
sends, so a department admits a round only when

* the run's schema is within the host's width limits (features, categories,
  classes), read from the schema alone — the table is not loaded yet;
* the model the run asks for has at most the host's parameter limit, counted
  on PyTorch's ``meta`` device (shapes only, no memory);
* the incoming global model has exactly the department's own model's keys,
  shapes and dtypes, and every weight is finite and within the host's
  magnitude bound (a weight of 1e37 is how a crafted model makes one record's
  gradient overflow).

None of these decisions reads a record, so a decline reveals nothing about
the data.  The train handler loads the model only from
:func:`verified_state_dict`, the same check against its real model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedsilo.shared.config import RunSettings
from fedsilo.shared.data import Dataset
from fedsilo.shared.model_factory import ModelError
from fedsilo.shared.models import build_model
from fedsilo.shared.pretrained import lora_of
from fedsilo.shared.schema import DataSchema

from .limits import RunLimits


class AdmissionError(ValueError):
    """The coordinator's message is not admitted; ``reasons`` name each check it fails."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


@dataclass(frozen=True)
class ModelSpec:
    """What the department's model is built from: known from the schema before any record is read."""

    input_shape: tuple[int, ...]
    num_outputs: int
    kind: str
    task: str
    embeddings: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of_schema(cls, schema: DataSchema) -> "ModelSpec":
        return cls((schema.num_features,), schema.label.num_outputs, "tabular", schema.task, schema.embeddings)

    @classmethod
    def of_data(cls, data: Dataset) -> "ModelSpec":
        return cls(tuple(data.input_shape), data.num_outputs, data.kind, data.task, data.embeddings)


def schema_limits(schema: DataSchema, limits: RunLimits) -> list[str]:
    """Each width limit of the host that the run's schema passes."""
    categories = {c.name: len(c.categories) for c in schema.inputs if c.kind == "categorical"}
    classes = len(schema.label.classes) if schema.task != "regression" else 1
    return limits.check_schema(schema.num_features, categories, classes)


def build(settings: RunSettings, spec: ModelSpec, device: str | torch.device | None = None,
          bases: tuple[str, ...] = (), train_on: torch.device | None = None) -> torch.nn.Module:
    """The department's own model for this run (on ``meta``: shapes only, nothing allocated).

    A pretrained base comes from ``bases``, this department's own copies (its policy's),
    its frozen weights in the dtype ``base-dtype`` gives for the device it trains on.
    """
    from fedsilo.shared.text_model import resolve_base_dtype

    dtype = resolve_base_dtype(settings.base_dtype, train_on or "cpu")
    with torch.device(device or "cpu"):
        return build_model(settings.model, spec.input_shape, spec.num_outputs, spec.kind, task=spec.task,
                           embeddings=spec.embeddings, fix=settings.fix_model, bases=bases, lora=lora_of(settings),
                           base_dtype=dtype)


def reference_layout(model: torch.nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key → (numpy dtype name, shape) of a model's state, as an ArrayRecord carries it."""
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in model.state_dict().items()}


def admit_model(settings: RunSettings, spec: ModelSpec, limits: RunLimits,
                bases: tuple[str, ...] = ()) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The layout a global model must have, once the model the run asks for is within the host's limits.

    A pretrained base's own weights are this department's, not the run's: only the
    parameters the run trains (adapters, head) count against the limit.
    """
    try:
        model = build(settings, spec, "meta", bases)
    except (ModelError, ValueError) as err:
        raise AdmissionError([f"model: {err}"]) from None
    too_big = limits.check_parameters(sum(p.numel() for p in model.parameters() if p.requires_grad))
    if too_big:
        raise AdmissionError(too_big)
    return reference_layout(model)


def verified_state_dict(
    arrays: ArrayRecord, layout: Mapping[str, tuple[str, tuple[int, ...]]], max_magnitude: float
) -> dict[str, torch.Tensor]:
    """The global model as tensors, or :class:`AdmissionError` naming what is wrong with it.

    Keys, dtypes and shapes must equal the department's own model's (checked on
    the deserialized arrays, not on what the message declares); every value
    must be finite and at most ``max_magnitude`` in absolute value.
    """
    missing = sorted(set(layout) - set(arrays.keys()))
    extra = sorted(set(arrays.keys()) - set(layout))
    if missing or extra:
        parts = ([f"lacks {', '.join(k[:64] for k in missing[:5])}"] if missing else []) + (
            [f"has unknown {', '.join(k[:64] for k in extra[:5])}"] if extra else [])
        raise AdmissionError([f"global model: {' and '.join(parts)} (this department's model has {len(layout)} tensors)"])
    state, problems = {}, []
    for key, (dtype, shape) in layout.items():
        try:
            value = arrays[key].numpy()
        except (TypeError, ValueError, OSError, EOFError) as err:
            problems.append(f"global model: '{key}' cannot be read as an array ({type(err).__name__})")
            continue
        if str(value.dtype) != dtype or tuple(value.shape) != shape:
            problems.append(
                f"global model: '{key}' is {value.dtype}{list(value.shape)}; this department's model has {dtype}{list(shape)}")
            continue
        if value.dtype.kind in "fc":
            if not np.isfinite(value).all():
                problems.append(f"global model: '{key}' has non-finite values")
                continue
        if value.size and float(np.abs(value).max()) > max_magnitude:
            problems.append(
                f"global model: '{key}' has a weight of magnitude {float(np.abs(value).max()):.3g}; "
                f"this department accepts at most {max_magnitude:g} (--max-weight-magnitude)")
            continue
        state[key] = torch.from_numpy(np.array(value, copy=True))
    if problems:
        raise AdmissionError(problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else []))
    return state
