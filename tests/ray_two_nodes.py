"""A Ray cluster of two nodes on this machine, every listener on 127.0.0.1: ``python ray_two_nodes.py TEMP_DIR``.

Prints ``{"address": ..., "nodes": 2}`` once both nodes are up, then waits to be ended (by its
process group).  Ray's own utility for a multi-node cluster on one machine
(``ray.cluster_utils.Cluster``) starts the head and a second node, each its own raylet with
its own resources (one CPU each, so that two departments' actors need both nodes).  Not
``ray start --address`` for the second node: the CLI turns 127.0.0.1 into this host's network
address (``services.resolve_ip_for_localhost``), where the head, bound to loopback, cannot be
reached.  Ray's token authentication is on when ``RAY_AUTH_MODE=token`` is in the environment.

``RAY_TMPDIR`` must name a folder of the caller's: the utility writes the head's address where
a bare ``ray.init()`` looks for a running cluster, and a stale address in the machine's
``/tmp/ray`` would send every later ``ray.init()`` there (``flwr run`` hangs on it).
"""

from __future__ import annotations

import json
import os
import sys
import time

from ray.cluster_utils import Cluster

NODE = dict(node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0, object_store_memory=100 * 1024 * 1024)


def main(temp_dir: str) -> None:
    if not os.environ.get("RAY_TMPDIR"):
        sys.exit("set RAY_TMPDIR to a folder of your own: the cluster's address is written under it")
    os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray"), exist_ok=True)
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args=dict(NODE, resources={"fedsilo_head": 1}, include_dashboard=False, temp_dir=temp_dir))
    cluster.add_node(**NODE, resources={"fedsilo_second": 1})
    print(json.dumps({"address": cluster.address, "nodes": 1 + len(cluster.worker_nodes)}), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1])
