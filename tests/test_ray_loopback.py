"""A simulation's Ray is on loopback only, and asks a token of whoever reaches it there.

Ray's control plane runs any code sent to it.  Left to itself Ray listens on every
interface (and without authentication), so anyone on the network could read the
departments' tables for the length of a run.  The test runs the real ``fedsilo
simulate``, reads every listening socket of its whole process tree from /proc
while it runs, and plays a local outsider who connects to Ray's GCS without the
run's token.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsilo.shared.flower_cli import FlowerError, stop_group, terminate
from fedsilo.simulations.local_federation import RAY_LOOPBACK_ENV, ray_environment
from fedsilo.simulations.ray_resources import user_ray_cluster
from procfs import is_loopback, listening_sockets, process_name, process_tree, proc_address, socket_inodes

RAY_SERVERS = {"gcs_server", "raylet"}


# ----------------------------------------------------------------------------- helpers' own checks


def test_proc_addresses_are_read_as_the_kernel_writes_them():
    assert proc_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert proc_address("00000000000000000000000000000000:0050") == ("::", 80)
    assert proc_address("0000000000000000FFFF00000100007F:0050") == ("::ffff:7f00:1", 80)
    assert proc_address("00000000000000000000000001000000:0016") == ("::1", 22)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:7f00:1")
    for exposed in ("0.0.0.0", "::", "192.0.2.2", "::ffff:c000:202", "fe80::1"):
        assert not is_loopback(exposed), exposed


def test_a_users_own_cluster_is_named_by_the_option_first_then_ray_address():
    assert user_ray_cluster({"RAY_ADDRESS": "10.0.0.5:6379"}) == "10.0.0.5:6379"
    assert user_ray_cluster({"RAY_ADDRESS": "auto"}) == "auto"
    assert user_ray_cluster({"RAY_ADDRESS": "10.0.0.5:6379"}, address="local") is None  # --ray-address local
    assert user_ray_cluster({}, address=" 10.0.0.6:6379 ") == "10.0.0.6:6379"
    for private in ({}, {"RAY_ADDRESS": ""}, {"RAY_ADDRESS": " local "}):
        assert user_ray_cluster(private) is None


def test_a_private_ray_gets_loopback_and_a_fresh_token_of_its_own(tmp_path):
    env = ray_environment(tmp_path / "token")
    assert {k: env[k] for k in RAY_LOOPBACK_ENV} == RAY_LOOPBACK_ENV
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == ""  # the file, not an inherited token
    token = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert token.is_absolute() and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text()) == 64
    first = token.read_text()
    ray_environment(tmp_path / "token")
    assert token.read_text() != first  # a new secret at every start


def test_a_localhost_that_is_not_127_0_0_1_is_refused(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, 0, 0, "", ("127.0.1.1", 0))])
    with pytest.raises(FlowerError, match=r"resolves to 127\.0\.1\.1.*every network interface"):
        ray_environment(tmp_path / "token")


# ----------------------------------------------------------------------------- the real run


def _outsider(port: int, home: Path) -> subprocess.Popen:
    """A local user's Ray driver, without the run's token, asking Ray to run its code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # aim at 127.0.0.1 itself
    code = (
        "import ray\n"
        f"ray.init(address='127.0.0.1:{port}')\n"
        "print('OUTSIDER RAN CODE', ray.get(ray.remote(num_cpus=0)(lambda: 1).remote()))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_every_listener_of_a_running_simulation_is_on_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0")
    # Rounds enough that Ray is still up when the outsider, started once Ray listens, asks it (a busy
    # machine takes tens of seconds to start a Python with Ray): asking a Ray that has gone proves nothing.
    command = [sys.executable, "-m", "fedsilo", "simulate", "--departments", "2", "--rounds", "8",
               "--dataset", "breast-cancer", "--out", str(tmp_path / "out")]
    log = tmp_path / "simulate.log"
    seen: dict[tuple[str, str, str, int], float] = {}  # (process, protocol, host, port) -> when
    members: dict[int, str] = {}  # every process of the tree ever seen, with its start time
    outsider, said = None, ""
    started = time.monotonic()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while proc.poll() is None and time.monotonic() - started < 600:  # bounds a hang; ~40 s on 2 idle cores
            sockets = listening_sockets()
            tree = process_tree(proc.pid)
            members.update(tree)
            for pid in tree:
                for inode in socket_inodes(pid) & sockets.keys():
                    seen.setdefault((process_name(pid), *sockets[inode]), round(time.monotonic() - started, 1))
            gcs = [port for (name, _, _, port) in seen if name == "gcs_server"]
            if outsider is None and gcs:
                outsider = _outsider(gcs[0], tmp_path)
            time.sleep(0.25)
        if outsider is not None:
            said = outsider.communicate(timeout=180)[0]
        proc.wait(timeout=5)
    finally:
        if outsider is not None and outsider.poll() is None:
            outsider.kill()
            outsider.wait()
        stop_group(proc.pid, grace=5)  # Flower starts some in sessions of their own: the tree ever seen too
        terminate([pid for pid, t in members.items() if process_tree(pid).get(pid) == t], grace=5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    report = "\n".join(f"{when:6.1f} s  {name:16} {proto:5} {host}:{port}"
                       for (name, proto, host, port), when in sorted(seen.items(), key=lambda kv: kv[1]))
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert {name for (name, *_rest) in seen} & RAY_SERVERS, f"no Ray listener was seen:\n{report}"
    exposed = [key for key in seen if not is_loopback(key[2])]
    assert not exposed, f"listening beyond loopback: {exposed}\n{report}"
    # Loopback is open to every local user: without the run's token, Ray refuses them.
    assert outsider is not None and "OUTSIDER RAN CODE" not in said, said[-2000:]
    assert "AuthenticationError" in said or "InvalidAuthToken" in said, said[-2000:]
