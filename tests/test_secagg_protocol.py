"""Secure aggregation end to end, in process: the unmasked sum is exact, dropouts are recovered
down to the threshold and nothing is released below it, and what a curious coordinator receives
from one department looks uniform."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare
from secagg_federation import expected_sum, federation, wire

from fedsilo.secagg import ProtocolViolation, SecAggAborted, decode_signed, encode_signed, required_bits
from fedsilo.secagg import masking

# A uniform source fails p > 1e-6 once in a million runs (the masks come from the OS CSPRNG and
# cannot be seeded); a biased mask at these sample sizes gives p many orders below it.
UNIFORM_P = 1e-6


def test_exact_sum_over_several_rounds_of_one_session():
    fed = federation(n=5, t=3, bits=32, length=64, window=3)
    fed.setup()
    for r in range(3):
        inputs = fed.inputs()
        assert np.array_equal(fed.round(r, inputs), expected_sum(inputs, fed.names, 32))


def test_signed_inputs_sum_exactly_at_the_required_bits():
    n, max_abs = 5, 10_000
    bits = required_bits(max_abs, n)
    fed = federation(n=n, t=3, bits=bits, length=32)
    fed.setup()
    rng = np.random.default_rng(1)
    signed = {name: rng.integers(-max_abs, max_abs + 1, 32) for name in fed.names}
    total = fed.round(0, {name: encode_signed(v, bits) for name, v in signed.items()})
    assert decode_signed(total, bits).tolist() == np.sum(list(signed.values()), axis=0).tolist()


def test_department_absent_from_key_agreement_is_simply_not_in_the_round():
    fed = federation(n=5, t=3)
    fed.setup(absent=["dept3"])
    inputs = fed.inputs()
    assert np.array_equal(fed.round(0, inputs), expected_sum(inputs, [n for n in fed.names if n != "dept3"], 32))


def test_department_dropped_before_its_masked_input_is_recovered():
    fed = federation(n=5, t=3)
    fed.setup()
    inputs = fed.inputs()
    total = fed.round(0, inputs, drop_before_mask=["dept1"])
    assert np.array_equal(total, expected_sum(inputs, [n for n in fed.names if n != "dept1"], 32))


def test_department_dropped_after_its_masked_input_is_recovered():
    fed = federation(n=5, t=3)
    fed.setup()
    inputs = fed.inputs()
    assert np.array_equal(fed.round(0, inputs, drop_before_unmask=["dept2"]), expected_sum(inputs, fed.names, 32))


def test_dropouts_in_one_round_do_not_affect_the_next():
    fed = federation(n=5, t=3, window=2)
    fed.setup()
    first = fed.inputs()
    fed.round(0, first, drop_before_mask=["dept0"])
    second = fed.inputs()
    assert np.array_equal(fed.round(1, second, drop_before_unmask=["dept4"]), expected_sum(second, fed.names, 32))


def test_two_dropouts_after_masking_still_exact_at_the_threshold():
    fed = federation(n=5, t=3)
    fed.setup()
    inputs = fed.inputs()
    assert np.array_equal(fed.round(0, inputs, drop_before_unmask=["dept0", "dept3"]),
                          expected_sum(inputs, fed.names, 32))


def test_loss_before_and_after_the_masked_input_in_one_round_aborts_with_nothing_released():
    # dept1's pair masks in dept2's y can only be removed by dept2's own seed with dept1: with both
    # gone, the round ends; the next round of the session works again.
    fed = federation(n=5, t=3, window=2)
    fed.setup()
    with pytest.raises(SecAggAborted, match="did not sign U3"):
        fed.round(0, fed.inputs(), drop_before_mask=["dept1"], drop_before_unmask=["dept2"])
    inputs = fed.inputs()
    assert np.array_equal(fed.round(1, inputs), expected_sum(inputs, fed.names, 32))


@pytest.mark.parametrize("stage", ["mask", "unmask"])
def test_below_the_threshold_the_round_aborts(stage):
    fed = federation(n=5, t=3)
    fed.setup()
    gone = ["dept0", "dept1", "dept2"]  # n - t + 1
    with pytest.raises(SecAggAborted, match="nothing is released"):
        if stage == "mask":
            fed.round(0, fed.inputs(), drop_before_mask=gone)
        else:
            fed.round(0, fed.inputs(), drop_before_unmask=gone)


def test_too_few_advertisements_abort_the_session():
    fed = federation(n=5, t=3)
    with pytest.raises(SecAggAborted):
        fed.setup(absent=["dept0", "dept1", "dept2"])


# --- the curious coordinator ----------------------------------------------------------------------

def _masked_words(x_value: int, bits: int = 32, length: int = 8192) -> np.ndarray:
    fed = federation(n=3, t=3, bits=bits, length=length, policy=_relaxed())
    fed.setup()
    x = np.full(length, x_value, dtype=np.uint64)
    name = fed.names[1]
    answer = fed.departments[name].mask(fed.coordinator.mask_request(name, 0), x)
    return masking.from_bytes(answer.masked, length, bits)


def _relaxed():
    from fedsilo.secagg import DepartmentPolicy
    return DepartmentPolicy(min_threshold=2, min_participants=2)


@pytest.mark.parametrize("x_value", [0, 12345])
def test_one_departments_masked_input_is_indistinguishable_from_uniform(x_value):
    y = _masked_words(x_value)
    low_bytes = y.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :4].ravel()  # the 32 bits in Z_2^32
    assert chisquare(np.bincount(low_bytes, minlength=256)).pvalue > UNIFORM_P
    assert chisquare(np.bincount((y >> np.uint64(28)).astype(np.int64), minlength=16)).pvalue > UNIFORM_P
    assert np.count_nonzero(y == np.uint64(x_value)) < 3  # x itself shows through nowhere


def test_a_second_mask_request_returns_the_same_y_never_a_second_input_under_one_mask():
    fed = federation(n=5, t=3)
    fed.setup()
    dept = fed.departments["dept0"]
    request = fed.coordinator.mask_request("dept0", 0)
    zeros = np.zeros(fed.params.vector_length, dtype=np.uint64)
    first = dept.mask(wire(request), zeros)
    second = dept.mask(wire(request), zeros + np.uint64(99))
    assert first.masked == second.masked
    # y - y' would be x - x' had the department masked twice.
    assert np.array_equal(masking.from_bytes(first.masked, 64, 32), masking.from_bytes(second.masked, 64, 32))


def test_a_round_outside_the_window_or_already_unmasked_is_refused():
    fed = federation(n=5, t=3, window=1)
    fed.setup()
    fed.round(0, fed.inputs())
    request = fed.coordinator.mask_request("dept0", 0)
    with pytest.raises(ProtocolViolation, match="already unmasked"):
        fed.departments["dept0"].mask(request, np.zeros(64, dtype=np.uint64))
    other = type(request)(**{**request.__dict__, "round": 1})
    with pytest.raises(ProtocolViolation, match="outside this session's window"):
        fed.departments["dept1"].mask(other, np.zeros(64, dtype=np.uint64))


def test_a_department_revealing_a_wrong_share_is_named_and_nothing_is_released():
    import dataclasses
    fed = federation(n=5, t=3)
    fed.setup()
    fed.mask(0, fed.inputs())
    coordinator = fed.coordinator
    assert coordinator.consistency_request(0) is None          # nobody dropped: no signatures needed
    request = coordinator.unmask_request(0)
    for name in fed.names:
        answer = fed.departments[name].unmask(wire(request))
        if name == "dept4":
            answer = dataclasses.replace(answer, shares={**answer.shares, "dept0": bytes(16)})
        coordinator.receive_unmasking(answer)
    with pytest.raises(ProtocolViolation, match="revealed by 'dept4' disagrees"):
        coordinator.unmask(0)


def test_an_unmasking_covering_other_departments_is_refused_by_the_coordinator():
    import dataclasses
    fed = federation(n=5, t=3)
    fed.setup()
    fed.mask(0, fed.inputs())
    fed.coordinator.consistency_request(0)
    answer = fed.departments["dept0"].unmask(fed.coordinator.unmask_request(0))
    with pytest.raises(ProtocolViolation, match="covers other departments"):
        fed.coordinator.receive_unmasking(dataclasses.replace(answer, seeds={"dept1": bytes(32)}))


def test_the_largest_window_a_policy_allows_deals_and_sums():
    from fedsilo.secagg import DepartmentPolicy
    fed = federation(n=3, t=3, length=4, window=1000, policy=DepartmentPolicy(max_window=1000))
    fed.setup()
    inputs = fed.inputs()
    assert np.array_equal(fed.round(999, inputs), expected_sum(inputs, fed.names, 32))
