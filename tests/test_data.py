"""Datasets, the held-out split and partitioning: reproducible, and clear about bad input."""

import numpy as np
import pandas as pd
import pytest
from dataclasses import replace

from fedsilo.shared.data import load_table, table_schema
from fedsilo.shared.schema import DataSchema

from fedsilo.shared.data import (
    DataError,
    federation_data,
    load_dataset,
    partition_indices,
    train_test_split,
)


@pytest.mark.parametrize("name,rows,shape", [("digits", 1797, (1, 8, 8)), ("breast-cancer", 569, (30,)), ("mnist5k", 5000, (1, 28, 28))])
def test_embedded_datasets_load(name, rows, shape):
    data = load_dataset(name)
    assert len(data) == rows and data.input_shape == shape
    assert data.x.dtype == np.float32 and np.isfinite(data.x).all()


def test_test_split_is_fixed_stratified_and_disjoint_from_departments():
    data = load_dataset("digits")
    train, test = train_test_split(data)
    again_train, again_test = train_test_split(data)
    assert np.array_equal(test.y, again_test.y) and np.array_equal(test.x, again_test.x)
    # stratified: every class is held out in proportion
    assert np.bincount(test.y).min() >= 30
    parts, held_out = federation_data("digits", "label", (), 5, "iid", 1)
    assert np.array_equal(held_out.x, test.x)
    dept_rows = {row.tobytes() for p in parts for row in p.x}
    assert not any(row.tobytes() in dept_rows for row in test.x[:50])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5"])
def test_partitions_are_reproducible_by_seed_and_cover_the_training_set(scheme):
    train, _ = train_test_split(load_dataset("digits"))
    a = partition_indices(train, 10, scheme, seed=7)
    b = partition_indices(train, 10, scheme, seed=7)
    c = partition_indices(train, 10, scheme, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    joined = np.concatenate(a)
    assert len(joined) == len(np.unique(joined)) == len(train)
    assert min(len(p) for p in a) > 0


def test_dirichlet_skews_labels_more_than_iid():
    train, _ = train_test_split(load_dataset("digits"))

    def skew(parts):
        dists = [np.bincount(train.y[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([np.abs(d - 0.1).sum() for d in dists]))

    assert skew(partition_indices(train, 10, "dirichlet:0.1", 0)) > 2 * skew(partition_indices(train, 10, "iid", 0))


def test_csv_and_parquet_tables_load(digits_csv, tmp_path):
    csv = load_dataset(str(digits_csv))
    parquet_path = tmp_path / "digits.parquet"
    pd.read_csv(digits_csv).to_parquet(parquet_path)
    parquet = load_dataset(str(parquet_path))
    assert len(csv) == len(parquet) == 1797
    assert csv.input_shape == (64,) and csv.num_classes == 10
    subset = load_dataset(str(digits_csv), feature_columns=["px10", "px20"])
    assert subset.input_shape == (2,)


def test_bad_inputs_name_the_problem(tmp_path, digits_csv):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="label column 'churned' not found"):
        load_dataset(str(digits_csv), label_column="churned")
    with pytest.raises(DataError, match="neither an embedded dataset"):
        load_dataset("imagenet")

    # A table that no longer fits the federation's schema is named, column and row.
    schema = table_schema(digits_csv, "label")
    frame = pd.read_csv(digits_csv)
    frame["px3"] = frame["px3"].astype(str) + "x"
    bad = tmp_path / "text.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(DataError, match="column 'px3' .* numeric in the schema but holds text at row 2"):
        load_table(bad, "label", schema=schema)

    frame = pd.read_csv(digits_csv)
    frame.loc[5, "px7"] = None
    holes = tmp_path / "holes.csv"
    frame.to_csv(holes, index=False)
    strict = DataSchema(schema.label, tuple(
        replace(c, impute="error") if c.name == "px7" else c for c in schema.columns))
    with pytest.raises(DataError, match="column 'px7' .* empty at row 7.*impute is 'error'"):
        load_table(holes, "label", schema=strict)
    # The default imputation fills it with the schema's value (scaled like any other).
    filled = load_table(holes, "label", schema=schema)
    px7 = next(c for c in schema.columns if c.name == "px7")
    column = schema.feature_names.index("px7")
    assert filled.x[5, column] == pytest.approx((px7.fill - px7.mean) / px7.scale, abs=1e-6)

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(garbage))

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="cannot read|no rows"):
        load_dataset(str(empty))


def test_partition_errors_are_clear():
    train, _ = train_test_split(load_dataset("breast-cancer"))
    with pytest.raises(DataError, match="use fewer departments"):
        partition_indices(train, len(train) + 1, "iid", 0)
    with pytest.raises(DataError, match="dirichlet:ALPHA|ALPHA must be"):
        partition_indices(train, 3, "dirichlet:-1", 0)
    with pytest.raises(DataError, match="unknown partition"):
        partition_indices(train, 3, "pathological", 0)
    with pytest.raises(DataError, match="larger alpha|fewer departments"):
        partition_indices(train, 200, "dirichlet:0.01", 0)
