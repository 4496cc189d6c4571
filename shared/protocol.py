"""The message contract between coordinator and departments.

A department's train reply holds:

* ``arrays``     (ArrayRecord)  — the updated weights; absent when it refused;
* ``metrics``    (MetricRecord) — ``num-examples``, ``train-loss``, ``epsilon``
  (whole-history ε at the run's δ; ∞ without DP), ``max-epsilon`` (the
  department's own budget), ``steps``,
  ``noise-multiplier``, ``sample-rate`` — the same keys from every department;
* ``department`` (ConfigRecord) — ``name``, ``status`` (``trained`` or
  ``refused``) and ``reason``.
"""

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
STATUS_KEY = "department"

STATUS_TRAINED = "trained"
STATUS_REFUSED = "refused"
