"""Held-out metrics per task, computed by the coordinator on its own table.

Classification: loss (cross-entropy), accuracy, and F1 and ROC AUC of the
second class for binary tasks (macro F1 for multi-class).  Regression: loss (MSE
of the standardized target), and MAE, RMSE and R² in the target's own units.
"""

from __future__ import annotations

import math

import numpy as np

HEADLINE = {"binary": "accuracy", "multiclass": "accuracy", "regression": "r2"}
METRICS = {
    "binary": ("accuracy", "f1", "roc_auc", "loss"),
    "multiclass": ("accuracy", "macro_f1", "loss"),
    "regression": ("r2", "rmse", "mae", "loss"),
}


def metrics_from_outputs(outputs: np.ndarray, y: np.ndarray, task: str, schema=None) -> dict[str, float]:
    """Every metric of ``task`` from the model's raw outputs and the encoded targets."""
    import torch  # here: the CLI reads metrics without loading torch
    from sklearn import metrics as sk

    if task == "regression":
        pred = outputs.reshape(-1).astype(np.float64)
        truth = y.reshape(-1).astype(np.float64)
        loss = float(np.mean((pred - truth) ** 2))
        if schema is not None:  # back to the target's units
            pred, truth = schema.decode_predictions(pred), schema.decode_predictions(truth)
        return {
            "r2": float(sk.r2_score(truth, pred)) if len(truth) > 1 else float("nan"),
            "rmse": float(math.sqrt(sk.mean_squared_error(truth, pred))),
            "mae": float(sk.mean_absolute_error(truth, pred)),
            "loss": loss,
        }
    logits = torch.from_numpy(outputs.astype(np.float32))
    labels = torch.from_numpy(y.astype(np.int64))
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    pred = outputs.argmax(axis=1)
    out = {"accuracy": float(np.mean(pred == y)), "loss": loss}
    if task == "binary":
        probability = torch.softmax(logits, dim=1)[:, 1].numpy()
        out["f1"] = float(sk.f1_score(y, pred, zero_division=0))
        out["roc_auc"] = float(sk.roc_auc_score(y, probability)) if len(set(y.tolist())) == 2 else float("nan")
    else:
        out["macro_f1"] = float(sk.f1_score(y, pred, average="macro", zero_division=0))
    return {k: out[k] for k in METRICS[task]}


def score(model, data, device=None) -> dict[str, float]:
    """Every metric of ``data.task`` for ``model`` on ``data``."""
    from .models import predict_outputs

    outputs = predict_outputs(model, data.x, data.input_shape, device)
    return metrics_from_outputs(outputs, data.y, data.task, data.schema)


def headline(task: str) -> str:
    return HEADLINE[task]


def format_metrics(metrics: dict[str, float], task: str) -> str:
    """``accuracy=0.8120 f1=0.7950 roc_auc=0.8800 loss=0.4211`` in the task's order."""
    return " ".join(f"{k}={metrics[k]:.4f}" for k in METRICS[task] if k in metrics)
