"""The scale benchmark's federation, sizes and targets (shared by its runs, its figure and its result)."""

from __future__ import annotations

# mnist5k: 4,000 training records after the fixed 20 % hold-out, so 1,000
# departments still get 4 records each (digits has ~1,440: too few).
DATASET = "mnist5k"
PARTITION = "iid"
SEED = 42
FULL_SIZES = (10, 100, 1000)
FULL_ROUNDS = 3
QUICK_SIZES = (5, 20)
QUICK_ROUNDS = 2
SMOKE_SIZES = (3,)  # the test suite's: one small simulation and its plain loop
SMOKE_ROUNDS = 2  # "rounds >= 2" is a column
TARGET_DEPARTMENTS = 1000
TARGET_SECONDS = 600.0
TARGET_GIB = 6.0
OVERHEAD_AT = 100
TARGET_OVERHEAD = 0.30
SIM_TIMEOUT_S = 3600.0
PLAIN_WORKERS = 2  # the simulation's Ray workers on 2 cores (1 CPU per department)
