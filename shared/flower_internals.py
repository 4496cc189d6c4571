"""Every use of Flower's internals, in one place, checked against the Flower it was written for.

fedsilo extends Flower through its public API (``flwr.app``, ``flwr.clientapp``,
``flwr.serverapp``, the ``flwr`` CLIs) wherever one exists.  The department's
own executor (:mod:`fedsilo.client.executor`) cannot: it answers a SuperNode's
Runtime API the way Flower's ``flwr-clientapp`` does, with Flower's protobuf
messages, interceptors, heartbeat and object pulling — none of which is a
public interface.  So all of that is imported here, and only here, and the
Flower version is checked first: internals change between minor versions, and
a mismatch must fail with a clear message, not with an obscure error during a
round.  ``tests/test_flower_internals.py`` checks that no other module imports
Flower outside its public API.
"""

from __future__ import annotations

import contextlib
import sqlite3
from contextlib import closing
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

# The Flower minor versions these internals were written and tested against
# (pyproject pins the same: flwr[simulation]==1.41.*).
SUPPORTED_FLOWER = ("1.41",)
# What fedsilo imports from Flower without going through this module.
PUBLIC_FLOWER_MODULES = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.common", "flwr_datasets")


class UnsupportedFlower(RuntimeError):
    """The installed Flower is not one whose internals this fedsilo was written for."""


def flower_version() -> str:
    try:
        return version("flwr")
    except PackageNotFoundError:
        return "not installed"


def check_flower(installed: str | None = None) -> str:
    """The installed Flower's version, if supported; else :class:`UnsupportedFlower` saying what to install."""
    installed = flower_version() if installed is None else installed
    minor = ".".join(installed.split(".")[:2])
    if minor not in SUPPORTED_FLOWER:
        wanted = " or ".join(f"{v}.*" for v in SUPPORTED_FLOWER)
        raise UnsupportedFlower(
            f"this fedsilo runs with Flower {wanted}, and this environment has flwr {installed}: "
            f"install `flwr[simulation]=={SUPPORTED_FLOWER[-1]}.*` (pinned in fedsilo's pyproject and constraints.txt)"
        )
    return installed


check_flower()

# pylint: disable=E0611,C0413
from flwr.common.constant import ErrorCode, SubStatus  # noqa: E402
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto  # noqa: E402
from flwr.proto.node_pb2 import Node  # noqa: E402
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullAppMessagesRequest, PullTaskInputRequest  # noqa: E402
from flwr.supercore.constant import TaskType  # noqa: E402
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http  # noqa: E402
from flwr.supercore.inflatable.inflatable_protobuf_utils import (  # noqa: E402
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_and_inflate_object_from_tree  # noqa: E402
from flwr.supercore.interceptors import (  # noqa: E402
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential  # noqa: E402
from flwr.supercore.runtime import RuntimeHttpClient  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output  # noqa: E402

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"

__all__ = [
    "ACQUIRE_METHOD", "AcquireTaskRequest", "ErrorCode", "HeartbeatSender", "ObjectPullError", "RetryInvoker",
    "RuntimeHttpClient", "SubStatus", "TaskType", "UnsupportedFlower", "check_flower", "clientapp_runtime",
    "exponential", "flower_version", "lend_task_identity", "make_task_heartbeat_fn_http", "pull_task_input",
    "push_message", "push_task_output", "runtime_client", "superexec_client",
]


def superexec_client(address: str, secret: bytes, retry: RetryInvoker) -> RuntimeHttpClient:
    """A client of a SuperNode's Runtime API that may acquire tasks (authenticated by the SuperExec secret)."""
    return RuntimeHttpClient.from_server_address(
        address, insecure=True, root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=frozenset({ACQUIRE_METHOD})),
        ],
        retry_invoker=retry,
    )


def runtime_client(address: str, token: str, retry: RetryInvoker) -> RuntimeHttpClient:
    """A client of a SuperNode's Runtime API for one acquired task, as ``flwr-clientapp`` is."""
    return RuntimeHttpClient.from_server_address(
        address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry,
    )


def pull_task_input(client: RuntimeHttpClient, max_time: float):
    """Flower's ``pull_task_input``, waiting at most ``max_time`` seconds for the message's objects.

    Returns ``(message, context, run, fab)``.  Raises ``ObjectPullError`` after
    ``max_time``: the task then ends as failed and the next one is answered.
    """
    from flwr.app import Message

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        max_time=max_time,
    )
    # A deflated message lacks its own id; Flower's run_clientapp sets it the same way.
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


@contextlib.contextmanager
def lend_task_identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; outside a ServerApp there is none: lend one."""
    saved = {attr: getattr(TaskIdentity, attr) for attr in ("_run_id", "_task_id", "_node_id")}
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        if saved[attr] is None:
            setattr(TaskIdentity, attr, value)
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(TaskIdentity, attr, value)


def clientapp_runtime(database: Path, run_id: str) -> float | None:
    """Flower's total ClientApp runtime for ``run_id`` (the SuperLink's ``run.clientapp_runtime``), or None.

    Read only, from the SuperLink's own SQLite state: there is no public API for it.
    """
    database = Path(database)
    if not database.exists():
        return None
    try:
        value = int(run_id)
        stored = value - 2**64 if value >= 2**63 else value  # Flower stores uint64 ids as sint64
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            row: Any = db.execute("SELECT clientapp_runtime FROM run WHERE run_id = ?", (stored,)).fetchone()
    except (sqlite3.Error, ValueError):
        return None
    return float(row[0]) if row and row[0] is not None else None
