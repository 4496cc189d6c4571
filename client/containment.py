"""Nothing about the department's records leaves in an error: a code and a fixed text.

An exception raised while training can carry data values (a label, a cell, a
row number).  Flower's simulation and its ``flwr-clientapp`` put ``str(ex)`` in
the error reply; :func:`contain_errors_mod` — the outermost mod of the
department's ClientApp — replaces that with the exception's type and a fixed
message, and writes the full traceback to the department's own log only.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedsilo.shared.flower_internals import ErrorCode

log = logging.getLogger("fedsilo.department")

# The only error text that leaves the department: what failed, never with what data.
FAILURE_REASON = "the department's ClientApp failed ({kind}); its operators have the details in the department's log"


def failure_reply(message: Message, err: BaseException) -> Message:
    """An error reply naming only the kind of failure."""
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=FAILURE_REASON.format(kind=type(err).__name__)),
        reply_to=message,
    )


def contain_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: any exception becomes :func:`failure_reply`; the text stays in the local log."""
    try:
        return call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - the reply must not carry the exception's text
        log.exception("the ClientApp raised on message %s (run %s)", msg.metadata.message_id, msg.metadata.run_id)
        return failure_reply(msg, err)
