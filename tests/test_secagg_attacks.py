"""Secure aggregation against a malicious coordinator (colluding with c < t - 1 departments) and
against bad relaying: forged or substituted keys, Sybils, replays, tampered shares, inconsistent
participant sets, and the coordinator that lies about who dropped."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import chisquare
from secagg_federation import federation, signer, wire

from fedsilo.secagg import DepartmentPolicy, DepartmentSession, ProtocolViolation, sharing
from fedsilo.secagg import keys, masking
from fedsilo.secagg.messages import Advertisement, ConsistencyRequest, ShareRequest, UnmaskRequest

# A uniform source fails p > 1e-6 once in a million runs (the masks come from the OS CSPRNG and
# cannot be seeded); a biased mask at these sample sizes gives p many orders below it.
UNIFORM_P = 1e-6


def _replace(message, **changes):
    return dataclasses.replace(message, **changes)


def _advertised(n=5, t=3, **kwargs):
    """A federation whose departments have advertised, and the coordinator's ShareRequest."""
    fed = federation(n=n, t=t, **kwargs)
    request = fed.coordinator.advertise_request()
    for name in fed.names:
        fed.coordinator.receive_advertisement(fed.departments[name].advertise(request))
    return fed, fed.coordinator.share_request()


def _with_advertisement(share_request: ShareRequest, adv: Advertisement) -> ShareRequest:
    others = [a for a in share_request.advertisements if a.name != adv.name]
    return _replace(share_request, advertisements=tuple(sorted(others + [adv], key=lambda a: a.name)))


def _adv(share_request, name):
    return next(a for a in share_request.advertisements if a.name == name)


# --- key agreement --------------------------------------------------------------------------------

def test_tampered_signature_is_refused():
    fed, request = _advertised()
    adv = _adv(request, "dept1")
    forged = _replace(adv, signature=signer("dept2").sign(fed.params.advertisement_payload("dept1", adv.public_key)))
    with pytest.raises(ProtocolViolation, match="'dept1' is not signed by its roster key"):
        fed.departments["dept0"].share(wire(_with_advertisement(request, forged)))


def test_substituted_x25519_key_is_refused():
    fed, request = _advertised()
    substituted = _replace(_adv(request, "dept1"), public_key=keys.new_key_pair()[1])  # valid key, not the signed one
    with pytest.raises(ProtocolViolation, match="not signed by its roster key"):
        fed.departments["dept0"].share(wire(_with_advertisement(request, substituted)))


def test_a_sybil_not_in_the_departments_roster_is_refused():
    fed = federation(n=4, t=3)
    names = fed.names + ["mallory"]
    coordinator = type(fed.coordinator)("run-1", 3, names, 32, 64)
    mallory = DepartmentSession("mallory", signer("mallory"), {"mallory": signer("mallory").public_key},
                                DepartmentPolicy())
    request = coordinator.advertise_request()
    for name in fed.names:
        coordinator.receive_advertisement(fed.departments[name].advertise(request))
    coordinator.receive_advertisement(mallory.advertise(request))  # validly signed by its own key
    with pytest.raises(ProtocolViolation, match="'mallory' is not in this department's roster"):
        fed.departments["dept0"].share(coordinator.share_request())


@pytest.mark.parametrize("rewrite_header", [False, True])
def test_an_advertisement_from_another_session_or_run_is_refused(rewrite_header):
    fed, request = _advertised()
    for other_run in ("run-1", "run-2"):
        old, old_request = _advertised(run_key=other_run)
        replayed = _adv(old_request, "dept1")
        if rewrite_header:
            replayed = _replace(replayed, run_key="run-1", session_id=fed.params.session_id)
        match = "not signed" if rewrite_header else "another (session|run)"
        with pytest.raises(ProtocolViolation, match=match):
            fed.departments["dept0"].share(wire(_with_advertisement(request, replayed)))


def test_a_duplicated_x25519_key_is_refused():
    fed, request = _advertised()
    copied = _adv(request, "dept1").public_key
    dept4 = _replace(_adv(request, "dept4"), public_key=copied,
                     signature=signer("dept4").sign(fed.params.advertisement_payload("dept4", copied)))
    with pytest.raises(ProtocolViolation, match="also another department's"):
        fed.departments["dept0"].share(wire(_with_advertisement(request, dept4)))


def test_own_advertisement_must_be_there_unaltered_and_enough_must_be_valid():
    fed, request = _advertised()
    without_me = _replace(request, advertisements=tuple(a for a in request.advertisements if a.name != "dept0"))
    with pytest.raises(ProtocolViolation, match="own advertisement"):
        fed.departments["dept0"].share(without_me)
    few = _replace(request, advertisements=request.advertisements[:2])
    with pytest.raises(ProtocolViolation, match="fewer than the threshold"):
        fed.departments["dept0"].share(few)


@pytest.mark.parametrize("change, match", [
    ({"threshold": 1}, "threshold"), ({"threshold": 6}, "threshold"), ({"modulus_bits": 63}, "modulus"),
    ({"modulus_bits": 7}, "modulus"), ({"participants": ("dept1", "dept2", "dept3")}, "not among"),
    ({"participants": ("dept0", "dept0", "dept1")}, "unique"), ({"vector_length": 1 << 25}, "vector length"),
    ({"window": 0}, "window")])
def test_advertise_request_outside_policy_is_refused(change, match):
    fed = federation(n=5, t=3)
    request = _replace(fed.coordinator.advertise_request(), **change)
    with pytest.raises(ProtocolViolation, match=match):
        fed.departments["dept0"].advertise(request)


def test_policy_minimums_are_the_departments():
    fed = federation(n=5, t=3, policy=DepartmentPolicy(min_threshold=4))
    with pytest.raises(ProtocolViolation, match="threshold 3 outside"):
        fed.setup()


# --- shares ---------------------------------------------------------------------------------------

def _dealt():
    fed = federation(n=5, t=3)
    fed.setup()
    return fed, fed.coordinator.mask_request("dept0", 0)


def _mask(fed, request, name="dept0"):
    return fed.departments[name].mask(request, np.zeros(fed.params.vector_length, dtype=np.uint64))


def test_a_tampered_share_ciphertext_is_refused_clearly():
    fed, request = _dealt()
    sealed = bytearray(request.ciphertexts["dept1"])
    sealed[20] ^= 1
    with pytest.raises(ProtocolViolation, match="from 'dept1' does not authenticate"):
        _mask(fed, _replace(request, ciphertexts={**request.ciphertexts, "dept1": bytes(sealed)}))


def test_a_ciphertext_replayed_from_another_pair_direction_or_session_is_refused():
    fed, request = _dealt()
    shares = fed.coordinator.shares
    other_session, _ = _dealt()
    for replayed in (shares["dept1"].ciphertexts["dept2"],            # dept1 -> dept2, shown as dept1 -> dept0
                     shares["dept0"].ciphertexts["dept1"],            # dept0 -> dept1, the other direction
                     other_session.coordinator.shares["dept1"].ciphertexts["dept0"]):  # another session/window
        with pytest.raises(ProtocolViolation, match="does not authenticate"):
            _mask(fed, _replace(request, ciphertexts={**request.ciphertexts, "dept1": replayed}))


def test_mask_request_participants_must_be_verified_enough_and_complete():
    fed, request = _dealt()
    missing = {k: v for k, v in request.ciphertexts.items() if k != "dept1"}
    with pytest.raises(ProtocolViolation, match="missing from \\['dept1'\\]"):
        _mask(fed, _replace(request, ciphertexts=missing))
    with pytest.raises(ProtocolViolation, match="fewer than the threshold"):
        _mask(fed, _replace(request, participants=("dept0", "dept1"),
                            ciphertexts={"dept1": request.ciphertexts["dept1"]}))
    with pytest.raises(ProtocolViolation, match="missing from \\['dept0'\\], unexpected from \\['dept1'\\]"):
        _mask(fed, request, name="dept1")          # the ciphertexts addressed to dept0, shown to dept1
    with pytest.raises(ProtocolViolation, match="another session"):
        _mask(fed, _dealt()[1])
    outsider = _replace(request, participants=tuple(sorted(fed.names + ["dept9"])),
                        ciphertexts={**request.ciphertexts, "dept9": request.ciphertexts["dept1"]})
    with pytest.raises(ProtocolViolation, match="names \\['dept9'\\], not in the verified"):
        _mask(fed, outsider)


# --- unmasking ------------------------------------------------------------------------------------

def _masked_round():
    fed = federation(n=5, t=3)
    fed.setup()
    fed.mask(0, fed.inputs())
    return fed, fed.params, lambda responders, signatures=None: _request(fed, responders, signatures)


def _request(fed, responders, signatures=None, round_number=0):
    """An UnmaskRequest for ``responders`` with the masked-input signatures the coordinator holds."""
    p, state = fed.params, fed.coordinator._rounds[0]
    mask_signatures = {n: state.mask_signatures[n] for n in responders if n in state.mask_signatures}
    return UnmaskRequest(p.run_key, p.session_id, round_number, tuple(responders), mask_signatures, signatures or {})


def test_unmask_twice_with_a_different_u3_is_refused():
    fed, p, unmask = _masked_round()
    dept = fed.departments["dept0"]
    first = dept.unmask(unmask(fed.names))
    assert dept.unmask(unmask(fed.names)) == first           # the same question, the same answer
    u3 = fed.names[:4]
    signatures = {n: signer(n).sign(p.responders_payload(0, u3)) for n in u3}
    with pytest.raises(ProtocolViolation, match="already unmasked"):
        dept.unmask(unmask(u3, signatures))
    with pytest.raises(ProtocolViolation, match="already unmasked"):
        dept.sign_responders(ConsistencyRequest(p.run_key, p.session_id, 0, tuple(u3)))


def test_u3_smaller_than_t_or_not_within_u2_is_refused():
    fed = federation(n=5, t=3)
    fed.setup(absent=["dept4"])
    fed.mask(0, fed.inputs())
    p = fed.params
    dept = fed.departments["dept0"]
    with pytest.raises(ProtocolViolation, match="fewer than the threshold"):
        dept.sign_responders(ConsistencyRequest(p.run_key, p.session_id, 0, ("dept0", "dept1")))
    with pytest.raises(ProtocolViolation, match="fewer than the threshold"):
        dept.unmask(_request(fed, ("dept0", "dept1")))
    with pytest.raises(ProtocolViolation, match="not in the round's U2"):
        dept.unmask(_request(fed, fed.names))
    with pytest.raises(ProtocolViolation, match="for round 1, not 0|never masked"):
        dept.unmask(_request(fed, fed.names[:4], round_number=1))


def test_a_dropout_claim_needs_every_member_of_u3_to_have_signed_it():
    fed, p, unmask = _masked_round()
    u3 = ("dept0", "dept1", "dept2", "dept3")
    dept = fed.departments["dept0"]
    with pytest.raises(ProtocolViolation, match="signed nothing"):
        dept.unmask(unmask(u3))
    dept.sign_responders(ConsistencyRequest(p.run_key, p.session_id, 0, u3))
    signatures = {n: signer(n).sign(p.responders_payload(0, u3)) for n in u3}
    with pytest.raises(ProtocolViolation, match="no valid signature of 'dept3'"):
        dept.unmask(unmask(u3, {**signatures, "dept3": signer("dept4").sign(p.responders_payload(0, u3))}))
    with pytest.raises(ProtocolViolation, match="already committed"):
        dept.sign_responders(ConsistencyRequest(p.run_key, p.session_id, 0, ("dept0", "dept1", "dept2")))
    with pytest.raises(ProtocolViolation, match="signed"):
        dept.unmask(unmask(fed.names))                         # committed to u3: no fast path any more
    answer = dept.unmask(unmask(u3, signatures))
    assert set(answer.shares) == set(u3) and set(answer.seeds) == {"dept4"}


# --- the coordinator that lies about who dropped --------------------------------------------------

def _residual(fed, p, target, y, seed, known_seeds):
    """y_target minus every mask the coordinator can compute: x_target plus whatever mask is left."""
    rest = masking.subtract(y, masking.prg(keys.self_mask_key(seed, p.session_id, p.context, target, 0),
                                           p.vector_length, p.modulus_bits), p.modulus_bits)
    for peer, pair_seed in known_seeds.items():
        pair = masking.prg(pair_seed, p.vector_length, p.modulus_bits)
        rest = masking.subtract(rest, pair, p.modulus_bits) if target < peer else masking.add(rest, pair, p.modulus_bits)
    return rest


def _lying_setup(corrupted):
    fed = federation(n=5, t=3, bits=32, length=4096)
    fed.setup()
    inputs = {n: np.zeros(4096, dtype=np.uint64) for n in fed.names}   # x_d = 0: any leak would show
    fed.mask(0, inputs)
    p = fed.params
    y0 = fed.coordinator._rounds[0].masked["dept0"]
    # Everything the corrupted departments hold: their pair keys and their shares of everyone's seeds.
    known_seeds = {c: keys.pair_seed(fed.departments[c]._pair_keys["dept0"], 0, p.context) for c in corrupted}
    shares = {p.share_index(c): fed.departments[c]._received["dept0"][0] for c in corrupted}
    sign = {c: (lambda u3, c=c: signer(c).sign(p.responders_payload(0, u3))) for c in corrupted}
    return fed, p, y0, known_seeds, shares, sign


def _certified(fed, p, u3, honest, sign):
    signatures = {c: f(u3) for c, f in sign.items() if c in u3}
    for name in honest:
        signatures[name] = fed.departments[name].sign_responders(
            ConsistencyRequest(p.run_key, p.session_id, 0, u3)).signature
    return _request(fed, u3, signatures)


def _owners(p):
    return {p.share_index(n): n for n in p.participants}


def test_claiming_d_dropped_to_its_peers_while_unmasking_it_recovers_nothing():
    # c = 1 (dept4), t = 3: tell dept1..3 that dept0 dropped (they reveal their seeds with dept0),
    # and ask dept0 itself to unmask everyone (it reveals its own share of b_0).
    fed, p, y0, known_seeds, shares, sign = _lying_setup(["dept4"])
    without_d = ("dept1", "dept2", "dept3", "dept4")
    request = _certified(fed, p, without_d, ["dept1", "dept2", "dept3"], sign)
    for name in ("dept1", "dept2", "dept3"):
        known_seeds.update({name: fed.departments[name].unmask(request).seeds["dept0"]})
    shares[p.share_index("dept0")] = fed.departments["dept0"].unmask(
        _request(fed, fed.names)).shares["dept0"]
    # Every honest peer refuses to add a share of b_0 now: one answer, one U3, per round.
    for name in ("dept1", "dept2", "dept3"):
        with pytest.raises(ProtocolViolation):
            fed.departments[name].unmask(_request(fed, fed.names))
    assert len(shares) == 2 < p.threshold          # b_0 is hidden (Shamir: 2 shares say nothing)
    with pytest.raises(ProtocolViolation):
        sharing.combine(shares, p.threshold, _owners(p), "dept0")
    # All pair masks are gone, but PRG(b_0) is left: what remains of y_0 is uniform, not x_0 = 0.
    rest = _residual(fed, p, "dept0", y0, b"\0" * 16, known_seeds)
    assert chisquare(np.bincount((rest >> np.uint64(28)).astype(np.int64), minlength=16)).pvalue > UNIFORM_P
    assert np.count_nonzero(rest) > 4000


def test_splitting_the_views_of_dropouts_leaves_one_honest_pair_mask():
    # c = 1 (dept4): dept0 is told dept2 and dept3 dropped (it reveals its seeds with them), dept2 and dept3
    # are told nobody dropped (they reveal shares of b_0): b_0 is recovered, yet the mask with dept1 (the
    # other honest member of dept0's U3, which had to sign it) is never revealed by anyone.
    fed, p, y0, known_seeds, shares, sign = _lying_setup(["dept4"])
    u3 = ("dept0", "dept1", "dept4")
    request = _certified(fed, p, u3, ["dept0", "dept1"], sign)
    answer = fed.departments["dept0"].unmask(request)
    known_seeds.update({d: answer.seeds[d] for d in ("dept2", "dept3")})
    shares[p.share_index("dept0")] = answer.shares["dept0"]
    for name in ("dept2", "dept3"):
        shares[p.share_index(name)] = fed.departments[name].unmask(
            _request(fed, fed.names)).shares["dept0"]
    b0 = sharing.combine(shares, p.threshold, _owners(p), "dept0")
    with pytest.raises(ProtocolViolation, match="already unmasked|signed"):
        fed.departments["dept1"].unmask(_request(fed, ("dept1", "dept2", "dept3")))
    assert set(known_seeds) == {"dept2", "dept3", "dept4"}
    rest = _residual(fed, p, "dept0", y0, b0, known_seeds)       # = x_0 + PRG(seed_01): uniform
    assert chisquare(np.bincount((rest >> np.uint64(28)).astype(np.int64), minlength=16)).pvalue > UNIFORM_P
    assert np.count_nonzero(rest) > 4000


def test_with_t_minus_1_colluders_the_same_split_exposes_x_d_which_is_why_t_is_at_least_c_plus_2():
    # c = 2 = t - 1: U3 = {dept0} + the colluders needs no other honest signer, and the bound is tight.
    fed, p, y0, known_seeds, shares, sign = _lying_setup(["dept3", "dept4"])
    u3 = ("dept0", "dept3", "dept4")
    answer = fed.departments["dept0"].unmask(_certified(fed, p, u3, ["dept0"], sign))
    known_seeds.update(answer.seeds)
    shares[p.share_index("dept0")] = answer.shares["dept0"]
    b0 = sharing.combine(shares, p.threshold, _owners(p), "dept0")
    assert not _residual(fed, p, "dept0", y0, b0, known_seeds).any()    # x_0 = 0, exposed



def test_showing_d_a_smaller_u2_does_not_buy_a_share_of_b_d_from_a_department_outside_it():
    # c = 1 (dept4).  dept0 is made to mask over U2 = {dept0, dept1, dept4} only, so y_0 carries no pair mask
    # with dept2.  dept1 is told dept0 dropped (it reveals seed_01); dept0 unmasks its own U2 (its share of
    # b_0); a share of b_0 from dept2, which still believes in the full U2, would complete b_0.  Both are
    # refused: every member of U3 must have signed masking over the U2 of the department asked.
    fed = federation(n=5, t=3, bits=32, length=512)
    fed.setup()
    p, coordinator = fed.params, fed.coordinator
    small = ("dept0", "dept1", "dept4")
    full = coordinator.mask_request("dept0", 0)
    to_d = _replace(full, participants=small, ciphertexts={v: full.ciphertexts[v] for v in ("dept1", "dept4")})
    zeros = np.zeros(512, dtype=np.uint64)
    y0 = masking.from_bytes(fed.departments["dept0"].mask(to_d, zeros).masked, 512, 32)
    for name in fed.names[1:]:
        coordinator.receive_masked(fed.departments[name].mask(coordinator.mask_request(name, 0), zeros))
    state = coordinator._rounds[0]
    state.mask_signatures["dept0"] = fed.departments["dept0"]._rounds[0].answer.signature
    u3 = ("dept1", "dept3", "dept4")
    signatures = {n: fed.departments[n].sign_responders(ConsistencyRequest(p.run_key, p.session_id, 0, u3)).signature
                  for n in ("dept1", "dept3")}
    signatures["dept4"] = signer("dept4").sign(p.responders_payload(0, u3))
    seed_01 = fed.departments["dept1"].unmask(_request(fed, u3, signatures)).seeds["dept0"]
    with pytest.raises(ProtocolViolation, match="no valid signature of 'dept1' on having masked over"):
        fed.departments["dept0"].unmask(_request(fed, small))
    with pytest.raises(ProtocolViolation, match="no valid signature of 'dept0' on having masked over"):
        fed.departments["dept2"].unmask(_request(fed, fed.names))
    # The refusals are what protect x_0: had dept0 and dept2 answered, their shares would have exposed it.
    shares = {p.share_index("dept0"): fed.departments["dept0"]._own_shares[0],
              p.share_index("dept2"): fed.departments["dept2"]._received["dept0"][0],
              p.share_index("dept4"): fed.departments["dept4"]._received["dept0"][0]}
    b0 = sharing.combine(shares, 3, _owners(p), "dept0")
    seed_04 = keys.pair_seed(fed.departments["dept4"]._pair_keys["dept0"], 0, p.context)
    assert not _residual(fed, p, "dept0", y0, b0, {"dept1": seed_01, "dept4": seed_04}).any()


def test_a_coordinator_with_the_roster_pins_a_bad_advertisement_on_its_sender():
    fed = federation(n=5, t=3, roster={n: signer(n).public_key for n in [f"dept{i}" for i in range(5)]})
    request = fed.coordinator.advertise_request()
    adv = fed.departments["dept1"].advertise(request)
    with pytest.raises(ProtocolViolation, match="'dept1' is not signed"):
        fed.coordinator.receive_advertisement(_replace(adv, public_key=keys.new_key_pair()[1]))
