"""ε composition: restoring the history each round equals one long run."""

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism


@pytest.mark.parametrize("name,cls", [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_per_round_restore_equals_one_long_run(name, cls):
    """A department restores its history every round; that must equal one accountant stepping throughout."""
    rounds = [Mechanism(1.1, 0.05, 20), Mechanism(1.1, 0.05, 20), Mechanism(0.9, 0.1, 10)]
    long_run = cls()
    for m in rounds:
        for _ in range(m.steps):
            long_run.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
    expected = long_run.get_epsilon(delta=1e-5)

    history: list[Mechanism] = []
    per_round = []
    for m in rounds:
        history.append(m)
        per_round.append(accounting.epsilon(history, 1e-5, name))
    assert per_round[-1] == pytest.approx(expected, rel=1e-9)
    assert per_round[0] < per_round[1] < per_round[2]


def test_prv_is_tighter_than_rdp_and_both_grow():
    history = [Mechanism(1.0, 0.1, 50)] * 5
    prv = accounting.epsilon(history, 1e-5, "prv")
    rdp = accounting.epsilon(history, 1e-5, "rdp")
    assert 0 < prv < rdp


def test_empty_history_is_zero_and_bad_inputs_raise():
    assert accounting.epsilon([], 1e-5) == 0.0
    with pytest.raises(ValueError, match="delta"):
        accounting.epsilon([Mechanism(1.0, 0.1, 1)], 0.0)
    with pytest.raises(ValueError, match="accountant"):
        accounting.epsilon([Mechanism(1.0, 0.1, 1)], 1e-5, "moments")
    with pytest.raises(ValueError, match="sample_rate"):
        Mechanism(1.0, 1.5, 1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        Mechanism(-1.0, 0.5, 1)


@pytest.mark.parametrize("name", [None, *accounting.ACCOUNTANTS])
def test_noise_for_target_stays_within_target(name):
    kwargs = {} if name is None else {"accountant": name}  # None: the defaults agree with each other
    sigma = accounting.noise_for_target(3.0, 1e-5, 0.1, 200, **kwargs)
    spent = accounting.epsilon([Mechanism(sigma, 0.1, 200)], 1e-5, **kwargs)
    assert spent <= 3.0
    assert spent > 2.97  # and it does not waste budget
    assert math.isfinite(sigma) and sigma > 0


def test_pld_noise_for_target_is_below_the_opacus_searches():
    # PLD is the tightest of the three, so it needs the least noise for the same ε.
    pld = accounting.noise_for_target(3.0, 1e-5, 0.25, 80, "pld")
    assert pld <= accounting.noise_for_target(3.0, 1e-5, 0.25, 80, "prv")
    assert pld < accounting.noise_for_target(3.0, 1e-5, 0.25, 80, "rdp")
    # Large ε needs σ well below 1, where the PLD grid is large; it must still calibrate.
    small = accounting.noise_for_target(50.0, 1e-5, 0.5, 4, "pld")
    assert 0.1 < small < 1 and accounting.epsilon([Mechanism(small, 0.5, 4)], 1e-5, "pld") <= 50.0


def test_pld_is_independent_of_opacus_and_falls_back_to_rdp_when_it_cannot_run():
    history = [Mechanism(1.1, 0.2, 30)]
    pld, prv = accounting.epsilon(history, 1e-5, "pld"), accounting.epsilon(history, 1e-5, "prv")
    assert pld == pytest.approx(prv, rel=0.02)
    # σ = 1e-9: PLD's grid cannot be built; the answer is RDP's (huge, but finite and sound).
    tiny = [Mechanism(1e-9, 1.0, 1)]
    assert accounting.epsilon(tiny, 1e-3, "pld") == accounting.epsilon(tiny, 1e-3, "rdp") > 1e6


HISTORIES = [
    [(1.1, 0.05, 20)],
    [(1.1, 0.05, 20), (0.9, 0.1, 10), (1.1, 0.05, 3)],  # a mechanism that comes back, its one-step PLD reused
    [(2.5, 0.01, 1000), (0.7, 0.3, 1)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_pld_with_each_mechanism_built_once_equals_dp_accountings_accountant(history):
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=accounting.PLD_INTERVAL)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    assert accounting.pld_epsilon(history, 1e-5) == acc.get_epsilon(1e-5)  # the same float, not only close
    assert accounting.pld_epsilon(history, 1e-5) == accounting.pld_epsilon(list(history), 1e-5)


@pytest.mark.parametrize("history", HISTORIES)
def test_the_audits_cached_rdp_equals_opacus_rdp_accountant(history):
    from fedsilo.audit.ledgers import _rdp_epsilon

    acc = RDPAccountant()
    acc.history = list(history)
    assert _rdp_epsilon(history, 1e-5) == acc.get_epsilon(delta=1e-5)
    assert _rdp_epsilon(history, 1e-6) == acc.get_epsilon(delta=1e-6)
