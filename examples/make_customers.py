"""Write examples/customers.csv: a synthetic customer table with every column type.

Deterministic (seed 7), so the committed file can be rebuilt bit for bit:
``python examples/make_customers.py``.  Columns: an identifier, two categorical
columns (``region`` — the business unit that holds the row — and ``plan``),
numeric columns with missing values, a free-text support note, a binary label
``churned`` and a numeric target ``annual_value`` for regression.  ``new_customers.csv`` holds
200 more rows without ``churned``, to predict for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

ROWS = 4000
REGIONS = ("north", "south", "east", "west")
PLANS = ("basic", "plus", "pro")
NOTES = {
    "unhappy": ("billing error again", "cancel my subscription", "slow service and outage", "refund requested twice",
                "competitor offered a better price", "nobody answered my complaint"),
    "happy": ("great service thanks", "upgrade went smoothly", "quick answer from support", "happy with the new plan",
              "no issues this month", "friendly technician"),
}


FILLER = ("called about the router", "asked about roaming", "moved to a new address", "changed payment card")
CHANNELS = ("phone", "chat", "email", "shop")


def customers(rows: int = ROWS, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    region = rng.choice(REGIONS, rows, p=[0.4, 0.25, 0.2, 0.15])
    plan = rng.choice(PLANS, rows, p=[0.5, 0.3, 0.2])
    tenure = rng.gamma(2.0, 12.0, rows).round()
    calls = rng.poisson(1.5, rows)
    spend = (20 + 15 * (plan == "plus") + 40 * (plan == "pro") + rng.normal(0, 5, rows)).round(2)
    risk = -1.0 + 0.6 * calls - 0.05 * tenure + 0.8 * (plan == "basic") + 0.5 * (region == "south")
    unhappy = rng.random(rows) < 1 / (1 + np.exp(-risk))
    first = np.where(unhappy, rng.choice(NOTES["unhappy"], rows), rng.choice(NOTES["happy"], rows))
    second = rng.choice(NOTES["unhappy"] + NOTES["happy"] + FILLER, rows)
    note = np.array([f"{a}, {b} ({channel})" for a, b, channel in zip(first, second, rng.choice(CHANNELS, rows))])
    churn_logit = -0.5 + 2.5 * unhappy + 0.4 * calls - 0.04 * tenure + 0.6 * (plan == "basic")
    churned = np.where(rng.random(rows) < 1 / (1 + np.exp(-churn_logit)), "yes", "no")
    value = (12 * spend * (1 + tenure / 60) * np.where(region == "north", 1.2, 1.0) + rng.normal(0, 60, rows)).round(2)
    frame = pd.DataFrame({
        "customer_id": [f"C{100000 + i}" for i in range(rows)],
        "region": region, "plan": plan, "tenure_months": tenure, "support_calls": calls,
        "monthly_spend": spend, "last_note": note, "churned": churned, "annual_value": value,
    })
    # Missing values, as real exports have them.
    frame.loc[rng.random(rows) < 0.06, "tenure_months"] = np.nan
    frame.loc[rng.random(rows) < 0.04, "monthly_spend"] = np.nan
    frame.loc[rng.random(rows) < 0.03, "plan"] = None
    frame.loc[rng.random(rows) < 0.05, "last_note"] = None
    return frame


if __name__ == "__main__":
    out = Path(__file__).with_name("customers.csv")
    customers().to_csv(out, index=False)
    # New customers to predict for: another draw, without the label.
    fresh = customers(200, seed=8).drop(columns=["churned"])
    fresh["customer_id"] = [f"N{200000 + i}" for i in range(len(fresh))]
    fresh.to_csv(out.with_name("new_customers.csv"), index=False)
    print(f"wrote {out} and {out.with_name('new_customers.csv')}")
