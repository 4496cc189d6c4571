"""Bring your own model: ``package.module:factory``, checked for DP-SGD before any round.

The contract (also in docs/how-to/own-model.md)::

    factory(input_shape=(F,) or (C, H, W), num_outputs=K, task="binary"|"multiclass"|"regression")
        -> torch.nn.Module mapping a batch (B, *input_shape) of float32 to (B, K)

K is the number of classes (two for binary: logits for cross-entropy), or 1 for
regression (the prediction of the standardized target, trained with MSE).  The
factory is imported from the environment of whoever builds the model: the
coordinator's, and each department's own installed code — a department never
imports code the coordinator sends, and its policy names the factories it
allows.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is loaded by whoever builds a model, not by every importer of these checks
    from torch import nn

from .config import FACTORY as SPEC
from .settings import PRETRAINED


class ModelError(ValueError):
    """A model that cannot be built or trained with DP-SGD; the message names the layer and the fix."""


def is_factory(spec: str) -> bool:
    return ":" in spec and not spec.startswith("hf:")


def check_spec(spec: str) -> str:
    """``spec`` itself when it is a built-in name or a well-formed ``package.module:callable``."""
    if spec in ("auto", "mlp", "cnn") or PRETRAINED.match(spec):
        return spec
    if not SPEC.match(spec):
        raise ModelError(
            f"model '{spec}' is neither a built-in (auto, mlp, cnn) nor a factory written "
            "package.module:callable (e.g. acme_models.tabular:residual_mlp)"
        )
    return spec


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """Import the factory named by ``spec`` from this environment."""
    check_spec(spec)
    module_name, _, attr = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(
            f"model factory '{spec}' is not installed here ({type(err).__name__}: {err}); "
            f"install the package that provides '{module_name}' in this environment"
        ) from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelError(f"model factory '{spec}': module '{module_name}' has no '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"model factory '{spec}' is not callable")
    return target


def dp_problems(model: nn.Module) -> list[str]:
    """Every layer Opacus cannot train with per-example gradients, by its path in ``model``.

    Opacus validates trainable layers only.  A BatchNorm without trainable
    parameters (frozen, or ``affine=False``) still normalizes each record with its
    batch's statistics in training, so one record moves every other record's
    gradient, past any per-record clip: it is refused too.
    """
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator
    from torch.nn.modules.batchnorm import _BatchNorm

    problems = []
    trainable = dict(trainable_modules(model))
    for name, module in trainable.items():
        validator = ModuleValidator.VALIDATORS.get(type(module))
        for error in validator(module) if validator else ():
            first = str(error).split(". ")[0].rstrip(".")  # Opacus' first sentence names the reason
            problems.append(f"layer '{name or '<root>'}' ({type(module).__name__}): {first}")
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and name not in trainable:
            problems.append(f"layer '{name or '<root>'}' ({type(module).__name__}): it normalizes each record with its "
                            "batch's statistics even without trainable parameters; use GroupNorm or LayerNorm in the "
                            "model factory")
    return problems


def make_trainable(model: nn.Module, spec: str) -> tuple[nn.Module, list[str]]:
    """``ModuleValidator.fix``, and what it changed (``net.1: BatchNorm1d → GroupNorm``)."""
    from opacus.validators import ModuleValidator

    before = {name: type(m).__name__ for name, m in model.named_modules()}
    fixed = ModuleValidator.fix(model)
    after = {name: type(m).__name__ for name, m in fixed.named_modules()}
    changes = [f"{name or '<root>'}: {before[name]} → {after.get(name, 'removed')}"
               for name in before if after.get(name) != before[name] and name in after]
    return fixed, changes


def check_model(model: nn.Module, spec: str, input_shape: tuple[int, ...], num_outputs: int) -> None:
    """A module DP-SGD can train, mapping ``(B, *input_shape)`` to ``(B, num_outputs)``."""
    import torch
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory '{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    problems = dp_problems(model)
    if problems:
        raise ModelError(
            f"model '{spec}' cannot be trained with DP-SGD: " + "; ".join(problems)
            + ". Pass --fix-model to let Opacus' ModuleValidator.fix replace such layers (e.g. BatchNorm → GroupNorm)"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"model '{spec}' has no trainable parameters")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape)))
    except Exception as err:  # a user's forward pass may raise anything
        raise ModelError(
            f"model '{spec}' fails on a batch of shape (2, {', '.join(map(str, input_shape))}): "
            f"{type(err).__name__}: {err}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_outputs):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model '{spec}' maps a batch of 2 to {shape}; fedsilo needs (2, {num_outputs}): "
            "one output per class, or one prediction for regression"
        )


def resolve_grad_sample_mode(mode: str, model: nn.Module) -> str:
    """``auto``: book-keeping where it covers every trainable layer, else Opacus' hooks.

    Book-keeping (``bk``, :mod:`.book_keeping`: each example's norm and the clipped
    sum from one backward) covers Linear, Embedding, LayerNorm, GroupNorm, Conv1d
    and Conv2d, and measured faster than Opacus' modes on every model of ``bench run
    dp-cost`` (one CPU core, × a non-private epoch): the default MLP 2.07× (ghost
    clipping 5.03×), the default CNN 1.61× (hooks 2.02×), a ResNet with GroupNorm
    1.36× (hooks 2.26×), DP-LoRA on MiniLM 1.00× (ghost clipping 1.59×).  A model
    with any other trainable layer runs Opacus' hooks, which materialize every
    per-example gradient but need no rule per layer.  Any other mode is returned
    as given.
    """
    if mode != "auto":
        return mode
    from .book_keeping import book_keeping_coverage

    return "hooks" if book_keeping_coverage(model)[1] else "bk"


def describe_grad_sample_mode(mode: str, model: nn.Module) -> str:
    """What the DP path will run for ``model``, and why (shown before a run)."""
    from .book_keeping import book_keeping_coverage

    chosen = resolve_grad_sample_mode(mode, model)
    if mode != "auto":
        return f"{chosen} (as asked)"
    covered, missing = book_keeping_coverage(model)
    if chosen == "bk":
        return f"book-keeping (one backward a step; every trainable layer is covered: {', '.join(covered)})"
    return f"hooks (no book-keeping rule for {', '.join(missing)})"


def ghost_norm_coverage(model: nn.Module) -> tuple[list[str], list[str]]:
    """Trainable layer types of ``model`` with a ghost norm (Opacus' or :mod:`.ghost_norms`'), and those without one.

    By exact type, as Opacus looks them up: a subclass of ``nn.Linear`` has no ghost norm of its own.
    """
    from .ghost_norms import norm_sampler_types

    ghost_norms = norm_sampler_types()
    trainable = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    covered = sorted({type(m).__name__ for m in trainable if type(m) in ghost_norms})
    missing = sorted({type(m).__name__ for m in trainable if type(m) not in ghost_norms})
    return covered, missing


def describe_size(model: nn.Module) -> str:
    """``1,234 parameters``, or for a frozen base ``75,268 of 22,788,484 parameters train and travel``."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trained == total:
        return f"{total:,} parameters"
    return f"{trained:,} of {total:,} parameters train and travel ({total / trained:.0f}× fewer than the whole model)"


def model_changes(spec: str, input_shape: tuple[int, ...], num_outputs: int, task: str) -> list[str]:
    """What ``--fix-model`` changes in this model, for the operator to read before the run."""
    if not is_factory(spec):
        return []  # the built-ins need no fixing
    raw = load_factory(spec)(input_shape=tuple(input_shape), num_outputs=int(num_outputs), task=task)
    return make_trainable(raw, spec)[1]
