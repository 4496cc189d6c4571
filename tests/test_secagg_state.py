"""A department session written to bytes and restored (as Flower's context.state will hold it between
messages) behaves exactly as one kept in memory, keeps its once-per-round rules, and refuses a state
that is not its own."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_federation import expected_sum, federation, signer, wire

from fedsilo.secagg import DepartmentPolicy, DepartmentSession, MalformedMessage, ProtocolViolation
from fedsilo.secagg import state as state_form
from fedsilo.secagg.encoding import decode, encode


class _Restoring:
    """Stands in for a department whose every call runs in a fresh process: restore, answer, save."""

    def __init__(self, session: DepartmentSession, roster, policy, log: list) -> None:
        self.name, self.roster, self.policy, self.log = session.name, roster, policy, log
        self.saved = session.to_state()

    def __getattr__(self, method):
        def call(*args):
            session = DepartmentSession.from_state(self.saved, signer(self.name), self.roster, self.policy)
            assert session.to_state() == self.saved          # restoring changes nothing
            answer = getattr(session, method)(*args)
            self.saved = session.to_state()
            self.log.append(method)
            return answer
        return call


def _restoring_federation(**kwargs):
    fed = federation(**kwargs)
    roster = {name: signer(name).public_key for name in fed.names}
    log: list = []
    fed.departments = {n: _Restoring(d, roster, d.policy, log) for n, d in fed.departments.items()}
    return fed, roster, log


def _run_three_rounds(fed):
    """A plain round, one with a dropout before masking (so a consistency round), one after masking."""
    fed.setup()
    sums, expected = [], []
    for r, before_mask, before_unmask in ((0, (), ()), (1, ("dept1",), ()), (2, (), ("dept3",))):
        inputs = fed.inputs()
        sums.append(fed.round(r, inputs, drop_before_mask=before_mask, drop_before_unmask=before_unmask))
        expected.append(expected_sum(inputs, [n for n in fed.names if n not in before_mask], 32))
    return sums, expected


def test_a_session_restored_after_every_step_gives_the_same_sums_as_one_kept_in_memory():
    in_memory = federation(n=5, t=3, window=3)
    restored, _, log = _restoring_federation(n=5, t=3, window=3)
    in_memory.rng, restored.rng = np.random.default_rng(11), np.random.default_rng(11)
    kept, kept_expected = _run_three_rounds(in_memory)
    sums, expected = _run_three_rounds(restored)
    for a, b, c, d in zip(kept, kept_expected, sums, expected):
        assert np.array_equal(a, b) and np.array_equal(c, d) and np.array_equal(a, c)
    assert {"advertise", "share", "mask", "sign_responders", "unmask"} <= set(log)


def _joined_and_masked(round_number=0, drop=()):
    """A federation set up and masked for one round; returns it and the requests each department saw."""
    fed = federation(n=5, t=3, window=2)
    fed.setup()
    inputs = fed.inputs()
    requests = {n: fed.coordinator.mask_request(n, round_number) for n in fed.names}
    for name in fed.names:
        if name not in drop:
            fed.coordinator.receive_masked(wire(fed.departments[name].mask(wire(requests[name]), inputs[name])))
    return fed, requests, inputs


def _restore(fed, name, data=None):
    roster = {n: signer(n).public_key for n in fed.names}
    data = fed.departments[name].to_state() if data is None else data
    return DepartmentSession.from_state(data, signer(name), roster)


def test_restored_session_resends_its_cached_masked_input_never_a_new_one():
    fed, requests, inputs = _joined_and_masked()
    first = fed.departments["dept0"].mask(requests["dept0"], inputs["dept0"])
    again = _restore(fed, "dept0").mask(requests["dept0"], inputs["dept0"] + np.uint64(1))
    assert again == first


def test_restored_session_unmasks_a_round_once_and_then_refuses_to_mask_it():
    fed, requests, inputs = _joined_and_masked(drop=("dept4",))
    consistency = fed.coordinator.consistency_request(0)
    for name in fed.names[:4]:
        fed.coordinator.receive_consistency(_restore(fed, name).sign_responders(consistency))
        fed.departments[name].sign_responders(consistency)   # keep the in-memory copies in step
    request = fed.coordinator.unmask_request(0)
    session = _restore(fed, "dept0")
    answer = session.unmask(request)
    restored = _restore(fed, "dept0", session.to_state())
    assert restored.unmask(request) == answer
    with pytest.raises(ProtocolViolation, match="already unmasked"):
        restored.mask(requests["dept0"], inputs["dept0"])
    other = type(request)(request.run_key, request.session_id, 0, tuple(fed.names[:3]), request.mask_signatures,
                          request.signatures)
    with pytest.raises(ProtocolViolation, match="one answer per round"):
        restored.unmask(other)


def test_restored_session_keeps_its_commitment_to_one_u3():
    fed, _, _ = _joined_and_masked(drop=("dept4",))
    consistency = fed.coordinator.consistency_request(0)
    session = fed.departments["dept0"]
    session.sign_responders(consistency)
    smaller = type(consistency)(consistency.run_key, consistency.session_id, 0, ("dept0", "dept1", "dept2"))
    with pytest.raises(ProtocolViolation, match="already committed"):
        _restore(fed, "dept0").sign_responders(smaller)


def test_state_is_canonical_and_a_fresh_session_round_trips():
    roster = {n: signer(n).public_key for n in ("a", "b", "c")}
    fresh = DepartmentSession("a", signer("a"), roster)
    restored = DepartmentSession.from_state(fresh.to_state(), signer("a"), roster)
    assert restored.params is None and restored.to_state() == fresh.to_state()
    fed, _, _ = _joined_and_masked()
    data = fed.departments["dept2"].to_state()
    assert _restore(fed, "dept2", data).to_state() == data


def test_a_state_of_another_department_or_roster_is_refused():
    fed, _, _ = _joined_and_masked()
    data = fed.departments["dept0"].to_state()
    roster = {n: signer(n).public_key for n in fed.names}
    with pytest.raises(MalformedMessage, match="belongs to department 'dept0', not 'dept1'"):
        DepartmentSession.from_state(data, signer("dept1"), roster)
    other_roster = dict(roster, dept4=signer("outsider").public_key)
    with pytest.raises(MalformedMessage, match="another roster"):
        DepartmentSession.from_state(data, signer("dept0"), other_roster)
    with pytest.raises(ValueError, match="not exactly one department"):
        DepartmentSession.from_state(data, signer("outsider"), roster)


def test_a_session_the_policy_refuses_is_refused_on_restore_too():
    fed, _, _ = _joined_and_masked()
    roster = {n: signer(n).public_key for n in fed.names}
    with pytest.raises(ProtocolViolation, match="policy needs 6"):
        DepartmentSession.from_state(fed.departments["dept0"].to_state(), signer("dept0"), roster,
                                     DepartmentPolicy(min_participants=6))


def _altered(data: bytes, index: int, value) -> bytes:
    items = decode(data, state_form.MAX_STATE_BYTES)
    items[index] = value
    return encode(*items)


@pytest.mark.parametrize("index, value, message", [
    (0, "fedsilo-secagg/other", "not a secure-aggregation department state"),
    (1, 3, "version 3 is not supported"),
    (5, b"\0" * 31, "private key must be 32 bytes"),
    (8, [], "pair keys are not exactly"),
    (9, [], "own seeds and shares"),
    (12, b"\0junk", "the dealt shares: "),
    (13, [[7, [], b"", [], b"", b""]], "outside the session's window"),
])
def test_a_state_altered_in_any_field_is_refused_without_showing_secrets(index, value, message):
    fed, _, _ = _joined_and_masked()
    session = fed.departments["dept0"]
    data = session.to_state()
    with pytest.raises(MalformedMessage, match=message) as err:
        _restore(fed, "dept0", _altered(data, index, value))
    secrets = [state_form.private_bytes(session._private)] + list(session._pair_keys.values()) + \
        list(session._own_seeds.values())
    roster = {n: signer(n).public_key for n in fed.names}
    parsed = state_form.load(data, "dept0", roster)
    shown = (str(err.value) + repr(session) + repr(_restore(fed, "dept0", data)) + repr(parsed)
             + repr(list(parsed.rounds.values())))
    assert not any(s.hex() in shown or repr(s) in shown for s in secrets)


def test_truncated_or_extended_state_is_refused():
    fed, _, _ = _joined_and_masked()
    data = fed.departments["dept0"].to_state()
    for bad in (data[:-1], data + b"\0", b"", data[:40]):
        with pytest.raises(MalformedMessage):
            _restore(fed, "dept0", bad)
