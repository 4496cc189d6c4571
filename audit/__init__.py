"""The privacy audit: verify ledgers and re-derive every ε independently (``fedsilo audit``).

For each ledger the audit

1. verifies the hash chain, the order, the identity (one key signs a whole
   ledger) and every signature — against the public keys given with ``--keys``
   (matched by fingerprint; nothing beside the ledger is trusted then), or the
   ``.pub`` files kept beside a simulated ledger (self-consistency only);
2. re-derives ε after every entry from the recorded mechanisms with accountants
   independent of the one that wrote it — Opacus' PRV and RDP, and Google's
   dp-accounting PLD — and flags any recorded ε below the re-derived PLD or PRV
   value (a budget under-reported);
3. checks each entry against the budget it records, δ against 1/records, and
   names every budget change, δ change and non-private round (findings: shown,
   never hidden under "verified");
4. cross-checks the coordinator's signed record of the ledger heads it
   acknowledged (``shared/record.py``): every acknowledged head must be in the
   ledger of that identity with the same ε — this is what catches entries
   truncated off the end, a ledger restored from an older copy, and forks.

:attr:`AuditResult.checked` and :attr:`AuditResult.unavailable` say exactly
what was and was not verified.  A ledger that is missing, empty, a symlink
loop, not a regular file, or not readable as ledger entries never verifies: it
is named in :attr:`AuditResult.unreadable` (``fedsilo audit`` exits 2 for it).
Every file is read through :mod:`fedsilo.shared.safe_read`.

The package is the auditor's room: :mod:`.result` (what was found),
:mod:`.ledgers` (one ledger), :mod:`.runs` (a run or a folder), :mod:`.terminal`
(the table ``fedsilo audit`` prints) and :mod:`.html` (``--report``).
"""

from fedsilo.shared.summary_format import read_summary  # the run summary, typed (also read by the audit)

from .ledgers import audit_ledger, format_date, key_index, pld_epsilon, prv_feasible
from .result import AuditResult, DepartmentAudit
from .runs import audit_path

__all__ = ["AuditResult", "DepartmentAudit", "audit_ledger", "audit_path", "format_date", "key_index", "pld_epsilon",
           "prv_feasible", "read_summary"]
