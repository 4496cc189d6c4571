"""Distributed DP's round: the codec both sides share, a department's noisy integer sum, and a real masked round.

The department's ClientApp answers real Flower messages from a real CoordinatorSession (as in
test_secagg_department_wiring.py); the unmasked sum decodes to a noisy DP-SGD gradient, and each
department's ledger charges one Skellam round.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from test_secagg_department_wiring import N, RUN, SECAGG, Federation, declined, ok

from fedsilo.client.distributed_dp import noisy_integer_sum
from fedsilo.secagg import records
from fedsilo.secagg.masking import add
from fedsilo.secagg.messages import MaskedInput, Unmasking
from fedsilo.shared.csprng import NoiseStream
from fedsilo.shared.data import federation_data_test
from fedsilo.shared.distributed_dp import DistributedDpPlan, rotation_seed
from fedsilo.shared.ledger import read_ledgers
from fedsilo.shared.models import build_model, loss_function
from fedsilo.shared.protocol import ARRAYS_KEY, STATUS_KEY
from fedsilo.shared.quantize import unflatten


def _plan(layout, sigma=1.0, q=0.5, n=N, t=3, c=0, **kwargs) -> DistributedDpPlan:
    return DistributedDpPlan.of(layout, max_grad_norm=1.0, noise_multiplier=sigma, sample_rate=q, participants=n,
                                threshold=t, colluders=c, max_weight=1 << 20, **kwargs)


def test_the_codec_decodes_the_sum_of_encoded_vectors_exactly():
    plan = _plan({"w": (3, 5), "b": (5,)})
    assert plan.dimension == 20 and plan.rotated_dimension == 32 and plan.vector_length == 33
    rng = np.random.default_rng(0)
    sums = [rng.integers(-10**6, 10**6, plan.rotated_dimension) for _ in range(N)]
    sizes = [100, 250, 75]
    total = np.zeros(plan.vector_length, dtype=np.uint64)
    for s, w in zip(sums, sizes):
        total = add(total, plan.encode(s, w), plan.modulus_bits)
    gradient, size = plan.decode(total, seed=7)
    assert size == sum(sizes)
    flat = unflatten(np.sum(sums, axis=0).astype(float), 7, plan.dimension) / (plan.granularity * plan.sample_rate * size)
    assert np.allclose(np.concatenate([gradient["b"].ravel(), gradient["w"].ravel()]), flat)
    # The trust rule: each share is μ / (t − c); μ = σ² Δ2².
    assert plan.mu == pytest.approx(plan.sensitivity[1] ** 2)
    assert _plan({"w": (4,)}, c=1).share == pytest.approx(_plan({"w": (4,)}).mu / 2)
    with pytest.raises(ValueError, match="colluders < threshold"):
        _plan({"w": (4,)}, c=3)


def test_a_noisy_integer_sum_is_the_sum_of_clipped_gradients_and_bounds_any_record():
    data = federation_data_test("digits", "label", ())
    data = data.subset(np.arange(40)) if hasattr(data, "subset") else data
    torch.manual_seed(0)
    model = build_model("auto", data.input_shape, data.num_classes, data.kind, seed=1)
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = _plan(layout, sigma=1e-6, q=1.0)  # every record, noise far below the rounding
    stream = NoiseStream.for_tests(bytes(32))
    noisy, _ = noisy_integer_sum(model, data, plan, seed=3, stream=stream)
    decoded = unflatten(noisy.astype(float), 3, plan.dimension) / plan.granularity
    # Ground truth: one backward per record, clipped to C = 1, summed in the layout's key order.
    criterion = loss_function(data.task)
    x = torch.from_numpy(np.ascontiguousarray(data.x)).view(-1, *data.input_shape)
    y = torch.from_numpy(data.y)
    params = dict(model.named_parameters())
    expected = np.zeros(plan.dimension)
    for i in range(len(x)):
        model.zero_grad()
        criterion(model(x[i:i + 1]), y[i:i + 1]).backward()
        flat = np.concatenate([params[k].grad.detach().numpy().ravel().astype(float) for k, _ in plan.layout])
        expected += flat * min(1.0, 1.0 / (np.linalg.norm(flat) + 1e-6))
    # Rounding adds at most √D/γ per record in norm (Kairouz et al.'s bound); here far less.
    assert np.linalg.norm(decoded - expected) <= len(x) * math.sqrt(plan.rotated_dimension) / plan.granularity
    assert np.linalg.norm(decoded - expected) < 0.01 * np.linalg.norm(expected)


class DistributedFederation(Federation):
    def __init__(self, root, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.run_config.update({"distributed-dp": True, "noise-multiplier": 1.0, "sample-rate": 0.1,
                                "ddp-colluders": 0, "max-grad-norm": 1.0})

    def codec(self) -> DistributedDpPlan:
        return _plan({k: v.shape for k, v in self.global_arrays.items()}, sigma=1.0, q=0.1)


def test_a_distributed_round_releases_one_noisy_gradient_and_charges_a_skellam_round(tmp_path, serverapp_identity):
    fed = DistributedFederation(tmp_path)
    coord = fed.open_session()
    for i, name in enumerate(fed.names):
        reply = fed.train(i, 1, coord.mask_request(name, 1))
        assert reply.content[STATUS_KEY]["status"] == "trained", dict(reply.content[STATUS_KEY])
        assert ARRAYS_KEY not in reply.content
        coord.receive_masked(records.from_record(reply.content[SECAGG], MaskedInput))
    unmask = coord.unmask_request(1)
    for i in range(N):
        coord.receive_unmasking(ok(fed.query(i, records.ACTION_UNMASK, unmask), Unmasking))
    gradient, size = fed.codec().decode(coord.unmask(1), rotation_seed(RUN, 1))
    assert size > 0 and set(gradient) == set(fed.global_arrays)
    assert all(np.all(np.isfinite(g)) for g in gradient.values())
    ledgers = read_ledgers(fed.ledger_dir)
    assert len(ledgers) == N
    plan = fed.codec()
    for ledger in ledgers.values():
        (entry,) = ledger.entries
        assert entry.kind == "skellam" and entry.version == 4 and entry.steps == 1
        assert entry.mu == pytest.approx(plan.mu) and entry.threshold == 3 and entry.colluders == 0
        assert entry.epsilon > 0 and entry.accountant == "rdp-skellam"
    # A plain train request under distributed DP: declined, nothing charged.
    declined(fed.train(0, 2), "distributed DP")


def _skellam_ledger(tmp_path, plan: DistributedDpPlan, epsilon_scale: float = 1.0, l2_scale: float = 1.0,
                    gaussian_rounds: int = 0, gaussian_scale: float = 1.0):
    """Three Skellam rounds, after ``gaussian_rounds`` DP-SGD rounds recorded by PLD (× ``gaussian_scale``)."""
    from fedsilo.shared import accounting
    from fedsilo.shared.ledger import PrivacyLedger
    from fedsilo.shared.signing import simulated_identity
    from fedsilo.shared.skellam import SkellamMechanism

    signer = simulated_identity(tmp_path, "dept")
    ledger = PrivacyLedger(tmp_path / "dept.jsonl", "dept", signer)
    l1, l2 = plan.sensitivity
    mechanism = SkellamMechanism(plan.mu, l1, l2 * l2_scale, plan.sample_rate, 1)
    history = []
    for rnd in range(1, gaussian_rounds + 1):
        history.append(accounting.Mechanism(1.1, 0.05, 20))
        ledger.append(run_id="plain", round=rnd, mechanism=history[-1], max_grad_norm=1.0, delta=1e-5,
                      accountant="pld", epsilon=accounting.epsilon(history, 1e-5, "pld") * gaussian_scale,
                      num_examples=500)
    for rnd in (1, 2, 3):
        history.append(mechanism)
        ledger.append(run_id="r", round=rnd, mechanism=mechanism, max_grad_norm=1.0, delta=1e-5, accountant="rdp",
                      epsilon=accounting.epsilon(history, 1e-5) * epsilon_scale, num_examples=500,
                      setup=plan.setup())
    return tmp_path / "dept.jsonl"


def test_the_audit_re_derives_a_distributed_dp_ledger_with_its_own_code(tmp_path):
    from fedsilo.audit.ledgers import audit_ledger
    from fedsilo.audit import skellam_check
    from fedsilo.shared import skellam

    plan = _plan({"w": (100,)}, sigma=0.8, q=0.05)
    # The two code paths agree on the mechanism's RDP (vectorized vs scalar, term by term).
    mechanism = plan.mechanism(1)
    for alpha in (2, 3, 17, 64, 256):
        ours = float(skellam.poisson_subsampled_rdp(
            lambda a: skellam.skellam_rdp(plan.mu, *plan.sensitivity, a), plan.sample_rate, [alpha])[0])
        assert ours == pytest.approx(skellam_check.subsampled_skellam(alpha, mechanism.mu, mechanism.l1,
                                                                      mechanism.l2, plan.sample_rate), rel=1e-9)
    honest = audit_ledger(_skellam_ledger(tmp_path / "a", plan))
    assert not honest.problems and honest.epsilon_rdp == pytest.approx(honest.epsilon, rel=1e-9)
    assert any("distributed DP" in f and "at most 0 of 3" in f for f in honest.findings)
    # An ε written below the re-derived one, and a sensitivity below what the rounding implies: both named.
    low = audit_ledger(_skellam_ledger(tmp_path / "b", plan, epsilon_scale=0.9))
    assert len([p for p in low.problems if "budget under-reported" in p and "re-derived RDP" in p]) == 3
    small = audit_ledger(_skellam_ledger(tmp_path / "c", plan, l2_scale=0.5))
    assert any("below what its rounding set-up implies" in p for p in small.problems)
    # Gaussian rounds first, recorded by PLD (tighter than RDP): checked as Gaussian rounds, then the mixed history.
    mixed = audit_ledger(_skellam_ledger(tmp_path / "d", plan, gaussian_rounds=2))
    assert not mixed.problems, mixed.problems
    assert mixed.epsilon_rdp == pytest.approx(mixed.epsilon, rel=1e-9)
    early = audit_ledger(_skellam_ledger(tmp_path / "e", plan, gaussian_rounds=2, gaussian_scale=0.9))
    assert [p.split(":")[0] for p in early.problems] == ["entry seq 0", "entry seq 1"], early.problems


def test_client_level_updates_are_clipped_rounded_and_noised_and_sum_to_the_clipped_updates():
    """Client-level distributed DP: each department's whole Δ is the unit, clipped to central-clip-norm."""
    from fedsilo.client.distributed_dp import noisy_client_update
    from fedsilo.shared.config import RunSettings

    settings = RunSettings.from_run_config({"central-dp": True, "central-noise-multiplier": 1e-3,
                                            "central-clip-norm": 2.0})
    layout = {"w": (20, 5), "b": (5,)}
    plan = DistributedDpPlan.client_level(layout, settings, 3, 3)
    rng = np.random.default_rng(7)
    updates = []
    for norm in (0.5, 3.0, 40.0):  # under, over and far over the clip norm
        w, b = rng.normal(size=(20, 5)), rng.normal(size=5)
        scale = norm / math.sqrt(float((w * w).sum() + (b * b).sum()))
        updates.append({"w": w * scale, "b": b * scale})
    seed = rotation_seed("run", 1)
    stream = NoiseStream.for_tests(b"k" * 32)
    vectors = [plan.encode(noisy_client_update(u, plan, seed, stream), 1) for u in updates]
    total = vectors[0]
    for v in vectors[1:]:
        total = add(total, v, plan.modulus_bits)
    mean, count = plan.decode(total, seed)
    assert count == 3
    clipped = [{k: v * min(1.0, 2.0 / math.sqrt(sum(float((a * a).sum()) for a in u.values()))) for k, v in u.items()}
               for u in updates]
    for key in layout:  # within the rounding: 1/γ an integer unit, unbiased
        error = mean[key] - sum(c[key] for c in clipped) / 3
        assert np.abs(error).max() < 3 / plan.granularity and abs(error.mean()) < 0.5 / plan.granularity, key
    # One department's contribution is bounded whatever its Δ: the rounded vector's norm is at most Δ2.
    alone = noisy_client_update({"w": np.full((20, 5), 1e6), "b": np.zeros(5)},
                                dataclasses.replace(plan, noise_multiplier=1e-9), seed, stream)
    assert np.linalg.norm(alone.astype(np.float64)) <= plan.sensitivity[1] + 1.0
    with pytest.raises(ValueError, match="layout"):
        noisy_client_update({"w": np.zeros((20, 5))}, plan, seed, stream)


def test_a_department_plans_its_gaussian_rounds_on_a_history_holding_skellam_rounds():
    """The target covers the whole history, Skellam rounds included (measured in RDP, as the guard measures it)."""
    from fedsilo.client.budget_guard import PlanError, plan_round
    from fedsilo.client.policy import Terms
    from fedsilo.shared import accounting
    from fedsilo.shared.budget import BudgetGuard
    from fedsilo.shared.config import RunSettings

    plan = _plan({"w": (9354,)}, sigma=1.0, q=0.1)
    prior = [accounting.Mechanism(1.0, 0.125, 8), plan.mechanism(1), plan.mechanism(1)]
    spent = accounting.epsilon(prior, 1e-5)
    terms = Terms(True, 10.0, 1e-5, "pld")
    settings = RunSettings.from_run_config({"target-epsilon": spent + 1.0, "num-server-rounds": 2, "max-epsilon": 10.0})
    planned = plan_round(settings, terms, 479, prior)
    guard, history = BudgetGuard(10.0, 1e-5, "pld"), list(prior)
    for _ in range(2):
        decision = guard.would_exceed(history, planned)
        assert decision.allowed
        history.append(planned)
    assert spent + 0.98 <= decision.epsilon_after <= spent + 1.0  # the run spends its target, no more
    with pytest.raises(PlanError, match="already holds"):  # a target the Skellam rounds already passed
        plan_round(RunSettings.from_run_config({"target-epsilon": spent - 0.1, "num-server-rounds": 2}), terms, 479,
                   prior)
    with pytest.raises(TypeError, match="Gaussian rounds only"):
        accounting.merge_history(prior)
