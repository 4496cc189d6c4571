"""``fedsilo simulate`` on a Ray cluster of the user's own, and what it reserves per department.

The cluster run is real: a head and a second node on this machine (``ray_two_nodes.py``), one
CPU each, every listener on 127.0.0.1, Ray's token authentication on; ``fedsilo simulate
--ray-address`` runs four departments there.  Where the departments ran is read from /proc:
Ray titles a worker ``ray::ClientAppActor.run`` while it handles a department's message, and
each worker is a child of its node's raylet.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsilo.shared.flower_cli import FlowerError, stop_group, terminate
from fedsilo.simulations.ray_resources import SimulationResources, parse_ray_address
from procfs import is_loopback, listening_sockets, process_name, process_tree, socket_inodes

HERE = Path(__file__).parent
ACTOR_AT_WORK = "ray::ClientAppActor.run"


# ----------------------------------------------------------------------------- what is reserved, where


def test_a_private_ray_is_told_this_machines_cores_a_cluster_is_not():
    private = SimulationResources(cpus_per_department=2, gpus_per_department=0.25)
    assert private.federation_config(100) == (
        f"num-supernodes=100 client-resources-num-cpus=2 client-resources-num-gpus=0.25 "
        f"init-args-num-cpus={os.cpu_count() or 1}")
    assert private.environment() == {} and not private.on_cluster
    # ray.init refuses num_cpus/num_gpus when it joins a running cluster: its nodes declared theirs.
    cluster = SimulationResources(1, 1.0, "10.0.0.5:6379")
    assert cluster.federation_config(3) == "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=1"
    assert cluster.environment() == {"RAY_ADDRESS": "10.0.0.5:6379"} and cluster.on_cluster


@pytest.mark.parametrize("kwargs, message", [
    (dict(cpus_per_department=0), "whole number of cores"),
    (dict(cpus_per_department=1.5), "whole number of cores"),
    (dict(gpus_per_department=-0.5), "finite number"),
    (dict(gpus_per_department=float("nan")), "finite number"),
    (dict(gpus_per_department=1.5), "whole GPUs"),
    (dict(ray_address="local"), "private Ray"),
    (dict(ray_address=" "), "private Ray"),
])
def test_impossible_reservations_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulationResources(**kwargs)
    with pytest.raises(ValueError, match="at least one department"):
        SimulationResources().federation_config(0)


def test_ray_addresses_are_parsed_as_ray_reads_them():
    assert parse_ray_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert parse_ray_address(" head.example:6380 ") == ("head.example", 6380)
    assert parse_ray_address("ray://head:10002") == ("head", 10002)
    assert parse_ray_address("ray://head") == ("head", 10001)  # Ray Client's default port
    assert parse_ray_address("[::1]:6379") == ("::1", 6379)
    for bad, why in (("head", "names no port"), (":6379", "names no host"), ("head:http", "is not a port"),
                     ("head:70000", "is not a port")):
        with pytest.raises(FlowerError, match=why):
            parse_ray_address(bad)


def test_a_cluster_that_does_not_answer_is_named_before_anything_starts():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(FlowerError, match=rf"no Ray cluster answers at --ray-address 127\.0\.0\.1:{port}.*ray start --head"):
            SimulationResources(ray_address=f"127.0.0.1:{port}").check_reachable(timeout=2)
    SimulationResources(ray_address="auto").check_reachable()  # Ray's to find


def test_gpus_the_machine_lacks_or_the_device_would_not_use_are_refused(tmp_path):
    import torch

    from fedsilo.cli import app

    runner = CliRunner()
    base = ["simulate", "--dataset", "breast-cancer", "--departments", "2", "--rounds", "1", "--out", str(tmp_path / "o")]
    idle = runner.invoke(app, [*base, "--gpus-per-department", "0.5", "--device", "cpu"])
    assert idle.exit_code == 2 and "--device cpu would leave idle" in idle.output, idle.output
    if torch.cuda.device_count() == 0:
        none = runner.invoke(app, [*base, "--gpus-per-department", "1"])
        assert none.exit_code == 2 and "this machine has no GPU" in none.output and "--ray-address" in none.output, none.output
    assert not (tmp_path / "o").exists()  # refused before a run folder was made


# ----------------------------------------------------------------------------- the cluster run


def _start_cluster(temp_dir: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(HERE / "ray_two_nodes.py"), temp_dir], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                said = json.loads(line)
                assert said["nodes"] == 2, said
                return proc, said["address"]
        time.sleep(0.25)
    raise AssertionError(f"the two-node cluster did not start:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_departments_run_on_both_nodes_of_a_users_ray_cluster(tmp_path):
    # Short: Ray's socket paths under it must fit AF_UNIX's 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    token = tmp_path / "ray-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The cluster's operators turned its authentication on; the simulation holds their token.
    # Clusters disabled for the *driver* keeps its own address 127.0.0.1 (else Ray swaps loopback
    # for this host's network address); the nodes are started by Ray's cluster utility, not the CLI.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0")
    cluster, simulation, members = None, None, {}
    at_work: dict[int, int] = {}  # a worker seen handling a department's message -> its raylet
    raylets: set[int] = set()
    seen: set[tuple[str, str, str, int]] = set()
    log = tmp_path / "simulate.log"
    # Ray's cluster utility writes the head's address where a bare ray.init() looks for a running
    # cluster (TMPDIR/ray/ray_current_cluster): under our own folder, never the machine's /tmp/ray.
    shared_address = Path("/tmp/ray/ray_current_cluster")
    before = shared_address.read_bytes() if shared_address.exists() else None
    try:
        cluster, address = _start_cluster(temp_dir, {**env, "RAY_TMPDIR": temp_dir}, tmp_path / "cluster.log")
        command = [sys.executable, "-m", "fedsilo", "simulate", "--ray-address", address, "--departments", "4",
                   "--rounds", "1", "--dataset", "breast-cancer", "--out", str(tmp_path / "out")]
        with open(log, "w") as out:
            simulation = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        while simulation.poll() is None and time.monotonic() - started < 400:  # ~35 s on 2 idle cores
            sockets = listening_sockets()
            for root in (cluster.pid, simulation.pid):
                tree = process_tree(root)
                members.update(tree)
                for pid in tree:
                    name = process_name(pid)
                    if name == "raylet":
                        raylets.add(pid)
                    for inode in socket_inodes(pid) & sockets.keys():
                        seen.add((name, *sockets[inode]))
                    try:
                        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    except (OSError, ValueError, IndexError):
                        continue
                    if title.startswith(ACTOR_AT_WORK):
                        at_work[pid] = parent
            time.sleep(0.2)
        simulation.wait(timeout=5)
    finally:
        for proc in (simulation, cluster):
            if proc is not None:
                stop_group(proc.pid, grace=5)
        terminate([pid for pid, t in members.items() if process_tree(pid).get(pid) == t], grace=5)
        for proc in (simulation, cluster):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)

    output = log.read_text()
    assert (shared_address.read_bytes() if shared_address.exists() else None) == before  # no stale address left
    assert simulation.returncode == 0, output[-3000:]
    assert f"Ray cluster {address}" in output and "departments' tables go to that cluster" in output
    summary = json.loads(next((tmp_path / "out").glob("run-*/summary.json")).read_text())
    assert summary["status"] == "completed" and len(summary["rounds"][-1]["trained"]) == 4, summary["rounds"]
    assert len(raylets) == 2, f"raylets seen: {raylets}"
    assert set(at_work.values()) == raylets, f"workers at a department's message, by raylet: {at_work}; raylets {raylets}"
    exposed = sorted(key for key in seen if not is_loopback(key[2]))
    assert {name for name, *_ in seen} >= {"gcs_server", "raylet"} and not exposed, f"beyond loopback: {exposed}"
    # Each department's ledger is on the (here trivially) shared file system: one entry, its one round.
    ledgers = sorted((tmp_path / "out" / "ledgers").glob("dept-*.jsonl"))
    assert len(ledgers) == 4 and all(len(p.read_text().splitlines()) == 1 for p in ledgers), ledgers
