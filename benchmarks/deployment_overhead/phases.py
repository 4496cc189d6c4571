"""Where a deployed round's time goes: each round split at the events its departments logged."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from .polls import IDLE_POLL_S, REPLY_POLL_S

# Consecutive intervals between a department's logged events; with the collect
# phase after the last reply they tile a round.
PATH = ("wait", "download", "clientapp", "reply_wait", "upload")
PHASES = (*PATH, "collect")


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "count": len(values)}


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def phases(record: dict[str, Any]) -> dict[str, Any]:
    """Split each deployed round at the logged events of its departments.

    Round K runs from the summary.json write that ended round K-1 (the initial
    evaluation for K = 1) to its own write; where the earlier write was not
    seen, from its own write minus the ServerApp's ``seconds``.  For each
    department, with R/R'/S/S' its SuperNode's Receiving / Received successfully
    / Sending / Sent successfully stamps and L its ledger entry:

    ``wait`` start→R, ``download`` R→R', ``clientapp`` R'→L, ``reply_wait`` L→S,
    ``upload`` S→S'.  The department whose S' is last is the round's critical
    path; ``collect`` is its S' → the round's end.  The phases of the critical
    path add up to the round's span; ``between_rounds`` is that span minus the
    ServerApp's clock (its log line and summary write between two rounds).
    """
    ends = {int(k): float(t) for k, t, *_ in record.get("round_ends", [])}
    seconds = record["seconds"]
    events = record.get("departments", {})
    ledgers = {n: {int(r): float(t) for r, t in v} for n, v in record.get("ledger_times", {}).items()}
    per_round, incomplete = [], []
    for k in range(1, len(seconds) + 1):
        if k not in ends:
            incomplete.append(k)
            continue
        end = ends[k]
        start, start_from = (ends[k - 1], "previous summary write") if k - 1 in ends else (end - seconds[k - 1], "clock")
        rows = []
        for name in sorted(events):
            ev, i = events[name], k - 1
            if min(len(ev[key]) for key in ("receiving", "received", "sending", "sent")) <= i:
                continue
            led = ledgers.get(name, {}).get(k)
            if led is None:
                continue
            recv, ok, send, sent = ev["receiving"][i], ev["received"][i], ev["sending"][i], ev["sent"][i]
            eps_line = next((t for r, t in ev.get("epsilon_lines", []) if int(r) == k), None)
            rows.append({
                "department": name,
                "receiving": recv, "received": ok, "ledger": led, "sending": send, "sent": sent,
                "wait": recv - start,
                "download": ok - recv,
                "clientapp": led - ok,
                "reply_wait": send - led,
                "upload": sent - send,
                "done": sent - start,
                "received_to_sending": send - ok,
                # The SuperNode pulls once right after a reply, then every 3 s.
                "since_previous_reply": recv - ev["sent"][i - 1] if i >= 1 else None,
                "log_lag": eps_line - led if eps_line is not None else None,
            })
        if len(rows) < len(events) or not events:
            incomplete.append(k)
        if not rows:
            continue
        critical = max(rows, key=lambda r: r["sent"])
        span = end - start
        per_round.append({
            "round": k, "start": start, "end": end, "start_from": start_from,
            "seconds_summary": seconds[k - 1], "span": span, "between_rounds": span - seconds[k - 1],
            "critical": critical["department"], "departments": rows,
            **{p: critical[p] for p in PATH}, "collect": end - critical["sent"],
        })
    steady = [r for r in per_round if r["round"] >= 2]
    rows_all = [d for r in per_round for d in r["departments"]]
    keys = (*PHASES, "span", "seconds_summary", "between_rounds")
    since = [d["since_previous_reply"] for d in rows_all if d["since_previous_reply"] is not None]
    sleeps = [round(g / IDLE_POLL_S) for g in since]
    gaps = [d["received_to_sending"] for d in rows_all]
    checks = [round(g / REPLY_POLL_S) for g in gaps]
    sent_replies = sum(len(ev["sent"]) for ev in events.values())
    runtime = record.get("clientapp_runtime_s")
    new_processes = [p for p in record.get("processes", []) if not p.get("at_start")]
    return {
        "rounds": per_round,
        "incomplete": incomplete,
        "complete": bool(per_round) and not incomplete,
        "complete_rounds": sum(1 for r in per_round if r["round"] not in incomplete),
        "first": {key: per_round[0][key] for key in keys} if per_round and per_round[0]["round"] == 1 else None,
        "steady": {key: _mean_of(steady, key) for key in keys} if steady else None,
        "mean": {key: _mean_of(per_round, key) for key in keys} if per_round else None,
        "departments": {key: _stats([d[key] for d in rows_all]) for key in (*PATH, "done")},
        "evidence": {
            "since_previous_reply": _stats(since),
            "idle_sleeps": dict(sorted(Counter(sleeps).items())),
            "since_previous_reply_minus_sleeps": _stats([g - IDLE_POLL_S * n for g, n in zip(since, sleeps)]),
            "received_to_sending": _stats([d["received_to_sending"] for d in rows_all]),
            "reply_checks": dict(sorted(Counter(checks).items())),
            "received_to_sending_minus_checks": _stats([g - REPLY_POLL_S * n for g, n in zip(gaps, checks)]),
            "log_lag": _stats([d["log_lag"] for d in rows_all if d["log_lag"] is not None]),
            "clientapp_runtime_per_message": runtime / sent_replies if runtime is not None and sent_replies else None,
            "replies_sent": sent_replies,
            "processes_under_departments": sorted(Counter(p["name"] for p in record.get("processes", [])).items()),
            "processes_started_during_run": len(new_processes),
            "processes_started_names": sorted({p["name"] for p in new_processes}),
        },
    }

