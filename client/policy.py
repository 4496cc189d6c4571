"""The department's privacy policy: what this host allows, whatever a run asks.

In the spirit of NVFlare's site policies, the policy is set on the department's
own host (``fedsilo department start`` options, or the simulated departments'
settings of ``fedsilo simulate``) and applies to every run.  A run's config only
*asks* (:class:`RunRequest`); :meth:`DepartmentPolicy.terms_for` grants the
request when it is as strict as the policy or stricter, and otherwise names
every looser setting with both values, before anything trains.

Who decides what:

========================  ==============================================
the department's policy   budget, δ, accountants, training without DP,
                          smallest σ, largest sample rate, the size it
                          declares public, the model factories it runs,
                          the pretrained bases it holds
the run (the coordinator)  σ or a target ε, clipping norm, batch size,
                          epochs, rounds — and optionally a lower budget,
                          a smaller δ (ε is then stated at it), an
                          accountant the policy accepts
========================  ==============================================
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from fedsilo.shared.accounting import ACCOUNTANTS, Mechanism
from fedsilo.shared.config import FACTORY, MODELS, RunSettings
from fedsilo.shared.pretrained import BaseModelError, find_base, is_pretrained

from .limits import LimitError, RunLimits


class PolicyError(ValueError):
    """A policy setting is out of range; the message names it and what to use."""


@dataclass(frozen=True)
class RunRequest:
    """What a run asks of a department (from its run config); 0 / "" = no ask."""

    dp: bool
    delta: float = 0.0
    max_epsilon: float = 0.0
    accountant: str = ""
    model: str = "auto"

    @classmethod
    def from_settings(cls, settings: RunSettings) -> "RunRequest":
        return cls(settings.dp, settings.delta, settings.max_epsilon, settings.accountant, settings.model)


@dataclass(frozen=True)
class Terms:
    """What this department grants one run: the guard measures at exactly these."""

    private: bool
    max_epsilon: float
    delta: float
    accountant: str


@dataclass(frozen=True)
class DepartmentPolicy:
    """A department's own privacy policy.

    Parameters
    ----------
    max_epsilon : float
        The budget for the department's whole history (every run, every restart).
    delta : float
        δ at which every ε of this department is measured; must be below
        1/records (checked with :meth:`check_records`).
    accountants : tuple of str
        Accountants the department accepts; a run asking for none gets the first.
    allow_non_private : bool
        Whether a run may train here without DP.  Off unless the department's
        operators opt in on this host; a non-private round voids the ε of the
        whole ledger, and the ledger says so.
    min_noise_multiplier : float
        The smallest σ a round may use (0 = no limit beyond the budget).
    max_sample_rate : float
        The largest Poisson sample rate a round may use (1 = no limit).
    public_size : int, optional
        A record count the department declares public: it is what the
        department reports as its size (the FedAvg weight) and what its
        mechanism is planned from.  ``None`` reports and plans from the size
        rounded down to its two leading binary digits (:func:`size_bucket`),
        never the exact count.
    models : tuple of str
        Model factories (``package.module:callable``) this department runs, from
        its own installed environment; the built-in models are always allowed.
        A run asking for any other factory is declined.
    limits : RunLimits
        The most one run may ask of this host (steps, rounds, model size,
        schema width, run key, wall time, weight magnitude).
    require_secure_aggregation : bool
        Whether a plain (unmasked) train request is declined before training.
    peers : tuple of (str, str)
        The secure-aggregation roster: (department name, OpenSSH identity
        public key line), sorted by name.  Empty: every secure-aggregation
        request is declined, saying how to give one (``--peers``).
    secagg_min_threshold : int
        The smallest threshold t a session may use; c = t - 2 colluders are
        assumed, and 2t > n + c is required too.
    ddp_min_colluders : int
        Distributed DP: the fewest departments a run may assume to collude with
        the coordinator (``ddp-colluders``); each adds noise μ / (t − c), so a
        larger assumption means more noise from each.
    base_models : tuple of str
        Folders of the pretrained bases this department fine-tunes (its own
        copies, ``--base-model DIR``).  A run names its base by the SHA-256 of
        its weights (``hf:sha256:DIGEST``); one whose base is not among these is
        declined, naming the digest.  Empty: no pretrained model runs here.
    """

    max_epsilon: float
    delta: float = 1e-5
    accountants: tuple[str, ...] = ACCOUNTANTS
    allow_non_private: bool = False
    min_noise_multiplier: float = 0.0
    max_sample_rate: float = 1.0
    public_size: int | None = None
    models: tuple[str, ...] = ()
    limits: RunLimits = RunLimits()
    require_secure_aggregation: bool = False
    peers: tuple[tuple[str, str], ...] = ()
    secagg_min_threshold: int = 3
    ddp_min_colluders: int = 0
    base_models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.max_epsilon, (int, float)) and self.max_epsilon > 0 and math.isfinite(self.max_epsilon)):
            raise PolicyError(f"the department's max-epsilon must be a positive finite number, got {self.max_epsilon!r}")
        if not 0 < self.delta < 1:
            raise PolicyError(f"the department's delta must be in (0, 1) and below 1/records, e.g. 1e-5; got {self.delta!r}")
        accountants = tuple(self.accountants)
        unknown = [a for a in accountants if a not in ACCOUNTANTS]
        if not accountants or unknown:
            raise PolicyError(f"the department's accountants must be a non-empty subset of {', '.join(ACCOUNTANTS)}; got {', '.join(accountants) or 'none'}")
        object.__setattr__(self, "accountants", accountants)
        if not self.min_noise_multiplier >= 0:
            raise PolicyError(f"min-noise-multiplier must be >= 0, got {self.min_noise_multiplier!r}")
        if not 0 < self.max_sample_rate <= 1:
            raise PolicyError(f"max-sample-rate must be in (0, 1], got {self.max_sample_rate!r}")
        if self.public_size is not None and not (isinstance(self.public_size, int) and self.public_size >= 1):
            raise PolicyError(f"public-size must be a positive whole number of records, got {self.public_size!r}")
        models = tuple(self.models)
        malformed = [m for m in models if not FACTORY.match(m)]
        if malformed:
            raise PolicyError(f"allowed models must be factories written package.module:callable; got {', '.join(malformed)}")
        object.__setattr__(self, "models", models)
        if not isinstance(self.limits, RunLimits):
            raise PolicyError(f"the department's limits must be a RunLimits, got {type(self.limits).__name__}")
        object.__setattr__(self, "peers", _roster(self.peers))
        if isinstance(self.secagg_min_threshold, bool) or not isinstance(self.secagg_min_threshold, int) \
                or self.secagg_min_threshold < 2:
            raise PolicyError(f"secagg-min-threshold must be a whole number >= 2, got {self.secagg_min_threshold!r}")
        if not isinstance(self.require_secure_aggregation, bool):
            raise PolicyError("require-secure-aggregation must be true or false")
        if isinstance(self.ddp_min_colluders, bool) or not isinstance(self.ddp_min_colluders, int) \
                or self.ddp_min_colluders < 0:
            raise PolicyError(f"ddp-min-colluders must be a whole number >= 0, got {self.ddp_min_colluders!r}")
        bases = tuple(self.base_models)
        if not all(isinstance(b, str) and b for b in bases):
            raise PolicyError(f"base models must be folders, got {bases!r:.120}")
        object.__setattr__(self, "base_models", bases)

    # ------------------------------------------------------------------ decisions
    def terms_for(self, request: RunRequest) -> tuple[Terms | None, list[str]]:
        """Grant ``request`` (the terms the guard will use) or name each looser ask."""
        looser: list[str] = []
        if not request.dp and not self.allow_non_private:
            looser.append(
                "dp: the run asks to train without differential privacy; this department's policy "
                "never allows it (its operators can opt in locally with --allow-non-private)"
            )
        if request.delta and request.delta > self.delta:
            looser.append(
                f"delta: the run asks δ={request.delta:g}; this department's policy is δ={self.delta:g} "
                "and it states ε at no larger δ"
            )
        if request.max_epsilon and request.max_epsilon > self.max_epsilon:
            looser.append(
                f"max-epsilon: the run asks a budget of {request.max_epsilon:g}; this department's "
                f"policy allows at most {self.max_epsilon:g}"
            )
        if request.accountant and request.accountant not in self.accountants:
            looser.append(
                f"accountant: the run asks {request.accountant}; this department's policy accepts "
                f"{', '.join(self.accountants)}"
            )
        if is_pretrained(request.model):
            try:
                find_base(request.model, self.base_models, "this department's base models")
            except BaseModelError:  # the reason leaves this host: it names the digest, not this host's folders
                looser.append(
                    f"model: the run's base model ({request.model}) is not among this department's base models; "
                    "its operators can give a folder holding exactly those weights with --base-model DIR")
        elif request.model not in MODELS and request.model not in self.models:
            allowed = ", ".join(self.models) if self.models else "none"
            looser.append(
                f"model: the run asks for the model factory '{request.model}'; this department runs the "
                f"built-in models and the factories its operators allowed ({allowed}); they can allow it "
                f"with --allow-model {request.model} once it is installed on this host"
            )
        if looser:
            return None, looser
        budget = min(self.max_epsilon, request.max_epsilon) if request.max_epsilon else self.max_epsilon
        # A smaller δ is stricter (ε at it is larger): granted, and ε is stated at it.
        delta = min(self.delta, request.delta) if request.delta else self.delta
        return Terms(request.dp, budget, delta, request.accountant or self.accountants[0]), []

    def mechanism_limits(self, mechanism: Mechanism) -> list[str]:
        """Each limit of the policy that a planned round's mechanism passes."""
        out = []
        if mechanism.noise_multiplier < self.min_noise_multiplier:
            out.append(
                f"noise-multiplier: the round would use σ={mechanism.noise_multiplier:.4g}; this "
                f"department's policy requires σ ≥ {self.min_noise_multiplier:g}"
            )
        if mechanism.sample_rate > self.max_sample_rate:
            out.append(
                f"sample-rate: the round would sample q={mechanism.sample_rate:.4g}; this "
                f"department's policy allows q ≤ {self.max_sample_rate:g} (lower --batch-size asks)"
            )
        return out

    def check_records(self, num_records: int) -> None:
        """δ must be below 1/records: at δ ≥ 1/N a mechanism may publish one record outright."""
        if not self.delta < 1.0 / max(num_records, 1):
            raise PolicyError(
                f"the department's δ={self.delta:g} is not below 1/{num_records} records: at that δ one "
                f"record could be published outright; use --delta below {1.0 / num_records:.2g}"
            )

    def reported_size(self, num_records: int) -> int:
        """The size this department reports and plans from: public, or :func:`size_bucket`."""
        return self.public_size if self.public_size is not None else size_bucket(num_records)

    def roster(self) -> dict:
        """The secure-aggregation roster: name -> identity public key (empty without ``--peers``)."""
        from fedsilo.shared.record import load_any_public_key

        return {name: load_any_public_key(line) for name, line in self.peers}

    # ------------------------------------------------------------------ state
    def to_json(self) -> str:
        body = asdict(self)
        body["accountants"] = list(self.accountants)
        body["models"] = list(self.models)
        body["base_models"] = list(self.base_models)
        body["peers"] = [list(pair) for pair in self.peers]
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DepartmentPolicy":
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise PolicyError(f"the department policy is not valid JSON ({err})") from None
        if not isinstance(raw, dict) or "max_epsilon" not in raw:
            raise PolicyError("the department policy must be a JSON object with at least max_epsilon")
        known = {"max_epsilon", "delta", "accountants", "allow_non_private", "min_noise_multiplier",
                 "max_sample_rate", "public_size", "models", "limits", "require_secure_aggregation", "peers",
                 "secagg_min_threshold", "ddp_min_colluders", "base_models"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PolicyError(f"unknown department policy setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for key in ("accountants", "models", "base_models"):
            if key in raw:
                raw[key] = tuple(raw[key])
        if "peers" in raw:
            if not isinstance(raw["peers"], list):
                raise PolicyError("the department policy's peers must be a list of [name, public key] pairs")
            raw["peers"] = tuple(tuple(pair) if isinstance(pair, list) else pair for pair in raw["peers"])
        try:
            if "limits" in raw:
                raw["limits"] = RunLimits.from_dict(raw["limits"])
            return cls(**raw)
        except (LimitError, TypeError) as err:
            raise PolicyError(f"the department policy is malformed: {err}") from None


def read_peers(folder, own_name: str, own_public_key) -> tuple[tuple[str, str], ...]:
    """The roster in ``folder``: every ``NAME.pub`` (as ``certs add-department`` writes them).

    The department's own ``own_name.pub`` must be there and hold its identity key ``own_public_key``.
    """
    from pathlib import Path

    from fedsilo.shared.record import public_key_line
    from fedsilo.shared.signing import SigningKeyError, load_public_key

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise PolicyError(f"--peers {folder}: no such folder (it holds every department's NAME.pub)")
    peers = []
    for pub in sorted(path.glob("*.pub")):
        try:
            peers.append((pub.stem, public_key_line(load_public_key(pub))))
        except SigningKeyError as err:
            raise PolicyError(f"--peers: {err}") from None
    if not peers:
        raise PolicyError(f"--peers {folder}: the folder holds no NAME.pub")
    own, listed = public_key_line(own_public_key), dict(peers)
    if own_name not in listed:
        raise PolicyError(f"--peers {folder}: this department's own {own_name}.pub is not there; copy its identity "
                          "public key into the folder")
    if listed[own_name] != own:
        raise PolicyError(f"--peers {folder}: {own_name}.pub differs from this department's identity key")
    return _roster(tuple(peers))


def _roster(peers) -> tuple[tuple[str, str], ...]:
    """``peers`` checked (names as secure aggregation spells them, keys that parse) and sorted by name."""
    from fedsilo.secagg.messages import MAX_NAME, NAME_PATTERN
    from fedsilo.shared.record import load_any_public_key, public_key_line

    pairs = []
    for pair in peers:
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
            raise PolicyError(f"a secure-aggregation peer is a (name, public key) pair, got {pair!r:.80}")
        name, line = pair
        if not (0 < len(name) <= MAX_NAME and NAME_PATTERN.match(name)):
            raise PolicyError(f"secure-aggregation peer name {name!r:.80} is not a department name "
                              "(letters, digits, '.', '_', '-'; at most 64)")
        key = load_any_public_key(line.strip())
        if key is None:
            raise PolicyError(f"the public key of secure-aggregation peer '{name}' does not parse")
        pairs.append((name, public_key_line(key)))  # one spelling: no comment, so a round trip is identical
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise PolicyError(f"secure-aggregation peers name a department twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return tuple(sorted(pairs))


def size_bucket(num_records: int) -> int:
    """``num_records`` rounded down to its two leading binary digits (1797 → 1536): what is reported by default.

    Always more than two thirds of the count, so FedAvg weights and the planned sample rate
    stay close to the truth, while the count itself is never released: only
    which of the buckets 1, 2, 3, 4, 6, 8, 12, 16, 24, … it falls in.  Coarse,
    not private: a record added or removed can move the count across a bucket
    edge.  A department for which even that is too much declares a public size
    instead (``--public-size``).
    """
    if num_records < 1:
        raise ValueError("a department needs at least one record")
    step = 1 << max(int(num_records).bit_length() - 2, 0)
    return (int(num_records) // step) * step
