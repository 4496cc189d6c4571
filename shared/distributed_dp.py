"""Distributed DP's round, as both sides agree on it: the plan, the vector layout and its codec.

A distributed-DP round is one DP-SGD step over the federation
(docs/explanation/distributed-dp.md).  Both sides derive every number of it from
public inputs only — the run's settings, the model's layout, the secure-aggregation
session's threshold and participants — so that a department checks, and never
takes on trust, what it is asked to add:

* the rotated dimension ``D`` (:func:`~fedsilo.shared.quantize.padded_dim` of the
  model's float coordinates) and the scaled clip norm ``c = γ·C``;
* one record's sensitivity ``(Δ1, Δ2)`` after rounding, and the Skellam variance of
  the noise in the sum, ``μ = σ² Δ2²`` (σ: the run's noise multiplier);
* each department's share ``μ / (t − c)``: with threshold ``t`` (a released sum has
  at least ``t`` contributions, the department's own among them) and ``c`` assumed
  colluders, at least ``t − c`` honest shares are in it;
* the modulus: ``n`` departments' rows plus all their shares do not wrap, except with
  probability ≤ :data:`WRAP_TAIL` (a wrap costs accuracy, never privacy).

The vector a department masks is ``D`` coordinates of its noisy integer sum and one
holding its reported size, so the coordinator learns Σ reported sizes (public, as the
plain secure aggregation's weights are) and divides by the expected batch ``q·Σ``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fedsilo.secagg.masking import MAX_BITS, decode_signed, modulus_mask

from .quantize import DEFAULT_BETA, padded_dim, record_sensitivity, bits_for, unflatten
from .skellam import SkellamMechanism, SkellamSetup, mu_for_target_after

# c = γ·C defaults to this many times √D: the rounding's norm inflation, about D/(4c²), is then 1/16384.
SCALE_PER_ROOT_DIM = 64.0
# Passes over the pooled data when a run gives no --rounds: the steps a pooled DP-SGD run of as many
# epochs takes (fedsilo's default run sees each record 3 times: 3 rounds of one local epoch).
DEFAULT_EPOCHS = 3
WRAP_TAIL = 1e-9
Layout = Mapping[str, tuple[int, ...]]


def rotation_seed(run_key: str, server_round: int) -> int:
    """The round's public rotation seed: every party derives the same one, fresh each round."""
    digest = hashlib.sha256(f"fedsilo distributed-dp rotation\0{run_key}\0{int(server_round)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class DistributedDpPlan:
    """One run's distributed-DP round, from public inputs (see the module docstring).

    Parameters
    ----------
    layout
        Key -> shape of every array of the model (float arrays only); flattened in sorted key order.
    max_grad_norm
        C, the per-record clip norm.
    noise_multiplier
        σ of the run: the sum's noise has variance ``σ² Δ2²`` in integer units.
    sample_rate
        q, each record's Poisson sampling rate, the same in every department.
    participants, threshold, colluders
        n, t and c of the session and the trust assumption (``c < t <= n``).
    max_weight
        The largest size a department may report (``secagg-max-weight``).
    scale
        c = γ·C in integer units (0: :data:`SCALE_PER_ROOT_DIM` · √D).
    beta
        The conditional rounding's β (Kairouz et al. 2021).
    """

    layout: tuple[tuple[str, tuple[int, ...]], ...]
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float
    participants: int
    threshold: int
    colluders: int
    max_weight: int
    scale: float = 0.0
    beta: float = DEFAULT_BETA

    @classmethod
    def of(cls, layout: Layout, **kwargs) -> "DistributedDpPlan":
        return cls(tuple((key, tuple(int(d) for d in layout[key])) for key in sorted(layout)), **kwargs)

    @classmethod
    def for_run(cls, layout: Layout, settings, participants: int, threshold: int) -> "DistributedDpPlan":
        """The round of a run (its department-scope settings) in a session of ``participants`` at ``threshold``."""
        return cls.of(layout, max_grad_norm=settings.max_grad_norm, noise_multiplier=settings.noise_multiplier,
                      sample_rate=settings.sample_rate, participants=participants, threshold=threshold,
                      colluders=settings.ddp_colluders, max_weight=settings.secagg_max_weight,
                      scale=settings.ddp_scale)

    @classmethod
    def client_level(cls, layout: Layout, settings, participants: int, threshold: int) -> "DistributedDpPlan":
        """Client-level distributed DP (``central-dp`` under secure aggregation): the unit is a department's
        whole update Δ, clipped to ``central-clip-norm``, noised at ``central-noise-multiplier``, every
        department of the session contributing once (q = 1, weight 1)."""
        return cls.of(layout, max_grad_norm=settings.central_clip_norm,
                      noise_multiplier=settings.central_noise_multiplier, sample_rate=1.0,
                      participants=participants, threshold=threshold, colluders=settings.ddp_colluders,
                      max_weight=1, scale=settings.ddp_scale)

    def __post_init__(self) -> None:
        if not self.layout:
            raise ValueError("distributed DP needs a model with at least one float array")
        for name in ("max_grad_norm", "noise_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"distributed DP: {name.replace('_', '-')} must be a finite number > 0, not {value!r}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"distributed DP: the sample rate must be in (0, 1], not {self.sample_rate!r}")
        if not 0 <= self.colluders < self.threshold <= self.participants:
            raise ValueError(f"distributed DP needs 0 <= colluders < threshold <= participants, not c={self.colluders}, "
                             f"t={self.threshold}, n={self.participants}")
        if not (self.scale == 0 or (math.isfinite(self.scale) and self.scale >= 1)):
            raise ValueError(f"ddp-scale must be 0 (automatic) or a finite number >= 1, not {self.scale!r}")
        if self.modulus_bits > MAX_BITS:
            raise ValueError(f"distributed DP: {self.participants} departments of up to {self.max_weight} records at "
                             f"scale {self.scaled_norm:g} need {self.modulus_bits} bits, more than secure aggregation's "
                             f"{MAX_BITS}; lower secagg-max-weight or ddp-scale")

    # --- the layout ---------------------------------------------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for _, shape in self.layout)

    @property
    def dimension(self) -> int:
        """d: the model's float coordinates."""
        return sum(self.sizes)

    @property
    def rotated_dimension(self) -> int:
        """D: d padded to a power of two for the Hadamard rotation."""
        return padded_dim(self.dimension)

    @property
    def vector_length(self) -> int:
        """The masked vector: D noisy coordinates and the reported size."""
        return self.rotated_dimension + 1

    # --- the mechanism ------------------------------------------------------------------------------------------
    @property
    def scaled_norm(self) -> float:
        """c = γ·C: one record's clipped gradient in integer units."""
        return float(self.scale) if self.scale else SCALE_PER_ROOT_DIM * math.sqrt(self.rotated_dimension)

    @property
    def granularity(self) -> float:
        """γ: integer units per gradient unit."""
        return self.scaled_norm / self.max_grad_norm

    @property
    def sensitivity(self) -> tuple[float, float]:
        """(Δ1, Δ2) of one record's rounded contribution."""
        return record_sensitivity(self.scaled_norm, self.rotated_dimension, self.beta)

    @property
    def rounding_bound(self) -> float:
        return self.sensitivity[1]

    @property
    def mu(self) -> float:
        """Skellam variance of the noise the honest survivors alone put in the sum."""
        return self.noise_multiplier**2 * self.sensitivity[1] ** 2

    @property
    def share(self) -> float:
        """The Skellam variance this department adds: μ / (t − c)."""
        return self.mu / (self.threshold - self.colluders)

    def mechanism(self, steps: int = 1) -> SkellamMechanism:
        l1, l2 = self.sensitivity
        return SkellamMechanism(self.mu, l1, l2, self.sample_rate, steps)

    def setup(self) -> SkellamSetup:
        return SkellamSetup(self.granularity, self.rotated_dimension, self.beta, self.participants, self.threshold,
                            self.colluders)

    # --- the modulus ----------------------------------------------------------------------------------------------
    @property
    def modulus_bits(self) -> int:
        records = self.participants * self.max_weight
        noise = bits_for(records, self.rounding_bound, self.participants * self.share, self.rotated_dimension,
                         WRAP_TAIL)
        return max(noise, (records.bit_length() + 1), 8)

    def encode(self, noisy_sum: np.ndarray, reported_size: int) -> np.ndarray:
        """A department's masked-to-be vector: its noisy integer sum and its size, reduced mod 2^k."""
        values = np.asarray(noisy_sum)
        if values.shape != (self.rotated_dimension,) or values.dtype.kind not in "iu":
            raise ValueError(f"a noisy sum is {self.rotated_dimension} integers, not {values.shape} of {values.dtype}")
        if not 0 <= int(reported_size) <= self.max_weight:
            raise ValueError(f"the reported size {reported_size} is outside [0, {self.max_weight}]")
        full = np.append(values.astype(np.int64), np.int64(reported_size))
        # Two's complement mod 2^64, then mod 2^k: a wrap is post-processing of the noisy sum.
        return full.view(np.uint64) & modulus_mask(self.modulus_bits)

    def decode(self, total: np.ndarray, seed: int) -> tuple[dict[str, np.ndarray], int]:
        """The noisy DP-SGD gradient (key -> float64 array) and Σ reported sizes, from the secure sum."""
        values = np.asarray(total)
        if values.shape != (self.vector_length,):
            raise ValueError(f"a summed vector has shape ({self.vector_length},) for this plan, not {values.shape}")
        signed = decode_signed(values, self.modulus_bits)
        size = int(signed[-1])
        if not 0 < size <= self.participants * self.max_weight:
            raise ValueError(f"the summed size {size} is outside [1, {self.participants * self.max_weight}]: "
                             "no contribution, or a sum of other vectors")
        flat = unflatten(signed[:-1].astype(np.float64), seed, self.dimension)
        gradient = flat / (self.granularity * self.sample_rate * size)  # Opacus' convention: / expected batch
        out, start = {}, 0
        for (key, shape), count in zip(self.layout, self.sizes):
            out[key] = gradient[start:start + count].reshape(shape)
            start += count
        return out, size


def plan_noise_multiplier(target_epsilon: float, delta: float, rounds: int, layout: Layout, max_grad_norm: float,
                          sample_rate: float, scale: float = 0.0, beta: float = DEFAULT_BETA,
                          history=()) -> float:
    """The smallest σ whose ``rounds`` distributed-DP steps keep ``history`` plus the run within ``target_epsilon``.

    σ does not depend on the session (the honest shares always sum to μ), so a CLI
    plans it before any department is known.
    """
    plan = DistributedDpPlan.of(layout, max_grad_norm=max_grad_norm, noise_multiplier=1.0, sample_rate=sample_rate,
                                participants=1, threshold=1, colluders=0, max_weight=1, scale=scale, beta=beta)
    l1, l2 = plan.sensitivity
    mu = mu_for_target_after(list(history), target_epsilon, delta, l1, l2, sample_rate, rounds)
    return math.sqrt(mu) / l2 * (1 + 1e-9)  # μ = σ²Δ2² recomputed from it never falls below the plan's


def client_level_mechanism(layout: Layout, settings) -> SkellamMechanism:
    """One round of client-level distributed DP: μ, Δ1 and Δ2 do not depend on the session (n, t and c
    only size each department's share), so the coordinator's budget checks it before any session."""
    return DistributedDpPlan.of(layout, max_grad_norm=settings.central_clip_norm,
                                noise_multiplier=settings.central_noise_multiplier, sample_rate=1.0, participants=1,
                                threshold=1, colluders=0, max_weight=1, scale=settings.ddp_scale).mechanism(1)


def default_rounds(sample_rate: float) -> int:
    """Rounds (steps) of a run that gives no ``--rounds``: :data:`DEFAULT_EPOCHS` passes at ``sample_rate``."""
    return max(1, math.ceil(DEFAULT_EPOCHS / sample_rate - 1e-9))


def plan_distributed(settings, layout: Layout, target_epsilon: float, delta: float, pooled_records: int = 0,
                     rounds_given: bool = True):
    """``settings`` with distributed DP's run-wide numbers filled in: q, σ, and secure aggregation on.

    q is ``sample-rate``, else ``batch-size`` / ``pooled_records`` (a simulation knows
    them); without ``rounds_given``, the rounds are :func:`default_rounds` of q; σ is
    ``noise-multiplier``, else the smallest σ whose rounds stay within ``target_epsilon``
    at ``delta`` (every department still checks it against its own budget and history).
    Raises ``ValueError`` naming the option to give.
    """
    import dataclasses

    if not settings.distributed_dp:
        return settings
    q = settings.sample_rate
    if q <= 0:
        if pooled_records <= 0:
            raise ValueError("--distributed-dp needs --sample-rate: each record's Poisson sampling rate, the same in "
                             "every department (expected pooled batch / pooled records)")
        q = min(1.0, settings.batch_size / pooled_records)
    rounds = settings.num_server_rounds if rounds_given else default_rounds(q)
    sigma = settings.noise_multiplier
    if sigma <= 0:
        if not (target_epsilon > 0 and 0 < delta < 1):
            raise ValueError("--distributed-dp plans σ for the whole run: give --target-epsilon (or --max-epsilon) and "
                             "--delta, or --noise-multiplier")
        sigma = plan_noise_multiplier(target_epsilon, delta, rounds, layout, settings.max_grad_norm, q,
                                      settings.ddp_scale)
    return dataclasses.replace(settings, sample_rate=q, noise_multiplier=sigma, secure_aggregation=True,
                               num_server_rounds=rounds)
