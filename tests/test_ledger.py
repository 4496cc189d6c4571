"""The privacy ledger on disk: append-only, atomic, resumed after a restart."""

import json
import multiprocessing

import pytest

from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.ledger import LedgerError, PrivacyLedger, ledger_path, read_ledgers
from fedsilo.shared.signing import simulated_identity

M = Mechanism(1.0, 0.1, 10)


def _ledger(folder, name):
    """A department's ledger with its signing key beside it."""
    return PrivacyLedger(ledger_path(folder, name), name, simulated_identity(folder, name))


def _append(ledger: PrivacyLedger, rnd: int, run_id: str = "r1") -> None:
    history = [*ledger.history, M]
    ledger.append(
        run_id=run_id,
        round=rnd,
        mechanism=M,
        max_grad_norm=1.0,
        delta=1e-5,
        accountant="pld",
        epsilon=accounting.epsilon(history, 1e-5),
        num_examples=100,
    )


def test_restart_resumes_the_ledger_and_never_resets_epsilon(tmp_path):
    path = ledger_path(tmp_path, "finance")
    first = _ledger(tmp_path, "finance")
    _append(first, 1)
    _append(first, 2)
    eps_before_restart = first.epsilon

    restarted = _ledger(tmp_path, "finance")  # a new process, same file
    assert restarted.epsilon == eps_before_restart
    assert len(restarted.history) == 2
    _append(restarted, 1, run_id="r2")  # a new run starts at round 1 again
    assert restarted.epsilon > eps_before_restart
    assert restarted.epsilon == pytest.approx(accounting.epsilon([M] * 3, 1e-5))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [0, 1, 2]


def test_entries_hold_the_whole_mechanism(tmp_path):
    ledger = _ledger(tmp_path, "a")
    _append(ledger, 1)
    entry = json.loads((tmp_path / "a.jsonl").read_text())
    for key in ("round", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta", "accountant", "epsilon"):
        assert key in entry


def test_torn_or_edited_ledger_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "a.jsonl"
    ledger = _ledger(tmp_path, "a")
    _append(ledger, 1)
    _append(ledger, 2)
    original = path.read_text()

    path.write_text(original + '{"seq": 2, "depart')  # a torn last line
    with pytest.raises(LedgerError, match="line 3"):
        PrivacyLedger(path, "a")

    lines = original.splitlines()
    path.write_text(lines[1] + "\n")  # first entry deleted
    with pytest.raises(LedgerError, match="seq 1 where 0"):
        PrivacyLedger(path, "a")

    path.write_text(original)
    with pytest.raises(LedgerError, match="not the department's"):  # another identity's history
        PrivacyLedger(path, "a", simulated_identity(tmp_path / "other", "b"))


def test_a_failed_write_leaves_the_previous_ledger_intact(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    ledger = _ledger(tmp_path, "a")
    _append(ledger, 1)
    before = path.read_bytes()

    import fedsilo.shared.ledger as module

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module.os, "replace", crash)
    with pytest.raises(OSError):
        _append(ledger, 2)
    assert path.read_bytes() == before
    assert len(PrivacyLedger(path, "a").history) == 1


def test_append_refuses_when_the_ledger_changed_underneath(tmp_path):
    """ε is computed from the history read before training; if the file changed
    meanwhile (another writer, a restore), recording that ε would be wrong."""
    path = tmp_path / "a.jsonl"
    mine = _ledger(tmp_path, "a")
    _append(mine, 1)
    seen = len(mine.entries)
    _append(_ledger(tmp_path, "a"), 2)  # someone else appends meanwhile
    with pytest.raises(LedgerError, match="changed while this round ran"):
        mine.append(
            run_id="r", round=2, mechanism=M, max_grad_norm=1.0, delta=1e-5,
            accountant="prv", epsilon=1.0, num_examples=100, expected_seq=seen,
        )
    path.unlink()  # or the file is removed
    with pytest.raises(LedgerError, match="now 0"):
        mine.append(
            run_id="r", round=2, mechanism=M, max_grad_norm=1.0, delta=1e-5,
            accountant="prv", epsilon=1.0, num_examples=100, expected_seq=seen,
        )
    assert not path.exists()


def _worker(path, n):
    """A careful writer: compute ε from what it read, append only if nothing changed."""
    ledger = _ledger(path.parent, "shared")
    written = 0
    while written < n:
        ledger.reload()
        seen = len(ledger.entries)
        try:
            ledger.append(
                run_id="r", round=written, mechanism=M, max_grad_norm=1.0, delta=1e-5,
                accountant="pld", epsilon=accounting.epsilon([*ledger.history, M], 1e-5),
                num_examples=100, expected_seq=seen,
            )
            written += 1
        except LedgerError:
            continue  # another writer got there first: re-read and recompute


def test_concurrent_appends_do_not_lose_entries(tmp_path):
    path = tmp_path / "shared.jsonl"
    simulated_identity(tmp_path, "shared")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(path, 3)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    final = PrivacyLedger(path, "shared")
    assert [e.seq for e in final.entries] == list(range(6))
    for i, entry in enumerate(final.entries):  # every ε matches the history before it
        assert entry.epsilon == pytest.approx(accounting.epsilon([M] * (i + 1), 1e-5))


def test_read_ledgers_finds_every_department(tmp_path):
    for name in ("hr", "sales"):
        _append(_ledger(tmp_path, name), 1)
    assert sorted(read_ledgers(tmp_path)) == ["hr", "sales"]
