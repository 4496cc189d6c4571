"""Encoding a table with a :class:`~fedsilo.shared.schema.DataSchema`: features, labels, and which rows encode.

The schema decides every encoding (its columns, categories, scaling, label
classes); the functions here apply it to a pandas frame.  ``DataSchema.encode``,
``encode_labels``, ``encodable_rows`` and ``check_columns`` are these functions.
"""

from __future__ import annotations

import numpy as np

from .schema import MAX_ENCODED_CELLS, Column, DataSchema, SchemaError

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def encode_features(schema: DataSchema, frame, source: str = "the table", max_cells: int | None = MAX_ENCODED_CELLS) -> np.ndarray:
    """The feature matrix (float32) of ``frame``, in schema order.

    ``max_cells`` bounds rows × features; a department passes None, having
    bounded its table against its own limits when it started (a bound that
    depended on the run's schema and the row count would tell a run the count).

    Raises
    ------
    SchemaError
        A schema column is missing from the table, a numeric column holds text
        or infinite values, or a missing value where ``impute`` is ``error``.
    """
    cells = len(frame) * schema.num_features
    if max_cells is not None and cells > max_cells:
        raise SchemaError(
            f"{source} has {len(frame)} rows; at {schema.num_features} features each that is {cells} values, "
            f"more than the {max_cells} encoded at once; split the table into smaller files"
        )
    check_columns(schema, frame, source)
    blocks = [_encode_column(c, frame[c.name], source, schema.tokenizer) for c in schema.inputs]
    with np.errstate(over="ignore"):  # an overflow is named below
        out = np.concatenate(blocks, axis=1).astype(np.float32) if blocks else np.zeros((len(frame), 0), np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise SchemaError(
            f"{source} row {row + 2} encodes to a non-finite feature ({schema.feature_names[col]}): the value is "
            "too large for the schema's mean and scale; fix the value, or the column's scale in the schema"
        )
    return out

def check_columns(schema: DataSchema, frame, source: str = "the table") -> None:
    """The schema's input columns are all in ``frame`` (a property of the table, not of a record)."""
    missing = [c.name for c in schema.inputs if c.name not in frame.columns]
    if missing:
        raise SchemaError(
            f"{source} lacks the schema's column(s) {', '.join(missing)} "
            f"(it has: {', '.join(map(str, list(frame.columns)[:20]))}); "
            "rename them to match, or edit the schema"
        )

def encodable_rows(schema: DataSchema, frame) -> np.ndarray:
    """Which rows of ``frame`` encode, each decided from that row alone (a boolean mask).

    A department encodes its table with a schema the coordinator sent, so a
    row that fails (text in a numeric column, a label outside the classes, a
    value the schema's scale overflows) must not fail the table: whether any
    record fails is a fact about the records.  Keeping exactly the rows that
    encode is a per-record filter, so a record added or removed changes the
    kept rows by at most that record (1-stable under add/remove adjacency).
    The schema's columns must be in ``frame`` (a property of the table, not
    of a record): :func:`encode_features` names the missing ones.
    """
    import pandas as pd

    ok = np.ones(len(frame), dtype=bool)
    for column in schema.inputs:
        if column.kind != "numeric":
            continue  # categories outside the list go to "other"; text always hashes
        values = frame[column.name]
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        gaps = values.isna().to_numpy()
        ok &= ~(np.isnan(numbers) & ~gaps)  # text in a numeric column
        if column.impute == "error":
            ok &= ~gaps
        with np.errstate(all="ignore"):
            scaled = (np.where(gaps, column.fill, numbers) - column.mean) / column.scale
        ok &= np.abs(scaled) <= _FLOAT32_MAX
    label = schema.label
    if label.column in frame.columns:
        values = frame[label.column]
        ok &= ~values.isna().to_numpy()
        if label.task == "regression":
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
            with np.errstate(all="ignore"):
                ok &= np.abs((numbers - label.mean) / label.scale) <= _FLOAT32_MAX
        else:
            known = set(label.classes)
            ok &= np.array([v in known for v in label_text(values)], dtype=bool)
    return ok

def encode_labels(schema: DataSchema, frame, source: str = "the table") -> np.ndarray:
    """Integer codes (classification) or the standardized target (regression)."""
    label = schema.label
    if label.column not in frame.columns:
        raise SchemaError(f"label column '{label.column}' not found in {source}; pass the right one with --label-column")
    values = frame[label.column]
    empty = values.isna().to_numpy()
    if empty.any():
        raise SchemaError(f"label column '{label.column}' in {source} is empty at row {_row(empty)}")
    if label.task == "regression":
        target = ((_numbers(values, label.column, source) - label.mean) / label.scale).astype(np.float32)
        if not np.isfinite(target).all():
            raise SchemaError(f"label column '{label.column}' in {source} encodes to a non-finite value at row "
                              f"{_row(~np.isfinite(target))}: too large for the schema's label scale")
        return target
    codes = {c: i for i, c in enumerate(label.classes)}
    text = label_text(values)
    unknown = [i for i, v in enumerate(text) if v not in codes]
    if unknown:
        raise SchemaError(
            f"label '{text[unknown[0]]}' in {source} row {unknown[0] + 2} is not one of the "
            f"federation's classes ({', '.join(label.classes[:20])}); fix the data or the schema"
        )
    return np.array([codes[v] for v in text], dtype=np.int64)


# --------------------------------------------------------------------------- columns

def _encode_column(column: Column, values, source: str, tokenizer=None) -> np.ndarray:
    n = len(values)
    if column.kind == "numeric":
        numbers = _numbers(values, column.name, source, allow_missing=True)
        gaps = np.isnan(numbers)
        if gaps.any() and column.impute == "error":
            raise SchemaError(
                f"column '{column.name}' in {source} is empty at row {_row(gaps)}, and the schema's impute is "
                "'error'; fill it in, or set impute to median/mean/zero with a fill value in the schema"
            )
        filled = np.where(gaps, column.fill, numbers)
        out = ((filled - column.mean) / column.scale).reshape(n, 1)
        return np.concatenate([out, gaps.reshape(n, 1).astype(np.float64)], axis=1) if column.indicator else out
    text = values.astype("string")
    if column.kind == "categorical":
        slots = {c: i for i, c in enumerate(column.categories)}
        other = len(column.categories)
        index = np.array([slots.get(v, other) if isinstance(v, str) else other for v in _category_text(values)], dtype=np.int64)
        if column.encoding == "embedding":
            return index.reshape(n, 1).astype(np.float64)
        onehot = np.zeros((n, other + 1))
        onehot[np.arange(n), index] = 1.0
        return onehot
    if column.encoder == "model":
        if tokenizer is None:
            raise SchemaError(
                f"schema column '{column.name}' is tokenized by the run's base model (encoder 'model'), and no "
                "tokenizer was given; run with --model hf:DIR (a department: --base-model DIR)")
        from .pretrained import tokenize

        return tokenize(tokenizer, text.fillna("").tolist(), column.max_length)[0]
    from sklearn.feature_extraction.text import HashingVectorizer

    hasher = HashingVectorizer(n_features=column.features, ngram_range=tuple(column.ngrams),
                               analyzer=column.analyzer, alternate_sign=False, norm="l2", lowercase=True)
    docs = text.fillna("").tolist()
    return hasher.transform(docs).toarray()


def _numbers(values, column: str, source: str, allow_missing: bool = False) -> np.ndarray:
    import pandas as pd

    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(numbers) & ~values.isna().to_numpy()
    if bad.any():
        raise SchemaError(
            f"column '{column}' in {source} is numeric in the schema but holds text at row {_row(bad)}; "
            "fix the value, or declare the column categorical or text in the schema"
        )
    if np.isinf(numbers).any():
        raise SchemaError(f"column '{column}' in {source} holds an infinite value at row {_row(np.isinf(numbers))}")
    if not allow_missing and np.isnan(numbers).any():
        raise SchemaError(f"column '{column}' in {source} is empty at row {_row(np.isnan(numbers))}")
    return numbers


def _category_text(values) -> list:
    """Category values as text, numbers without a spurious '.0' (1.0 and 1 are the same category)."""
    return [None if _missing(v) else _plain(v) for v in values.tolist()]


def label_text(values) -> list[str]:
    return [_plain(v) for v in values.tolist()]


def _plain(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _missing(value) -> bool:
    try:
        return value is None or bool(value != value)
    except (TypeError, ValueError):
        return False


def _row(mask: np.ndarray) -> int:
    """The first flagged row, counting the header as row 1 (as a spreadsheet shows it)."""
    return int(np.nonzero(mask)[0][0]) + 2
