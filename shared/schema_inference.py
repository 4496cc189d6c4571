"""Drafting a schema from a table whose contents are public (the coordinator's own), as `fedsilo schema infer` does.

Every statistic a drafted schema holds (category lists, medians, means, scales,
the label's classes or scaling) comes from the table it is drafted from.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .encoding import label_text
from .schema import TASKS, TEXT_FEATURES, Column, DataSchema, Label, SchemaError, natural_order

# Inference thresholds (documented in the docs): a text column with at most
# MAX_CATEGORIES distinct values is categorical; a label with more distinct
# numbers than MAX_CLASSES is not guessed to be a class label.
MAX_CATEGORIES = 50
MAX_CLASSES = 20


def infer_schema(
    frame, label_column: str, task: str = "auto", source: str = "the table",
    max_categories: int = MAX_CATEGORIES, text_features: int = TEXT_FEATURES,
    feature_columns: Sequence[str] = (),
) -> DataSchema:
    """Draft a schema from a table the coordinator may look at.

    Every statistic it holds (category lists, medians, means, scales, the label's
    classes or scaling) comes from ``frame``: pass only a table whose contents are
    public to the federation — the coordinator's own held-out table.
    """
    if label_column not in frame.columns:
        raise SchemaError(
            f"label column '{label_column}' not found in {source} "
            f"(columns: {', '.join(map(str, list(frame.columns)[:20]))}); pass the right one with --label-column"
        )
    label = infer_label(frame[label_column], label_column, task, source)
    names = list(feature_columns) or [c for c in frame.columns if c != label_column]
    absent = [c for c in names if c not in frame.columns]
    if absent:
        raise SchemaError(f"feature column(s) {', '.join(absent)} not found in {source}")
    columns = tuple(_infer_column(str(c), frame[c], max_categories, text_features) for c in names)
    return DataSchema(label, columns)


def infer_label(values, column: str, task: str, source: str) -> Label:
    """The task and classes of a label column; refuses to guess a many-valued number."""
    import pandas as pd

    if task not in ("auto", *TASKS):
        raise SchemaError(f"task '{task}' is not one of auto, {', '.join(TASKS)}")
    present = values.dropna()
    if present.empty:
        raise SchemaError(f"label column '{column}' in {source} is empty")
    numeric = pd.api.types.is_numeric_dtype(present) and not pd.api.types.is_bool_dtype(present)
    if task == "regression":
        if not numeric:
            raise SchemaError(f"label column '{column}' in {source} is not numeric; a regression target must be a number")
        target = present.to_numpy(dtype=np.float64)
        scale = float(target.std()) or 1.0
        return Label(column, "regression", (), float(target.mean()), scale)
    classes = tuple(sorted(set(label_text(present)), key=natural_order))
    if task == "auto" and numeric:
        integral = bool(np.all(np.mod(present.to_numpy(dtype=np.float64), 1) == 0))
        if len(classes) > MAX_CLASSES or not integral:
            raise SchemaError(
                f"label column '{column}' in {source} holds {len(classes)} distinct "
                f"{'numbers' if integral else 'non-integer numbers'}; fedsilo will not guess the task: "
                "pass --task regression, or --task multiclass to treat each value as a class"
            )
    if len(classes) < 2:
        raise SchemaError(f"label column '{column}' in {source} has a single class ({classes[0]!r}); a classifier needs at least two")
    chosen = task if task != "auto" else ("binary" if len(classes) == 2 else "multiclass")
    return Label(column, chosen, classes)


def _infer_column(name: str, values, max_categories: int, text_features: int) -> Column:
    import pandas as pd

    present = values.dropna()
    if pd.api.types.is_bool_dtype(values) or (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)):
        numbers = present.to_numpy(dtype=np.float64)
        numbers = numbers[np.isfinite(numbers)]
        if numbers.size == 0:
            return Column(name, "ignore")
        mean, std = float(numbers.mean()), float(numbers.std())
        return Column(name, "numeric", mean=mean, scale=std if std > 0 else 1.0, impute="median",
                      fill=float(np.median(numbers)), indicator=bool(values.isna().any()))
    text = present.astype(str)
    distinct = text.nunique()
    if distinct == 0:
        return Column(name, "ignore")
    words = text.str.split().str.len().mean()
    if distinct <= max_categories and words < 4:
        return Column(name, "categorical", categories=tuple(sorted(set(text), key=natural_order)))
    if words < 1.5 and distinct == len(text):
        return Column(name, "ignore")  # one token, unique per row: an identifier, not a feature
    return Column(name, "text", features=text_features, ngrams=(1, 2), analyzer="word")
