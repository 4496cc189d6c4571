"""The message contract between coordinator and departments.

A department's train reply holds:

* ``arrays``     (ArrayRecord)  — the updated weights; absent when it refused;
* ``metrics``    (MetricRecord) — ``num-examples``, ``epsilon``
  (whole-history ε at the run's δ; ∞ without DP), ``max-epsilon`` (the
  department's own budget), ``steps``,
  ``noise-multiplier``, ``sample-rate`` — the same keys from every department;
* ``department`` (ConfigRecord) — ``name``, ``status`` (``trained``,
  ``refused`` on budget grounds, or ``incompatible`` when the department's
  executor would not accept the run's app) and ``reason``.

The app a coordinator submits carries no code: its ``pyproject.toml`` names
:data:`APP_ID`, the two installed components and :data:`PROTOCOL_VERSION`
under ``[tool.fedsilo]``.  A department answers only an app that matches what
its own installed fedsilo speaks (``fedsilo.client.app_check``).
"""

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
STATUS_KEY = "department"

STATUS_TRAINED = "trained"
STATUS_REFUSED = "refused"
STATUS_INCOMPATIBLE = "incompatible"

# What a fedsilo app (FAB) must say to be answered by a department.
APP_PUBLISHER = "fedsilo"
APP_NAME = "fedsilo-app"
APP_ID = f"{APP_PUBLISHER}/{APP_NAME}"
SERVERAPP = "fedsilo.server.app:app"
CLIENTAPP = "fedsilo.client.app:app"
# Bump when the message contract above changes in a way older departments cannot answer.
# 2: train replies no longer carry `train-loss` (an unnoised statistic of private batches).
PROTOCOL_VERSION = 2
