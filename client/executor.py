"""The department's own executor: answers the SuperNode's ClientApp tasks with installed code.

``flower-supernode --isolation process`` launches nothing itself: it keeps each
message the coordinator sends as a task on its local Runtime API (loopback,
protected by a SuperExec shared secret).  This executor — a long-lived process
owned by the department, started by ``fedsilo department start`` — takes each
task with that secret, checks the run's app (:mod:`fedsilo.client.app_check`)
without installing or importing it, and answers with the fedsilo ClientApp
imported from **this host's** environment.  The department's data path, ledger
and identity key are given to that ClientApp here, in this process; the
SuperNode and the coordinator never see them.

Being long-lived also means no fresh interpreter per message (Flower's default
``flwr-clientapp`` process re-imports torch and fedsilo every time).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedsilo.shared.flower_internals import (
    AcquireTaskRequest,
    HeartbeatSender,
    ObjectPullError,
    RetryInvoker,
    SubStatus,
    TaskType,
    exponential,
    make_task_heartbeat_fn_http,
    pull_task_input,
    push_message,
    push_task_output,
    runtime_client,
    superexec_client,
)
from fedsilo.shared.protocol import STATUS_INCOMPATIBLE, STATUS_KEY

from .app_check import AppVerdict, check_app
from .containment import FAILURE_REASON, failure_reply
from .limits import INPUT_WAIT

log = logging.getLogger("fedsilo.department")



@dataclass
class DepartmentExecutor:
    """Take ClientApp tasks from a local SuperNode and answer them with installed fedsilo.

    Parameters
    ----------
    name : str
        The department's name, put on refusals.
    runtime_address : str
        ``127.0.0.1:PORT`` of the SuperNode's Runtime API.
    secret : bytes
        The SuperExec shared secret the SuperNode was started with.
    local_config : dict
        The department's own settings (data path, ledger, identity key, budget),
        merged into the node config the installed ClientApp sees.
    poll_interval : float
        Seconds between ``acquire-task`` calls while idle.
    """

    name: str
    runtime_address: str
    secret: bytes
    local_config: dict[str, Any]
    poll_interval: float = 0.1
    input_wait: float = INPUT_WAIT
    load_app: Callable[[dict[str, Any]], Any] | None = None  # default: the installed ClientApp for local_config
    verdicts: dict[str, AppVerdict] = field(default_factory=dict)  # FAB hash -> verdict
    handled: int = 0

    def __post_init__(self) -> None:
        if not self.secret:
            raise ValueError("the executor needs the SuperNode's SuperExec secret; it must not be empty")
        if not self.poll_interval > 0:
            raise ValueError(f"poll_interval must be positive, got {self.poll_interval}")
        self._app = None
        # Retry briefly, then serve() checks whether the SuperNode is still there.
        retry = transport_retry(max_time=5.0)
        self._acquirer = superexec_client(self.runtime_address, self.secret, retry)

    @property
    def app(self):
        """The installed fedsilo ClientApp for this department, built once (here, never from a FAB)."""
        if self._app is None:
            self._app = (self.load_app or _installed_clientapp)(self.local_config)
        return self._app

    def serve(self, stop: threading.Event, alive: Callable[[], bool] = lambda: True) -> None:
        """Answer tasks until ``stop`` is set or ``alive()`` turns false."""
        while not stop.is_set() and alive():
            try:
                handled = self.run_once()
            except httpx.HTTPError as err:
                if not alive():
                    return
                log.warning("the SuperNode's Runtime API did not answer (%s); retrying", type(err).__name__)
                handled = False
            if not handled:
                stop.wait(self.poll_interval)

    def run_once(self) -> bool:
        """Take and answer one task, if there is one; True if one was handled."""
        response = self._acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not (response.HasField("task") and response.token):
            return False
        self.answer(response.token)
        self.handled += 1
        return True

    def answer(self, token: str) -> None:
        """Pull one task's input, reply to it, push its output; always replies (the SuperNode waits)."""
        client = runtime_client(self.runtime_address, token, transport_retry(max_time=30.0))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context: Context | None = None
        sub_status, details = SubStatus.FAILED, "task failed before its input arrived"
        try:
            message, context, run, fab = pull_task_input(client, self.input_wait)
            verdict = self.verdicts.get(fab.hash_str)
            if verdict is None:
                verdict = self.verdicts[fab.hash_str] = check_app(run.fab_id, fab.content)
            if not verdict.accepted:
                log.warning("run %s refused: %s", run.run_id, verdict.reason)
                reply = incompatible_reply(message, self.name, verdict.reason)
            else:
                reply = self._call_installed_app(message, context)
            push_message(client, reply, context)
            sub_status, details = SubStatus.COMPLETED, ""
        except ObjectPullError as err:
            log.warning("a task's message did not arrive complete within %g s (%s): its run most likely ended "
                        "while the coordinator was unreachable; gave it up, answering the next task", self.input_wait, err)
            details = FAILURE_REASON.format(kind="ObjectPullError")
        except Exception as err:  # noqa: BLE001 - the task must end with a status either way
            log.exception("task failed")
            details = FAILURE_REASON.format(kind=type(err).__name__)
        finally:
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    def _call_installed_app(self, message: Message, context: Context) -> Message:
        # The installed ClientApp sees the department's own settings; the context
        # that goes back to the SuperNode keeps only what it had, plus the app's state.
        local = Context(
            run_id=context.run_id, node_id=context.node_id,
            node_config={**context.node_config, **self.local_config},
            state=context.state, run_config=context.run_config,
            series_id=getattr(context, "series_id", 0),
        )
        try:
            return self.app(message=message, context=local)
        except Exception as err:  # noqa: BLE001 - report a code and the kind, keep the text local
            log.exception("the ClientApp raised on message %s", message.metadata.message_id)
            return failure_reply(message, err)

    def close(self) -> None:
        self._acquirer.close()


def transport_retry(max_time: float) -> RetryInvoker:
    """Retry only connection errors, for at most ``max_time`` seconds.

    Flower's own HTTP retry invoker answers a 401 by sending SIGINT to its own
    process: right for a one-shot ``flwr-clientapp``, wrong for the long-lived
    executor, which reports the error and goes on.
    """
    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=2.0),
        recoverable_exceptions=(httpx.TransportError,),
        max_tries=None,
        max_time=max_time,
    )


def incompatible_reply(message: Message, department: str, reason: str) -> Message:
    """A reply without weights or metrics: this department will not answer this app."""
    status = ConfigRecord({"name": department, "status": STATUS_INCOMPATIBLE, "reason": reason})
    return Message(RecordDict({STATUS_KEY: status}), reply_to=message)


def _installed_clientapp(local_config: dict[str, Any]):
    """This host's installed fedsilo ClientApp (never the FAB's), its guard built for this department."""
    from fedsilo.client.app import department_app
    from fedsilo.client.department import DepartmentHost

    return department_app(DepartmentHost.from_config(local_config))

