"""An intruder with network reach to the coordinator's address and the federation's ca.crt.

Every department holds ca.crt, and TLS authenticates only the server, so this is
what any insider can have.  Against a real coordinator (nginx in front of a
loopback SuperLink) and one real department, each attack below once worked on
a bare Flower 1.41 SuperLink; each must now be refused, and each test also
shows the operator's legitimate path still works, so a test that cannot fail
would be noticed.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import subprocess
import time

import httpx
import pytest

from federation import FEDSILO, cli, federation, stop
from fedsilo.shared.flower_cli import CONNECTION, FlowerConnection, offline_env


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("intruder")
    with federation(root, ("finance",), extra_keys=("intruder",)) as running:
        yield running


def _intruder(fed) -> FlowerConnection:
    """The Flower CLI pointed at the coordinator's public address, trusting ca.crt."""
    return FlowerConnection(fed["root"] / "intruder-home", fed["address"], root_certificates=fed["certs"] / "ca.crt")


def _operator(fed) -> FlowerConnection:
    """The operator's Flower CLI on the coordinator host: Control on loopback."""
    return FlowerConnection(fed["root"] / "operator-home", fed.control_address(), root_certificates=fed["certs"] / "ca.crt")


def _refused(result) -> bool:
    """A Flower CLI call that did not succeed (non-zero exit, or a JSON error)."""
    if result.returncode != 0:
        return True
    try:
        return not json.loads(result.stdout).get("success", False)
    except ValueError:
        return True


def _post(address: str, path: str, ca, body: bytes = b"", method: str = "POST", headers=None) -> int:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=str(ca)), timeout=10)
    conn.request(method, path, body=body, headers={"Content-Type": "application/protobuf", **(headers or {})})
    status = conn.getresponse().status
    conn.close()
    return status


def test_intruder_cannot_run_its_own_app_on_the_coordinator(fed):
    marker = fed["root"] / "intruder-was-here"
    app = fed["root"] / "intruder-app"
    (app / "evil").mkdir(parents=True)
    (app / "evil" / "__init__.py").write_text("")
    (app / "evil" / "server.py").write_text(
        "from pathlib import Path\n"
        "from flwr.serverapp import ServerApp\n"
        "app = ServerApp()\n"
        "@app.main()\n"
        "def main(grid, context):\n"
        f"    Path({str(marker)!r}).write_text(Path({str(fed['certs'] / 'coordinator.key')!r}).read_text())\n"
    )
    (app / "evil" / "client.py").write_text("from flwr.clientapp import ClientApp\napp = ClientApp()\n")
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\nlicense = "Apache-2.0"\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
        '[tool.flwr.app]\npublisher = "intruder"\n'
        '[tool.flwr.app.components]\nserverapp = "evil.server:app"\nclientapp = "evil.client:app"\n'
        "[tool.flwr.app.config]\n"
    )
    intruder = _intruder(fed)
    result = intruder.flwr("run", str(app), CONNECTION, timeout=120)
    assert "Successfully started run" not in result.stdout, result.stdout
    assert result.returncode != 0 and "404" in result.stdout + result.stderr, result.stdout + result.stderr
    time.sleep(3)  # the coordinator's SuperExec polls every 0.2 s: a started run would have run by now
    assert not marker.exists()
    runs = json.loads(_operator(fed).flwr("ls", CONNECTION, "--format", "json").stdout)
    assert all("intruder" not in json.dumps(run) for run in runs.get("runs", [])), runs
    # The same app through the operators' loopback Control does run: the attack was real.
    operator = _operator(fed).flwr("run", str(app), CONNECTION, timeout=120)
    assert "Successfully started run" in operator.stdout, operator.stdout + operator.stderr
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "PRIVATE KEY" in marker.read_text()


def test_intruder_cannot_register_a_key(fed):
    before = cli("coordinator", "departments", "--certs", str(fed["certs"]), "--state", str(fed["state"])).stdout
    result = _intruder(fed).flwr("supernode", "register", str(fed["certs"] / "departments" / "intruder.pub"),
                                 CONNECTION, "--name", "intruder", "--format", "json")
    assert _refused(result), result.stdout
    after = cli("coordinator", "departments", "--certs", str(fed["certs"]), "--state", str(fed["state"])).stdout
    node_ids = lambda text: sorted(re.findall(r"\b\d{9,}\b", text))  # noqa: E731
    assert node_ids(after) == node_ids(before) and len(node_ids(after)) == 1


def test_intruder_cannot_list_stop_or_unregister(fed):
    intruder = _intruder(fed)
    operator = _operator(fed)
    listed = operator.flwr("supernode", "list", CONNECTION, "--format", "json")
    nodes = json.loads(listed.stdout)["nodes"]
    assert len(nodes) == 1, listed.stdout  # the operator's view works
    node_id = str(nodes[0]["node-id"])
    # A legitimate run in flight, for the intruder to try to stop.
    run = subprocess.Popen(
        [*FEDSILO, "coordinator", "run", "--certs", str(fed["certs"]), "--state", str(fed["state"]),
         "--address", fed["address"], "--test-data", str(fed["data"]["test"]), "--label-column", "digit",
         "--rounds", "30", "--min-departments", "1", "--noise-multiplier", "1.0", "--out", str(fed["root"] / "runs" / "long")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=offline_env(),
    )
    try:
        for line in run.stdout:
            if "round 1/30" in line:
                break
        runs = json.loads(operator.flwr("ls", CONNECTION, "--format", "json").stdout)["runs"]
        running = [r for r in runs if r["status"].startswith("running")]
        assert len(running) == 1, runs
        run_id = str(running[0]["run-id"])
        assert _refused(intruder.flwr("ls", CONNECTION, "--format", "json"))
        assert _refused(intruder.flwr("log", run_id, CONNECTION, timeout=30))
        assert _refused(intruder.flwr("stop", run_id, CONNECTION, "--format", "json"))
        assert _refused(intruder.flwr("supernode", "list", CONNECTION, "--format", "json"))
        assert _refused(intruder.flwr("supernode", "unregister", node_id, CONNECTION, "--format", "json"))
        after = json.loads(operator.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json").stdout)["runs"]
        assert after[0]["status"].startswith("running"), after
        # The operator can stop it (the same call, from the coordinator host).
        assert not _refused(operator.flwr("stop", run_id, CONNECTION, "--format", "json"))
        run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            stop(run)
    still = json.loads(operator.flwr("supernode", "list", CONNECTION, "--format", "json").stdout)["nodes"]
    assert [str(n["node-id"]) for n in still] == [node_id] and still[0]["status"] == "online"


def _acquire_client(address: str, *, secret: bytes | None, tls_ca=None):
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    from fedsilo.client.executor import transport_retry

    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
    return RuntimeHttpClient.from_server_address(
        address, insecure=tls_ca is None, root_certificates=str(tls_ca) if tls_ca else None,
        interceptors=interceptors, retry_invoker=transport_retry(max_time=5.0),
    )


def _acquire(client):
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

    return client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-serverapp", "flwr-clientapp"]))


def test_acquire_task_needs_the_secret_and_is_not_public(fed):
    ca = fed["certs"] / "ca.crt"
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

    body = AcquireTaskRequest(supported_task_types=["flwr-serverapp"]).SerializeToString()
    assert _post(fed["address"], "/v1/runtime/acquire-task", ca, body) == 404  # not served publicly
    # A local process on the coordinator host without the secret: refused by Flower's SuperExec auth.
    with pytest.raises(httpx.HTTPStatusError) as refused:
        _acquire(_acquire_client(fed.control_address(), secret=None, tls_ca=ca))
    assert "authentication failed" in refused.value.response.text.lower()
    # With the operators' secret (0600 in the state folder) the same call is answered.
    secret = fed["state"] / "superexec.secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    answered = _acquire(_acquire_client(fed.control_address(), secret=secret.read_bytes(), tls_ca=ca))
    assert not answered.token  # no run in flight, nothing taken


def test_department_runtime_api_needs_its_secret(fed):
    """Another local user on the department host cannot answer tasks in the department's name."""
    log = (fed["root"] / "finance.log").read_text()
    address = re.search(r"runtime API (127\.0\.0\.1:\d+)", log).group(1)
    with pytest.raises(httpx.HTTPStatusError) as refused:
        _acquire(_acquire_client(address, secret=None))
    assert "authentication failed" in refused.value.response.text.lower()
    secret = fed["root"] / "ledgers" / "finance" / ".flower" / "runtime.secret"
    assert not _acquire(_acquire_client(address, secret=secret.read_bytes())).token


@pytest.mark.parametrize("path", [
    "/docs", "/openapi.json", "/redoc", "/health", "/",
    "/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/pull-task-input",
    "/v1/fleet/register-node", "/v1/fleet/unregister-node",
    "/v1/fleet/../control/list-runs", "/v1/fleet/pull-messages/../../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs", "//v1/control/list-runs", "/v1/fleet/pull-messages/extra",
])
def test_only_fleet_routes_are_public(fed, path):
    ca = fed["certs"] / "ca.crt"
    assert _post(fed["address"], path, ca) in (400, 404)
    assert _post(fed["address"], path, ca, method="GET") in (400, 404)


def test_fleet_routes_accept_only_post_and_reach_the_superlink(fed):
    ca = fed["certs"] / "ca.crt"
    # Unauthenticated Fleet calls get through nginx and are judged by the SuperLink (401/415), never 404/502.
    assert _post(fed["address"], "/v1/fleet/pull-messages", ca) not in (404, 502, 200)
    assert _post(fed["address"], "/v1/fleet/pull-messages", ca, method="GET") == 403
    assert _post(fed["address"], "/v1/fleet/pull-messages", ca, method="PUT") == 403
    # The operator's loopback listener still serves the API map: it is the proxy that hides it.
    host, port = fed.control_address().rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=str(ca)), timeout=10)
    conn.request("GET", "/openapi.json")
    assert conn.getresponse().status == 200
    conn.close()
