"""Client-level DP at the coordinator: clipping, noise, Poisson sampling, accounting, budget."""

import json
import math
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from flower_messages import Grid, reply
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedsilo.server.central_dp import ClientLevelDP, CoordinatorBudgetExhausted, coordinator_ledger
from fedsilo.server.strategy import DepartmentFedAvg
from fedsilo.audit import audit_path
from fedsilo.shared.ledger import LedgerError

# Minutes of real simulations: the fast tier (`make test`, ≤ 10 min) keeps one real simulation,
# one TLS deployment, the intruder and the policy tests; `make test-all` runs these too.
pytestmark = [pytest.mark.usefixtures("serverapp_identity"), pytest.mark.slow]


class _NoNoise:
    """Zero noise, to check clipping and averaging exactly (the real noise is tested apart)."""

    def normal(self, loc, scale, size):
        return np.zeros(size)


class _Never:
    """A sampler that never picks anyone: every round's Poisson sample is empty."""

    def random(self):
        return 1.0


def _central(tmp_path, *, sigma=1.0, clip=1.0, q=1.0, delta=1e-3, budget=100.0, run_id="7"):
    inner = DepartmentFedAvg(fraction_train=1.0, min_available_nodes=1, min_train_nodes=1)
    return ClientLevelDP(
        inner, noise_multiplier=sigma, clipping_norm=clip, sample_rate=q, delta=delta,
        max_epsilon=budget, ledger=coordinator_ledger(tmp_path / "central"), run_id=run_id,
    )


def _global(shape=(2, 2)):
    return ArrayRecord({"w": Array(np.zeros(shape, dtype=np.float32))})


def test_updates_are_clipped_and_averaged_over_the_expected_sample(tmp_path):
    central = _central(tmp_path, sigma=1.0, clip=1.0)
    central._noise = _NoNoise()
    requests = list(central.configure_train(1, _global(), ConfigRecord(), Grid([1, 2, 3])))
    assert len(requests) == 3  # q = 1: everyone
    big = np.full((2, 2), 5.0, dtype=np.float32)  # norm 10 -> clipped to 1
    small = np.full((2, 2), 0.1, dtype=np.float32)  # norm 0.2 -> kept
    replies = [reply(requests[0], "a", big, n=1000), reply(requests[1], "b", small, n=1), reply(requests[2], "c", status="refused")]
    arrays, _ = central.aggregate_train(1, replies)
    # Unweighted: num-examples 1000 vs 1 must not matter; the refusal adds zero; divide by q·N = 3.
    expected = (np.full((2, 2), 0.5) + small) / 3
    assert np.allclose(arrays["w"].numpy(), expected, atol=1e-6)
    assert arrays["w"].numpy().dtype == np.float32
    assert central.last_report.refused == {"c": "budget"}
    (entry,) = central.ledger.entries
    assert (entry.noise_multiplier, entry.sample_rate, entry.steps, entry.max_grad_norm) == (1.0, 1.0, 1, 1.0)
    assert entry.accountant == "pld" and entry.department == "coordinator" and entry.num_examples == 3


def test_noise_is_released_even_when_the_sample_is_empty(tmp_path):
    central = _central(tmp_path, sigma=2.0, clip=0.5, q=0.25)
    central._sampler = _Never()
    assert list(central.configure_train(1, _global((200, 100)), ConfigRecord(), Grid(range(8)))) == []
    arrays, _ = central.aggregate_train(1, [])
    noise = arrays["w"].numpy()
    # std = σ·C / (q·N) = 2 · 0.5 / (0.25 · 8) = 0.5; 20,000 draws pin it within a few percent.
    assert noise.std() == pytest.approx(0.5, rel=0.05) and abs(noise.mean()) < 0.02
    assert len(central.ledger.entries) == 1  # an empty sample is still a release, and accounted


def test_departments_are_poisson_sampled(tmp_path):
    central = _central(tmp_path, q=0.3)
    counts = []
    for rnd in range(1, 4):
        requests = list(central.configure_train(rnd, _global(), ConfigRecord(), Grid(range(1000))))
        assert sorted(central.strategy.asked) == sorted(r.metadata.dst_node_id for r in requests)
        counts.append(len(requests))
        central.aggregate_train(rnd, [])
    # Binomial(1000, 0.3): mean 300, sd 14.5; a fixed-size sample would give exactly 300 every time.
    assert all(abs(c - 300) < 75 for c in counts) and len(set(counts)) > 1


def _dp_accounting_pld(sigma, q, rounds, delta):
    """Independent: dp-accounting's PLD built directly from the Gaussian mechanism."""
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sensitivity=1.0, sampling_prob=q,
        value_discretization_interval=1e-4, pessimistic_estimate=True,
    )
    return pld.self_compose(rounds).get_epsilon_for_delta(delta)


def _dp_accounting_rdp(sigma, q, rounds, delta):
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma,q", [(1.1, 0.2), (0.9, 1.0)])
def test_recorded_epsilon_matches_dp_accounting_computed_independently(tmp_path, sigma, q):
    central = _central(tmp_path, sigma=sigma, q=q, delta=1e-3)
    central._sampler = _Never()
    for rnd in range(1, 9):
        central.configure_train(rnd, _global(), ConfigRecord(), Grid(range(10)))
        central.aggregate_train(rnd, [])
    entries = central.ledger.entries
    assert [e.round for e in entries] == list(range(1, 9))
    for rounds in (1, 4, 8):
        recorded = entries[rounds - 1].epsilon
        pld = _dp_accounting_pld(sigma, q, rounds, 1e-3)
        assert recorded == pytest.approx(pld, rel=0.01)  # finer grid: same answer, from above
        assert recorded >= pld * (1 - 1e-3)
        assert recorded <= _dp_accounting_rdp(sigma, q, rounds, 1e-3)  # PLD is tighter than RDP
    if q < 1:  # amplification by sampling: far below the same noise without it
        assert entries[-1].epsilon < 0.5 * _dp_accounting_pld(sigma, 1.0, 8, 1e-3)


def test_budget_stops_before_it_is_exceeded_and_survives_a_restart(tmp_path):
    sigma, q, delta = 1.0, 0.5, 1e-3
    budget = _dp_accounting_pld(sigma, q, 3, delta) * 1.02  # room for 3 releases, not 4
    central = _central(tmp_path, sigma=sigma, q=q, delta=delta, budget=budget)
    central._sampler = _Never()
    for rnd in range(1, 4):
        central.configure_train(rnd, _global(), ConfigRecord(), Grid(range(4)))
        central.aggregate_train(rnd, [])
    with pytest.raises(CoordinatorBudgetExhausted, match="past max-epsilon"):
        central.configure_train(4, _global(), ConfigRecord(), Grid(range(4)))
    assert len(central.ledger.entries) == 3 and central.epsilon <= budget
    # A new coordinator process on the same ledger starts from the same history.
    again = _central(tmp_path, sigma=sigma, q=q, delta=delta, budget=budget, run_id="8")
    assert again.epsilon == central.epsilon
    with pytest.raises(CoordinatorBudgetExhausted):
        again.configure_train(1, _global(), ConfigRecord(), Grid(range(4)))


def test_a_tampered_coordinator_ledger_is_refused(tmp_path):
    central = _central(tmp_path)
    central._sampler = _Never()
    central.configure_train(1, _global(), ConfigRecord(), Grid([1]))
    central.aggregate_train(1, [])
    path = central.ledger.path
    raw = json.loads(path.read_text())
    raw["epsilon"] = raw["epsilon"] / 2
    path.write_text(json.dumps(raw) + "\n")
    with pytest.raises(LedgerError, match="signature"):
        _central(tmp_path)


def test_constructor_validates_its_arguments(tmp_path):
    inner = DepartmentFedAvg(fraction_train=1.0)
    ledger = coordinator_ledger(tmp_path / "c")
    kwargs = dict(noise_multiplier=1.0, clipping_norm=1.0, sample_rate=0.5, delta=1e-3, max_epsilon=5.0, ledger=ledger, run_id="1")
    for bad, match in (({"noise_multiplier": 0.0}, "noise_multiplier"), ({"clipping_norm": -1.0}, "clipping_norm"),
                       ({"sample_rate": 1.5}, "sample_rate"), ({"max_epsilon": math.inf}, "max_epsilon")):
        with pytest.raises(ValueError, match=match):
            ClientLevelDP(inner, **{**kwargs, **bad})
    with pytest.raises(ValueError, match="fraction_train"):
        ClientLevelDP(DepartmentFedAvg(fraction_train=0.5), **kwargs)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def central_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("central") / "R"
    result = subprocess.run(
        [sys.executable, "-m", "fedsilo", "simulate", "--departments", "3", "--rounds", "3", "--central-dp",
         "--fraction-train", "0.7", "--central-noise-multiplier", "1.2", "--central-clip-norm", "2",
         "--central-delta", "0.01", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_simulation_with_central_dp_records_and_audits_both_guarantees(central_run):
    out, result = central_run
    assert "Client-level DP at the coordinator" in result.stdout
    summary = json.loads((out / "latest" / "summary.json").read_text())
    releases = [r["central"] for r in summary["rounds"]]
    assert len(releases) == 3 and all(r["population"] == 3 for r in releases)
    for r, trained in zip(releases, (r["trained"] for r in summary["rounds"])):
        assert len(trained) <= r["sampled"]
    ledger = [json.loads(line) for line in (out / "central" / "coordinator.jsonl").read_text().splitlines()]
    assert [e["epsilon"] for e in ledger] == [r["epsilon"] for r in releases]
    assert ledger[-1]["epsilon"] == pytest.approx(_dp_accounting_pld(1.2, 0.7, 3, 0.01), rel=0.01)
    audit = audit_path(out)
    assert audit.ok, audit.to_json()
    assert audit.central.id == "coordinator" and audit.central.rounds == 3 and audit.central.signatures == "valid"
    # Every department that was ever sampled has a ledger (at q = 0.7 one may never be, 3 rounds running);
    # the coordinator is not counted as a department.
    sampled = {name for r in summary["rounds"] for name in [*r["trained"], *r["refused"]]}
    assert sampled and len(audit.departments) == len(sampled)


def test_audit_catches_a_truncated_coordinator_ledger(central_run, tmp_path):
    import shutil

    out, _ = central_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=True, ignore=shutil.ignore_patterns("model.safetensors", "flower.log"))
    ledger = copy / "central" / "coordinator.jsonl"
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:-1]))
    result = subprocess.run([sys.executable, "-m", "fedsilo", "audit", str(copy), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert not report["ok"] and not report["central"]["verified"]
    assert any("coordinator's ledger has no entry" in p for p in report["central"]["problems"])


def test_central_delta_must_be_below_one_over_departments(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedsilo", "simulate", "--departments", "4", "--rounds", "1", "--central-dp",
         "--central-delta", "0.3", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "--central-delta" in result.stderr and "Traceback" not in result.stderr


def test_deployed_coordinator_signs_with_its_tls_key_and_the_audit_checks_the_certificate(tmp_path):
    from fedsilo.certs import authority

    certs = authority.init(tmp_path / "certs")
    folder = tmp_path / "central-ledger"
    inner = DepartmentFedAvg(fraction_train=1.0, min_available_nodes=1, min_train_nodes=1)
    central = ClientLevelDP(inner, noise_multiplier=1.0, clipping_norm=1.0, sample_rate=1.0, delta=1e-3,
                            max_epsilon=50.0, ledger=coordinator_ledger(folder, str(certs.coordinator_key)), run_id="1")
    central.configure_train(1, _global(), ConfigRecord(), Grid([1]))
    central.aggregate_train(1, [])
    assert (folder / "coordinator.pub").exists() and not (folder / "coordinator.key").exists()
    (folder / "coordinator.pub").unlink()  # only the certificate is left to check against
    result = audit_path(folder, tmp_path / "certs")
    assert result.ok and result.central.signatures == "valid", result.to_json()
    other = authority.init(tmp_path / "other")  # a different coordinator's certificate
    forged = audit_path(folder, tmp_path / "other")
    assert not forged.ok and any("no public key with fingerprint" in p for p in forged.central.problems)
    assert other.coordinator_cert.exists()
