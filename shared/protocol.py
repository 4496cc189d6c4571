"""The message contract between coordinator and departments.

A department's train reply holds:

* ``arrays``     (ArrayRecord)  — the updated weights; absent when it refused;
* ``metrics``    (MetricRecord) — ``num-examples`` (the size the department
  reports: a size it declared public or its count rounded down to two binary digits, never the exact
  count), ``epsilon`` (whole-history ε at ``delta``; ∞ without DP),
  ``max-epsilon`` (the budget it grants this run), ``delta`` (its own δ),
  ``steps``, ``noise-multiplier``, ``sample-rate`` — the same keys from every
  department;
* ``department`` (ConfigRecord) — ``name``, ``status`` (``trained``,
  ``refused`` on budget grounds, ``declined`` when the run asks for something
  looser than the department's policy, ``rolled-back`` when its ledger no
  longer holds the head the coordinator acknowledged, or ``incompatible`` when
  the department's executor would not accept the run's app) and ``reason``;
* ``ledger-head`` (ConfigRecord) — the department's signed ledger head
  (``shared/record.py``), except on ``incompatible`` replies.

The train task's ``config`` is a :class:`fedsilo.shared.train_request.TrainRequest`
(built and read there, every field checked): ``acknowledged-seq`` and
``acknowledged-head``: the head the coordinator last recorded for the
department's identity, ``run-key``: the run's name, the same across the
coordinator's resumes, which names the run in the department's ledger,
Flower's ``server-round``, and ``request-version``.  A train
reply's metrics say ``replayed-seq``: 0 for an update trained now, else the
ledger entry (counted from 1) that charged the update it sends again.

The app a coordinator submits carries no code: its ``pyproject.toml`` names
:data:`APP_ID`, the two installed components and :data:`PROTOCOL_VERSION`
under ``[tool.fedsilo]``.  A department answers only an app that matches what
its own installed fedsilo speaks (``fedsilo.client.app_check``).
"""

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
# In a train message's config: the coordinator's run name, its id in the ledgers across resumes.
RUN_KEY = "run-key"
STATUS_KEY = "department"

STATUS_TRAINED = "trained"
STATUS_REFUSED = "refused"
STATUS_INCOMPATIBLE = "incompatible"
STATUS_DECLINED = "declined"
STATUS_ROLLED_BACK = "rolled-back"
# A secure-aggregation query answered (a refusal is STATUS_DECLINED).
STATUS_OK = "ok"
# A department's reason is shown, not parsed: a longer one is shortened, not rejected.
MAX_REASON_LENGTH = 2000

# What a fedsilo app (FAB) must say to be answered by a department.
APP_PUBLISHER = "fedsilo"
APP_NAME = "fedsilo-app"
APP_ID = f"{APP_PUBLISHER}/{APP_NAME}"
SERVERAPP = "fedsilo.server.app:app"
CLIENTAPP = "fedsilo.client.app:app"
# Bump when the message contract above changes in a way older departments cannot answer.
# 2: train replies no longer carry `train-loss` (an unnoised statistic of private batches).
# 3: the department's policy decides (declined), signed ledger heads, acknowledged heads in
#    the task, reported sizes instead of exact counts.
# 4: the data schema is a shared.schema.DataSchema (column kinds, encodings, task); models may be
#    factories a department must allow; replies unchanged.
# 5: the task's config names the run (`run-key`, the same across a coordinator's resumes); a
#    train reply says `replayed-seq` (an update released before, sent again with no new charge).
PROTOCOL_VERSION = 5
