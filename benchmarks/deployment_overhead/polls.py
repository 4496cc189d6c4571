"""The fixed intervals on a deployed round's path, cited by file and code (the tests check them in the installed code).

Each entry is ``(file, code, seconds, key)``; what the interval does is the template's
``poll_effect`` block for ``key``.
"""

from __future__ import annotations

IDLE_POLL_S = 3.0  # FLOWER_POLLS[0]
REPLY_POLL_S = 0.5  # FLOWER_POLLS[1]

# Flower 1.41's polling, read from its source (paths inside site-packages/flwr).
FLOWER_POLLS = [
    ("supernode/start_client_internal.py", "time.sleep(3)", IDLE_POLL_S, "supernode_idle"),
    ("supernode/start_client_internal.py", "time.sleep(0.5)", REPLY_POLL_S, "supernode_reply"),
    ("supercore/superexec/run_superexec.py", "_DEFAULT_TASK_POLL_INTERVAL_SECONDS = 1.0", 1.0, "superexec_default"),
    ("common/constant.py", "HEARTBEAT_DEFAULT_INTERVAL = 30", 30.0, "heartbeat"),
    ("superlink/grid/inmemory_grid.py", "pull_interval: float = 0.1", 0.1, "inmemory_grid"),
    ("server/superlink/fleet/vce/vce_api.py", "f_stop.wait(0.1)", 0.1, "simulation_engine"),
]

# fedsilo's own intervals on a deployed round's path (paths inside the fedsilo package).
FEDSILO_POLLS = [
    ("client/executor.py", "poll_interval: float = 0.1", 0.1, "executor"),
    ("server/grid_exchange.py", "first: float = 0.05, most: float = 0.5", 0.5, "serverapp_pull"),
    ("server/coordinator.py", '"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"', 0.2, "superexec_fedsilo"),
]
