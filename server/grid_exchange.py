"""Push messages to the departments and pull their replies within a deadline (the ServerApp's rounds and queries)."""

from __future__ import annotations

import time

from flwr.serverapp import Grid


def exchange(grid: Grid, messages: list, timeout: float, first: float = 0.05, most: float = 0.5) -> list:
    """Push ``messages`` and pull their replies until all are in or ``timeout`` passes.

    Flower's ``send_and_receive`` sleeps 3 s between pulls; this polls after
    ``first`` seconds, backing off to ``most``, so a reply is seen within half
    a second of its arrival, and the round deadline is still honoured.
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list = []
    wait = first
    while pending and time.monotonic() < deadline:
        time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        wait = first if arrived else min(most, wait * 2)
    return replies
