"""The coordinator's side of ledger continuity: check each department's signed head, keep the last.

Before a round, :meth:`HeadKeeper.expectation` gives each department's task the
head last acknowledged for its identity; the department refuses to train if its
ledger no longer holds it.  On every reply :meth:`HeadKeeper.check` verifies the
head's signature — against the key registered for the node in a deployment —
and that it does not go behind or fork from the acknowledged one; a head that
passes is recorded (:class:`~fedsilo.shared.record.CoordinatorRecord`, signed
by the coordinator) and becomes the next expectation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.shared.config import RunSettings
from fedsilo.shared.record import RECORD_FILE, CoordinatorRecord, LedgerHead, load_any_public_key
from fedsilo.shared.signing import Signer, fingerprint, simulated_identity


@dataclass
class HeadKeeper:
    """Acknowledged ledger heads per department identity, and the checks on new ones."""

    record: CoordinatorRecord
    registered: dict[int, ec.EllipticCurvePublicKey] = field(default_factory=dict)  # node id -> key
    identities: dict[int, str] = field(default_factory=dict)  # node id -> identity seen in its replies

    def identity_of(self, node_id: int) -> str | None:
        key = self.registered.get(node_id)
        return fingerprint(key) if key is not None else self.identities.get(node_id)

    def expectation(self, node_id: int) -> tuple[int, str] | None:
        """(entries, head hash) last acknowledged for the node's identity, if any."""
        identity = self.identity_of(node_id)
        ack = self.record.acknowledged(identity) if identity else None
        return (ack.ledger_seq, ack.ledger_head) if ack else None

    def check(self, node: int, head: LedgerHead, trained: bool) -> tuple[LedgerHead | None, str]:
        """``head`` (read from node ``node``'s reply by :func:`fedsilo.server.replies.read_head`) if it
        verifies and continues the acknowledged one, else (None, why it must not be used)."""
        problem = head.problem(self.registered.get(node))
        if problem:
            return None, problem
        if node not in self.registered and self.identities.get(node, head.identity) != head.identity:
            return None, "its ledger head names another identity than its earlier replies"
        self.identities[node] = head.identity
        ack = self.record.acknowledged(head.identity)
        if ack is not None:
            if head.seq < ack.ledger_seq:
                return None, (
                    f"its ledger holds {head.seq} entries, but the coordinator acknowledged {ack.ledger_seq} "
                    f"(run {ack.run_id}, round {ack.round}): the ledger went backwards (restored, deleted or a new folder)"
                )
            if head.seq == ack.ledger_seq and head.head != ack.ledger_head:
                return None, f"its ledger forked: entry {head.seq - 1} differs from the one the coordinator acknowledged"
            if trained and head.seq <= ack.ledger_seq:
                return None, "it sent an update, but its ledger did not record the round"
        return head, ""

    def acknowledge(self, head: LedgerHead, department: str) -> None:
        ack = self.record.acknowledged(head.identity)
        if ack is None or (head.seq, head.head) != (ack.ledger_seq, ack.ledger_head):
            self.record.append(head, department)


def open_record(settings: RunSettings, out_dir: Path) -> CoordinatorRecord:
    """The run's record: the coordinator's own (deployment), or one beside the simulated run."""
    if settings.record:
        path = Path(settings.record)
        key = Path(settings.record_signing_key) if settings.record_signing_key else None
        if key is None:
            raise ValueError("record-signing-key is required with record: the coordinator signs what it records")
        signer = Signer.from_file(key)
    else:
        folder = out_dir / "record"
        path = folder / RECORD_FILE
        signer = simulated_identity(folder, "coordinator")
    return CoordinatorRecord(path, signer)


def registered_keys(nodes) -> dict[int, ec.EllipticCurvePublicKey]:
    """Node id -> the public key it was registered with (deployment; none in a simulation)."""
    out = {}
    for node in nodes:
        blob = getattr(node, "public_key", b"")
        key = load_any_public_key(blob) if blob else None
        if key is not None:
            out[int(node.node_id)] = key
    return out
