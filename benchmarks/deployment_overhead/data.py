"""The federation both runs share: scikit-learn's digits as CSV tables, a third for each department."""

from __future__ import annotations

from pathlib import Path

DEPARTMENTS = ("finance", "hr", "sales")
LABEL = "digit"
TEST_ROWS = 360  # the simulation's 20 % hold-out of digits' 1,797 rows



def write_data(root: Path) -> dict[str, Path]:
    """digits as CSV: the coordinator's test table, one table per department, and all rows (for the simulation)."""
    import pandas as pd
    from sklearn.datasets import load_digits

    bunch = load_digits()
    frame = pd.DataFrame(bunch.data, columns=[f"px{i}" for i in range(64)])
    frame[LABEL] = bunch.target
    frame = frame.sample(frac=1, random_state=0).reset_index(drop=True)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"all": root / "digits.csv", "test": root / "test.csv"}
    frame.to_csv(paths["all"], index=False)
    frame.iloc[:TEST_ROWS].to_csv(paths["test"], index=False)
    rest = frame.iloc[TEST_ROWS:]
    third = len(rest) // len(DEPARTMENTS)
    for i, name in enumerate(DEPARTMENTS):
        paths[name] = root / f"{name}.csv"
        rest.iloc[i * third:(i + 1) * third].to_csv(paths[name], index=False)
    return paths
