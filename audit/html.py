"""``fedsilo audit PATH --report DIR``: the audit as a web page with plots, for people.

``DIR/index.html`` is self-contained apart from the PNG plots beside it (made
with matplotlib, headless): the verdict with every problem, the run, the
per-department table, ε per department over its whole history against its
budget, global accuracy over rounds, the privacy–utility point of the run, the
coordinator's client-level guarantee when the run used it, and what the numbers
mean.  The report is written whether or not the audit verified: a failed audit
is when it is needed.

The page is a list of sections, each a small function returning an HTML
fragment ("" to leave it out); :func:`render_report` puts them in order.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedsilo.shared.metrics import format_metrics, headline
from fedsilo.shared.runs import SUMMARY as SUMMARY_FILE  # noqa: E402
from fedsilo.shared.safe_read import UnreadableFile  # noqa: E402
from fedsilo.shared.summary_format import RoundRecord, Summary, read_summary  # noqa: E402

from .ledgers import format_date  # noqa: E402
from .result import AuditResult, DepartmentAudit  # noqa: E402
from .terminal import AUDIT_COLUMNS, audit_cells  # noqa: E402

EPSILON_PLOT = "epsilon.png"
ACCURACY_PLOT = "accuracy.png"
TRADEOFF_PLOT = "privacy-utility.png"
REPORT_FILE = "index.html"


def load_summary(path: Path | str) -> Summary | None:
    """Read a run's coordinator record.

    Parameters
    ----------
    path
        What was audited: a run directory, a ledger directory or one ledger.

    Returns
    -------
    Summary or None
        ``summary.json`` when ``path`` is a run directory holding one, else ``None`` (also when it
        cannot be read: the audit names that problem itself).
    """
    summary = Path(path) / SUMMARY_FILE
    if not summary.is_file():
        return None
    try:
        return read_summary(summary)  # read safely, every field typed, as the audit reads it
    except UnreadableFile:
        return None


def render_report(result: AuditResult, summary: Summary | None, out_dir: Path | str) -> Path:
    """Write the HTML report and its plots.

    Parameters
    ----------
    result
        The audit, as :func:`fedsilo.shared.audit.audit_path` returns it (verified or not).
    summary
        The run's ``summary.json``, or ``None`` when only ledgers were audited: the
        accuracy and privacy–utility plots are then left out, with a note.
    out_dir
        Folder for ``index.html`` and the PNGs (created if missing).

    Returns
    -------
    Path
        The written ``index.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        _verdict(result),
        _run(result, summary),
        _department_table(result),
        _identities(result),
        _epsilon_plot(result, out),
        _accuracy_plot(summary, out),
        _tradeoff_plot(result, summary, out),
        _central(result.central, summary),
        _meaning(),
    ]
    page = out / REPORT_FILE
    page.write_text(_PAGE.format(body="\n".join(s for s in sections if s)), encoding="utf-8")
    return page


# ----------------------------------------------------------------------------- helpers


def _e(value: object) -> str:
    return html.escape(str(value))


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "–" if value is None else format(value, fmt)


def _img(name: str, alt: str) -> str:
    return f'<img src="{_e(name)}" alt="{_e(alt)}">'


def _plain(text: str) -> str:
    """A label matplotlib shows as written (no mathtext from a ``$`` in a name)."""
    return text.replace("$", r"\$")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- sections


def _verdict(result: AuditResult) -> str:
    rows = result.rows
    problems = [f"<li><b>{_e(r.id)}</b>: {_e(p)}</li>" for r in rows for p in r.problems]
    problems += [f"<li><b>audit</b>: {_e(p)}</li>" for p in result.problems]
    findings = "".join(f"<li>{_e(f)}</li>" for f in result.findings)
    checked = "".join(f"<li>{_e(c)}</li>" for c in result.checked)
    unavailable = "".join(f"<li>{_e(u)}</li>" for u in result.unavailable)
    if not result.ok:
        unread = "" if result.readable else " A file could not be read: a missing, empty or unreadable ledger never verifies."
        head = (
            f'<p class="fail">Verification FAILED: {len(problems)} problem(s).{unread}</p>'
            f'<ul class="problems">{"".join(problems)}</ul>'
        )
    elif findings:
        head = (
            f'<p class="warn">Verified, with {len(result.findings)} finding(s): the ledgers check out, but read '
            "these before signing off (a budget raised, a δ or accountant changed, a round without DP).</p>"
        )
    else:
        head = '<p class="ok">Verified: everything listed under "checked" holds.</p>'
    return (
        head
        + (f'<h3>Findings</h3><ul class="warnings">{findings}</ul>' if findings else "")
        + (f"<h3>Checked</h3><ul>{checked}</ul>" if checked else "")
        + (f'<h3>Not available, so not verified</h3><ul class="warnings">{unavailable}</ul>' if unavailable else "")
    )


def _identities(result: AuditResult) -> str:
    """Who each ledger belongs to, which key proved it, how many records, when, and written by what."""
    rows = [r for r in result.rows if r.identity]
    if not rows:
        return ""
    head = ("department", "names used", "identity (key fingerprint)", "verified with", "records", "first entry",
            "latest entry", "written by", "heads acknowledged")
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(c)}</td>" for c in (
            r.id, ", ".join(r.names), r.identity, r.key or "– (no key)", r.records if r.records is not None else "–",
            format_date(r.first), format_date(r.last), ", ".join(r.software), r.acknowledged,
        )) + "</tr>"
        for r in rows
    )
    return (
        "<h2>Ledgers and identities</h2><p>A ledger belongs to the key that signs it, not to a name or a file: "
        "a department renamed keeps its history.</p>"
        '<table class="grid facts"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" + body + "</table>"
    )


def _run(result: AuditResult, summary: Summary | None) -> str:
    if summary is None:
        return (
            f"<p>Ledgers only (no run summary): {len(result.departments)} department ledger(s). "
            "Budgets, accuracy and the coordinator's cross-check come with a run directory.</p>"
        )
    status = summary.status + (f": {summary.stop_reason}" if summary.stop_reason else "")
    facts = [
        ("run", summary.run_id or "–"),
        ("status", status),
        ("dataset", summary.dataset.get("name", "–")),
        ("rounds (this run)", len(summary.rounds)),
        ("task", summary.task or "–"),
        ("final held-out metrics", format_metrics(summary.final_metrics, summary.task or "multiclass")
         if summary.final_metrics else _num(summary.final_accuracy, ".4f")),
        ("model card", summary.model_card or "–"),
        ("record-level δ", "no record-level DP" if summary.dp is False else _num(summary.delta, "g")),
        ("accountant", (summary.accountant or "–").upper()),
    ]
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    return f'<table class="facts">{cells}</table>'


def _department_table(result: AuditResult) -> str:
    body = []
    for row in result.departments:
        cells = audit_cells(row)
        css = "" if row.verified else ' class="bad"'
        body.append(f"<tr{css}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return (
        "<h2>Departments: record-level DP</h2>"
        "<p>ε of each department's whole ledger (every round of every run), recorded and re-derived "
        "with three accountants, at the department's δ.</p>"
        '<table class="grid"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in AUDIT_COLUMNS) + "</tr>"
        + "".join(body) + "</table>"
    )


def _epsilon_plot(result: AuditResult, out: Path) -> str:
    rows = [r for r in result.departments if r.entries]
    if not rows:
        return "<h2>ε over rounds</h2><p>No verified ledger entries to plot.</p>"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in rows:
        xs = range(1, len(row.entries) + 1)
        label = _plain(row.id) + ("" if row.verified else " (FAILED verification)")
        ax.plot(xs, [e.epsilon for e in row.entries], marker="o" if row.verified else "x", markersize=4,
                linestyle="-" if row.verified else ":", label=label)
    for budget in sorted({r.budget for r in rows if r.budget is not None}):
        ax.axhline(budget, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"budget {budget:g}", (0.01, budget), xycoords=("axes fraction", "data"), va="bottom", fontsize=8)
    deltas = {r.delta for r in rows}
    ax.set_ylabel(f"ε at δ={rows[0].delta:g}" if len(deltas) == 1 else "ε (each at its department's δ)")
    ax.set_xlabel("round (whole history)")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Whole-history ε per department (recorded in its ledger)")
    ax.legend(fontsize=7, ncol=2 if len(rows) > 6 else 1, loc="lower right")
    _save(fig, out / EPSILON_PLOT)
    return "<h2>ε over rounds</h2>" + _img(EPSILON_PLOT, "whole-history ε per department against its budget")


def _round_metric(record: RoundRecord, key: str) -> float | None:
    """A round's held-out ``key`` (a summary of fedsilo 0.1 holds accuracy and loss only, no metrics)."""
    return record.metrics.get(key) if record.metrics else getattr(record, key, None)


def _accuracy_plot(summary: Summary | None, out: Path) -> str:
    if summary is None:
        return (
            "<h2>Accuracy and privacy–utility</h2><p>Not shown: these come from the run's summary.json, "
            "and only ledgers were audited. Audit the run directory for them.</p>"
        )
    key = headline(summary.task or "multiclass")
    rounds = [r for r in summary.rounds if _round_metric(r, key) is not None]
    if not rounds:
        return "<h2>Accuracy over rounds</h2><p>The run finished no round.</p>"
    xs, ys = [r.round for r in rounds], [_round_metric(r, key) for r in rounds]
    initial = summary.initial.get(key)
    if initial is not None:
        xs, ys = [0, *xs], [initial, *ys]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(xs, ys, marker="o", markersize=4)
    ax.set_xlabel("round (this run; 0 = initial model)")
    ax.set_ylabel(f"held-out {key}")
    if key == "accuracy":
        ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Global model {key} on the coordinator's held-out set")
    _save(fig, out / ACCURACY_PLOT)
    return "<h2>Accuracy over rounds</h2>" + _img(ACCURACY_PLOT, "global test accuracy over rounds")


def _tradeoff_plot(result: AuditResult, summary: Summary | None, out: Path) -> str:
    if summary is None:
        return ""  # said in the accuracy section
    title = "<h2>Privacy–utility</h2>"
    accuracy = summary.final_accuracy
    if accuracy is None and summary.task == "regression":
        return title + "<p>A regression run: its R² over rounds is plotted above; the ε of each department is in the table.</p>"
    if accuracy is None:
        return title + "<p>The run finished no round: there is no final accuracy.</p>"
    if summary.dp is False:
        return title + (
            f"<p>This run had no record-level DP: ε is unbounded (∞) for every department's examples, "
            f"so there is no privacy–utility point to plot. Final accuracy {accuracy:.4f}.</p>"
        )
    rows = [r for r in result.departments if r.entries]
    if not rows:
        return title + "<p>No verified ledger entries here, so no ε to put against the accuracy.</p>"
    worst = max(rows, key=lambda r: r.epsilon)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter([worst.epsilon], [accuracy], s=60, zorder=3)
    ax.annotate(f"this run: ε={worst.epsilon:.2f} ({_plain(worst.id)}),\naccuracy {accuracy:.4f}",
                (worst.epsilon, accuracy), textcoords="offset points", ha="center", fontsize=9,
                xytext=(0, 12) if accuracy < 0.6 else (0, -12), va="bottom" if accuracy < 0.6 else "top")
    initial = summary.initial.get("accuracy")
    if initial is not None:
        ax.axhline(initial, color="grey", linestyle=":", linewidth=1, label=f"initial model {initial:.4f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0, max(worst.epsilon * 1.6, 1.0))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(f"largest whole-history ε of a department (δ={worst.delta:g})")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Privacy–utility of the run")
    _save(fig, out / TRADEOFF_PLOT)
    return title + _img(TRADEOFF_PLOT, "privacy-utility point of the run")


def _central(row: DepartmentAudit | None, summary: Summary | None) -> str:
    if row is None:
        return ""
    settings = summary.central if summary is not None else None
    state = "verified" if row.verified else "FAILED verification"
    return (
        "<h2>The coordinator: client-level DP</h2>"
        f"<p>Whole-history <b>ε = {_num(row.epsilon)}</b> at δ = {_num(row.delta, 'g')} over {row.rounds} "
        f"release(s) (re-derived: PRV {_num(row.epsilon_prv)}, RDP {_num(row.epsilon_rdp)}, PLD "
        f"{_num(row.epsilon_pld)}); σ = {_num(row.noise_multiplier, 'g')}, departments sampled with q = "
        f"{_num(row.sample_rate, 'g')}, update clip C = {_e(settings.clip_norm if settings else '–')}; budget "
        f"{_num(row.budget, 'g')}. Ledger {state}, signatures {_e(row.signatures)}.</p>"
        "<p>This bounds what the released model reveals about whether any one department took part, with all "
        "of its data. It does not protect against the coordinator, which sees each update before the noise; "
        "the departments' record-level ε above does.</p>"
    )


def _meaning() -> str:
    return (
        "<h2>What these numbers mean, and what they do not cover</h2>"
        "<p>A department's ε is record-level differential privacy for <i>its own</i> examples: whatever the "
        "released updates and model reveal would be almost as likely had any one of its records been left out, "
        "'almost' meaning within a factor e<sup>ε</sup>, except with probability δ (the stated δ). It covers "
        "the department's whole ledger — every round of every run that used it, earlier runs included — and is "
        "re-derived here from the recorded mechanisms with accountants independent of the one that wrote it.</p>"
        "<p>It does not cover: the coordinator's held-out test set (the accuracy is measured on it); the feature "
        "scaling statistics, computed over the whole table before training; hyperparameters tuned by looking at "
        "test accuracy; a person whose records sit in several departments (their privacy loss adds up across "
        "them). A valid chain and signatures prove a ledger is the one its department's key wrote; entries cut "
        "off its end, or a ledger restored from an older copy, are caught only against the coordinator's "
        "signed record of the ledger heads it acknowledged.</p>"
        "<p><b>Why PRV can exceed PLD.</b> All three accountants bound the same history. dp-accounting's PLD "
        "(pessimistic discretization) is the tightest here and is what fedsilo records by default. Opacus' PRV is "
        "reported as its certified upper bound (<code>eps_upper</code>), which adds the error of its numerical "
        "approximation on top of the estimate, so it sits slightly above PLD (about 1–2% in these runs). RDP "
        "converts Rényi-DP to (ε, δ) with a known slack and is the loosest. A recorded ε is flagged only when "
        "it is below the lower of PLD and PRV: then the budget was under-reported.</p>"
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedsilo privacy audit</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
.facts th, .facts td {{ text-align: left; }} .ok {{ color: #176c2e; font-weight: bold; }}
.fail {{ color: #b00020; font-weight: bold; }} .problems li {{ color: #b00020; }}
.warn {{ color: #8a5a00; font-weight: bold; }} .warnings li {{ color: #8a5a00; }}
tr.bad td {{ background: #fde8ea; }} img {{ max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }}
</style></head>
<body>
<h1>fedsilo privacy audit</h1>
{body}
</body></html>
"""
