"""Client-level DP at the coordinator: a strategy wrapper around :class:`DepartmentFedAvg`.

Record-level DP-SGD at a department protects each *example* of that
department.  This wrapper adds the other guarantee of DP-FedAvg (McMahan et al.,
2018): the released global model hides whether any one *department*, with all
of its data, took part at all.

Each round:

1. **budget** — a dry run: would one more release pass the coordinator's
   ``central-max-epsilon``?  If so the round is not started (nothing is sent);
2. **sampling** — every connected department is included independently with
   probability ``q`` (Poisson sampling, drawn from OS entropy).  This is what the
   accountant's amplification by sampling assumes; Flower's own sampling draws a
   fixed-size sample with ``random.sample`` and its accountant claims no
   amplification;
3. **clipping** — each department's update ``Δ = w_dept - w_global`` is scaled to
   L2 norm at most ``C`` (all layers together);
4. **noise** — Gaussian noise of standard deviation ``σ·C`` is added to the *sum*
   of clipped updates, always, even when nobody was sampled or everybody refused
   (an un-noised "no update" would reveal that the sample was empty);
5. **average** — the noisy sum is divided by the *expected* number of sampled
   departments ``q·N``, a public number, so every department weighs the same and
   one department moves the sum by at most ``C`` (weighting by ``num-examples``
   would break that bound);
6. **ledger** — the release (σ, q, one step) and the coordinator's whole-history
   ε (dp-accounting PLD) are appended to the coordinator's signed ledger *before*
   the new model is returned; if the append fails, nothing is released.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsilo.shared.accounting import Mechanism, accountant_for
from fedsilo.shared.skellam import SkellamMechanism
from fedsilo.shared.budget import BudgetDecision, BudgetGuard
from fedsilo.shared.config import RunSettings
from fedsilo.shared.ledger import COORDINATOR, PrivacyLedger, ledger_path
from fedsilo.shared.signing import Signer, simulated_identity, write_file

from .strategy import DepartmentFedAvg, RoundReport

# dp-accounting's PLD: the tightest sound accountant for Poisson-subsampled Gaussians.
CENTRAL_ACCOUNTANT = "pld"


class CoordinatorBudgetExhausted(RuntimeError):
    """One more client-level release would pass the coordinator's budget."""


@dataclass(frozen=True)
class CentralRelease:
    """What one round released, for the summary (nothing data-dependent)."""

    round: int
    population: int
    sampled: int
    epsilon: float
    noise_std: float


class ClientLevelDP(Strategy):
    """Wrap a :class:`DepartmentFedAvg` to make the global model client-level DP.

    Parameters
    ----------
    strategy : DepartmentFedAvg
        Classifies replies (trained, refused, rejected, failed); it must send to
        every connected department (``fraction_train=1.0``): this wrapper samples.
    noise_multiplier : float
        σ: the noise standard deviation over the clipping norm.
    clipping_norm : float
        C: the largest L2 norm of one department's update.
    sample_rate : float
        q: each department's probability of being sampled in a round.
    delta : float
        δ of the coordinator's ε; should be well below 1/number of departments.
    max_epsilon : float
        The coordinator's budget over its whole ledger (all runs).
    ledger : PrivacyLedger
        The coordinator's signed ledger (department name ``coordinator``).
    run_id : str
        The Flower run, recorded with every release.
    """

    def __init__(
        self,
        strategy: DepartmentFedAvg,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        sample_rate: float,
        delta: float,
        max_epsilon: float,
        ledger: PrivacyLedger,
        run_id: str,
        distributed: SkellamMechanism | None = None,
    ) -> None:
        if not isinstance(strategy, DepartmentFedAvg):
            raise ValueError("ClientLevelDP wraps a DepartmentFedAvg (it needs its reply classification)")
        if strategy.fraction_train != 1.0:
            raise ValueError("the wrapped strategy must send to every department (fraction_train=1.0); ClientLevelDP samples")
        if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
        if not (clipping_norm > 0 and math.isfinite(clipping_norm)):
            raise ValueError(f"clipping_norm must be positive and finite, got {clipping_norm}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if ledger.department != COORDINATOR:
            raise ValueError(f"the coordinator's ledger must be kept under the name '{COORDINATOR}'")
        self.strategy = strategy
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.guard = BudgetGuard(max_epsilon, delta, CENTRAL_ACCOUNTANT, who="the coordinator")
        self.ledger = ledger
        self.run_id = str(run_id)
        # Under secure aggregation the departments clip and noise (client-level distributed DP): this is the
        # Skellam release of one round, q = 1 (every department of the session is asked).
        self.distributed = distributed
        if distributed is not None and getattr(strategy, "secure", None) is None:
            raise ValueError("client-level distributed DP wraps a secure-aggregation strategy")
        self.last_release: CentralRelease | None = None
        self._sampler = secrets.SystemRandom()
        self._noise = np.random.default_rng()  # seeded from OS entropy
        self._current: ArrayRecord | None = None
        self._population = 0
        self._decision: BudgetDecision | None = None
        self._seen = 0  # ledger entries the decision was computed from

    # ------------------------------------------------------------------ state
    @property
    def mechanism(self) -> Mechanism | SkellamMechanism:
        """One round's release: one Gaussian step on a Poisson sample at rate q (or the departments' Skellam one)."""
        return self.distributed or Mechanism(self.noise_multiplier, self.sample_rate, 1)

    @property
    def epsilon(self) -> float:
        """The coordinator's whole-history ε so far, as recorded in its ledger."""
        return self.ledger.epsilon

    @property
    def last_report(self) -> RoundReport:
        return self.strategy.last_report

    def would_exceed(self) -> BudgetDecision:
        """Dry run: ε before and after one more release; nothing is recorded."""
        self.ledger.reload()
        return self.guard.would_exceed(self.ledger.history, self.mechanism, self.ledger.epsilon)

    # ------------------------------------------------------------------ rounds
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        decision = self.would_exceed()
        if not decision.allowed:
            raise CoordinatorBudgetExhausted(decision.reason)
        self._decision, self._seen = decision, len(self.ledger.entries)
        self._current = arrays
        everyone = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._population = len(everyone)
        if self.distributed is not None:  # the session's every member, each clipping and noising its own update
            return everyone
        sampled = [m for m in everyone if self._sampler.random() < self.sample_rate]
        self.strategy.asked = [m.metadata.dst_node_id for m in sampled]
        log(INFO, "client-level DP: sampled %d of %d departments (q=%g)", len(sampled), len(everyone), self.sample_rate)
        return sampled

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._current is None or self._decision is None:
            raise RuntimeError("aggregate_train called before configure_train")
        if self.distributed is not None:
            return self._aggregate_distributed(server_round, replies)
        self.strategy.classify(server_round, replies)
        current = {key: array.numpy() for key, array in self._current.items()}
        clipped_sum = {key: np.zeros(value.shape, dtype=np.float64) for key, value in current.items()}
        # The updates as fedsilo.server.replies read them: the global model's layers, dtypes and
        # shapes, finite and magnitude-bounded, so every delta and its norm are finite in float64.
        for update in self.strategy.accepted:
            delta = {key: update.arrays[key].astype(np.float64) - current[key] for key in current}
            norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
            scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            for key, d in delta.items():
                clipped_sum[key] += scale * d
        noise_std = self.noise_multiplier * self.clipping_norm
        expected = max(self.sample_rate * self._population, 1.0)
        new = {
            key: (current[key] + (clipped_sum[key] + self._noise.normal(0.0, noise_std, current[key].shape)) / expected)
            .astype(current[key].dtype)
            for key in current
        }
        # Record before release: a release the ledger does not hold must never leave.
        entry = self.ledger.append(
            run_id=self.run_id,
            round=server_round,
            mechanism=self.mechanism,
            max_grad_norm=self.clipping_norm,
            delta=self.delta,
            accountant=CENTRAL_ACCOUNTANT,
            epsilon=self._decision.epsilon_after,
            num_examples=self._population,
            expected_seq=self._seen,
        )
        self.last_release = CentralRelease(
            server_round, self._population, len(self.strategy.asked), entry.epsilon, noise_std / expected
        )
        self._decision = None
        return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in new.items()}), None

    def _aggregate_distributed(self, server_round: int, replies: Iterable[Message]):
        """The secure sum of the departments' clipped, noised updates; charged before it is released."""
        new, metrics = self.strategy.aggregate_train(server_round, replies)  # SecAggAborted: nothing released
        if new is None:  # no masked update to unmask: nothing released, nothing charged
            self.last_release, self._decision = None, None
            return new, metrics
        plan = self.strategy.secure.codec
        history = self.ledger.history
        entry = self.ledger.append(
            run_id=self.run_id, round=server_round, mechanism=self.distributed, max_grad_norm=self.clipping_norm,
            delta=self.delta, accountant=accountant_for([*history, self.distributed], CENTRAL_ACCOUNTANT),
            epsilon=self._decision.epsilon_after, num_examples=self._population, expected_seq=self._seen,
            setup=plan.setup(),
        )
        noise_std = math.sqrt(self.distributed.mu) / plan.granularity  # the sum's, in update units
        self.last_release = CentralRelease(server_round, self._population, self._population, entry.epsilon,
                                           noise_std / max(self._population, 1))
        self._decision = None
        return new, metrics

    # ------------------------------------------------------------------ the rest is the wrapped strategy's
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
        log(
            INFO,
            "client-level DP: σ=%g, C=%g, q=%g, δ=%g, budget ε≤%g (%s)",
            self.noise_multiplier, self.clipping_norm, self.sample_rate, self.delta,
            self.guard.max_epsilon, CENTRAL_ACCOUNTANT.upper(),
        )



def coordinator_ledger(folder: Path, signing_key: str = "") -> PrivacyLedger:
    """Open (or start) the coordinator's ledger in ``folder``.

    Deployed, ``signing_key`` is the coordinator's TLS key (EC P-384); its public
    key is written beside the ledger as ``coordinator.pub`` for the audit, which
    can also check it against ``coordinator.crt``.  Simulated, a key is generated
    beside the ledger, as for the simulated departments.
    """
    folder = Path(folder)
    if signing_key:
        signer = Signer.from_file(signing_key)
        public = folder / f"{COORDINATOR}.pub"
        if not public.exists():
            line = signer.public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            write_file(public, line + b" fedsilo-coordinator\n", private=False)
    else:
        signer = simulated_identity(folder, COORDINATOR)
    return PrivacyLedger(ledger_path(folder, COORDINATOR), COORDINATOR, signer)


def client_level_dp(settings: RunSettings, strategy: DepartmentFedAvg, out_dir: Path, run_id: str) -> ClientLevelDP:
    """The wrapper a run's settings ask for (``central-*`` keys, ``fraction-train`` as q)."""
    folder = Path(settings.central_ledger).expanduser() if settings.central_ledger else Path(out_dir) / "central"
    secure = getattr(strategy, "secure", None)
    distributed = None
    if secure is not None:  # secure aggregation: the departments clip and noise (client-level distributed DP)
        from fedsilo.shared.distributed_dp import client_level_mechanism

        distributed = client_level_mechanism(secure.layout, settings)
    return ClientLevelDP(
        strategy,
        noise_multiplier=settings.central_noise_multiplier,
        clipping_norm=settings.central_clip_norm,
        sample_rate=settings.fraction_train,
        delta=settings.central_delta,
        max_epsilon=settings.central_max_epsilon,
        ledger=coordinator_ledger(folder, settings.central_signing_key),
        run_id=run_id,
        distributed=distributed,
    )
