"""The catalogue of run settings: each one declared once, with who reads it.

Every run setting is one :class:`Setting` in :data:`CATALOGUE`: its run-config key,
type, default, a one-line help, a check, its **scope** and the CLI options that
expose it.  Everything else derives from it: :data:`fedsilo.shared.config.RUN_CONFIG_DEFAULTS`
(what the Flower app's config holds), :class:`fedsilo.shared.config.RunSettings`' fields
and checks, the ``[tool.flwr.app.config]`` mirror in ``pyproject.toml`` (a test keeps it
equal to :func:`defaults`), the typer options of ``fedsilo coordinator run`` and
``fedsilo simulate`` (:func:`cli_options`), and the reference table of the docs.

Scopes say who reads a setting:

``department``
    A department reads it: the data, model, training and privacy *asks*.  Only these
    travel in the Flower run config that ``coordinator run`` and ``simulate`` submit.
``coordinator``
    Only the coordinator reads it: paths, keys, aggregation, client-level DP,
    timeouts.  It never leaves the coordinator's host (:func:`fedsilo.shared.config.publish`).
``simulation``
    Only ``fedsilo simulate`` sets it (the partition, the simulated departments'
    own policy); it reaches the simulated departments from the simulation, on its host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from .accounting import ACCOUNTANTS

GRAD_SAMPLE_MODES = ("auto", "bk", "ghost", "hooks", "functorch", "ew")
DEVICES = ("auto", "cpu", "cuda")
BASE_DTYPES = ("auto", "float32", "bfloat16")
MODELS = ("auto", "mlp", "cnn")
TASKS = ("auto", "binary", "multiclass", "regression")
AGGREGATIONS = ("fedavg", "trimmed-mean", "median", "krum")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
PRETRAINED = re.compile(r"^hf:sha256:[0-9a-f]{64}$")  # a pretrained base, named by its weights' digest

Scope = Literal["department", "coordinator", "simulation"]
SCOPES: tuple[str, ...] = ("department", "coordinator", "simulation")
CLIS: tuple[str, ...] = ("coordinator", "simulate")  # `fedsilo coordinator run`, `fedsilo simulate`

_SAME: Any = object()  # a CLI option's default or help that is the setting's own


@dataclass(frozen=True)
class Check:
    """A predicate on one setting's value, and what to say when it fails."""

    ok: Callable[[Any], bool]
    message: str


@dataclass(frozen=True)
class Cli:
    """How one command shows a setting as an option.

    Parameters
    ----------
    default : Any
        The option's default, when it differs from the setting's (``None`` with
        ``optional``: "not given", which the command maps to the setting's default).
    help : str or None
        The option's help, when the command says more (or less) than the setting's.
    flag : str
        The option's declaration when it is a flag (``"--dp/--no-dp"``, ``"--fix-model"``).
    optional : bool
        The option is ``Optional[...]`` with default ``None``: "not given" has a meaning.
    min : float or None
        typer's lower bound.
    type : Any
        The option's Python type when it is not the setting's (a ``Path`` for a path).
    """

    default: Any = _SAME
    help: Any = _SAME
    flag: str = ""
    optional: bool = False
    min: float | None = None
    type: Any = None


@dataclass(frozen=True)
class Setting:
    """One run setting.

    Parameters
    ----------
    key : str
        The run-config key (kebab-case); ``RunSettings``' field is ``name``.
    type : type
        ``int``, ``float``, ``bool`` or ``str``.
    default : Any
        The value when nobody sets it.
    help : str
        One line for users (the reference docs show it).
    scope : str
        ``department``, ``coordinator`` or ``simulation`` (see the module's docstring).
    check : Check or None
        What a valid value is (checked on every :class:`~fedsilo.shared.config.RunSettings`).
    option : str
        The CLI parameter's name, when it is not ``name`` (``rounds`` for ``num-server-rounds``).
    coordinator, simulate : Cli or None
        How ``fedsilo coordinator run`` / ``fedsilo simulate`` show it; ``None``: not at all.
    """

    key: str
    type: type
    default: Any
    help: str
    scope: Scope
    check: Check | None = None
    option: str = ""
    coordinator: Cli | None = None
    simulate: Cli | None = None

    @property
    def name(self) -> str:
        """The ``RunSettings`` field (snake_case)."""
        return self.key.replace("-", "_")

    @property
    def param(self) -> str:
        """The CLI parameter's name (the option is ``--`` + it with ``-``)."""
        return self.option or self.name

    def option_name(self, command: str) -> str:
        """How ``command`` spells the option (``--rounds``, ``--dp/--no-dp``); "" when it does not show it."""
        cli = self.cli(command)
        if cli is None:
            return ""
        return cli.flag or "--" + self.param.replace("_", "-")

    def cli(self, command: str) -> Cli | None:
        """How ``command`` (``coordinator`` or ``simulate``) shows this setting, or None."""
        if command not in CLIS:
            raise ValueError(f"unknown command {command!r}; one of {CLIS}")
        return getattr(self, command)


def _one_of(values: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda value: value in values


_C = Cli()  # shown, as declared by the setting


CATALOGUE: tuple[Setting, ...] = (
    # ------------------------------------------------------------------ the run, its data and model
    Setting("num-server-rounds", int, 3, "Federated rounds of the run.", "department",
            Check(lambda v: v >= 1, "num-server-rounds must be at least 1"), option="rounds",
            coordinator=Cli(default=20, help=None, min=1), simulate=Cli(default=20, help="Federated rounds.", min=1)),
    Setting("dataset", str, "digits",
            "The data: digits | mnist5k | breast-cancer | PATH to .csv/.parquet | a FOLDER with one table per department "
            "(a deployment: the coordinator's held-out table).", "coordinator",
            simulate=Cli(help="digits | mnist5k | breast-cancer | PATH to .csv/.parquet | a FOLDER with one table per department.")),
    Setting("test-data", str, "",
            "The coordinator's own held-out table (empty in a simulation: a fixed 20 % split off the data).", "coordinator",
            coordinator=Cli(type=Path, optional=True, help="The coordinator's own held-out table: evaluation and the data "
                            "schema (required, except with --resume: the run keeps its own)."),
            simulate=Cli(type=Path, optional=True, help="The coordinator's held-out table (default: a fixed 20 % split off the data).")),
    Setting("label-column", str, "label", "The label column of a CSV/Parquet table.", "coordinator",
            coordinator=Cli(help="Label column of --test-data."), simulate=Cli(help="Label column of a CSV/Parquet dataset.")),
    Setting("feature-columns", str, "", "Comma-separated feature columns (empty: all but the label).", "coordinator",
            coordinator=Cli(help="Comma-separated features (default: all but the label)."),
            simulate=Cli(help="Comma-separated feature columns (default: all but the label).")),
    Setting("partition", str, "iid",
            "How a simulation splits the data: iid | dirichlet:ALPHA (label skew) | by:COLUMN (one department per value).",
            "simulation",
            simulate=Cli(optional=True, help="iid | dirichlet:ALPHA (label skew; smaller = more skewed) | by:COLUMN (one "
                         "department per value). Default: dirichlet:0.5, or iid for regression and a folder of tables.")),
    Setting("seed", int, 42, "Seed for partitioning, model initialization and each round's training.", "department",
            coordinator=Cli(help=None), simulate=Cli(help="Seed for partitioning and model initialization.")),
    Setting("model", str, "auto",
            "The model: auto | mlp | cnn | package.module:factory (imported from each party's own environment) | "
            "hf:sha256:DIGEST (a pretrained base fine-tuned with LoRA, each party's own copy).",
            "department",
            Check(lambda v: v in MODELS or bool(FACTORY.match(v)) or bool(PRETRAINED.match(v)),
                  f"model must be one of {MODELS}, a factory package.module:callable or a base hf:sha256:DIGEST"),
            coordinator=Cli(help="auto | mlp | cnn | package.module:factory — installed here and on every department that "
                            "allows it (--allow-model) | hf:DIR, a pretrained Hugging Face folder fine-tuned with LoRA "
                            "(each department holds its own copy: --base-model)."),
            simulate=Cli(help="auto | mlp | cnn | package.module:factory (your own; see docs/how-to/own-model.md) | "
                         "hf:DIR, a pretrained Hugging Face folder fine-tuned with LoRA (docs/how-to/pretrained.md).")),
    Setting("base-model", str, "",
            "The coordinator's own copy of the run's pretrained base (a folder; set from --model hf:DIR).", "coordinator"),
    Setting("lora-rank", int, 8, "LoRA rank r of the adapters on a pretrained base.", "department",
            Check(lambda v: 1 <= v <= 1024, "lora-rank must be in [1, 1024]"), coordinator=Cli(min=1), simulate=Cli(min=1)),
    Setting("lora-alpha", float, 16.0, "LoRA scaling α (the adapters' update is scaled by α/r).", "department",
            Check(lambda v: 0 < v < 1e6, "lora-alpha must be positive"), coordinator=_C, simulate=_C),
    Setting("lora-targets", str, "",
            "Comma-separated module names LoRA adapts (empty: peft's default for the architecture, e.g. query,value).",
            "department", Check(lambda v: all(re.match(r"^[A-Za-z_][\w.]*$", t.strip()) for t in v.split(",") if t.strip()),
                                "lora-targets must be module names separated by commas, e.g. query,value"),
            coordinator=_C, simulate=_C),
    Setting("max-length", int, 128,
            "Tokens per text under a pretrained base (the schema's max_length when fedsilo drafts it).", "coordinator",
            Check(lambda v: 1 <= v <= 4096, "max-length must be in [1, 4096]"), coordinator=Cli(min=1), simulate=Cli(min=1)),
    Setting("fix-model", bool, False,
            "Let Opacus' ModuleValidator.fix replace layers DP-SGD cannot train (BatchNorm → GroupNorm).", "department",
            coordinator=Cli(flag="--fix-model"),
            simulate=Cli(flag="--fix-model", help="Let Opacus' ModuleValidator.fix replace layers DP-SGD cannot train "
                         "(BatchNorm → GroupNorm), and say what changed.")),
    Setting("task", str, "auto", "auto | binary | multiclass | regression (auto refuses to guess a many-valued number).",
            "department", Check(_one_of(TASKS), f"task must be one of {TASKS}"),
            coordinator=Cli(help="auto | binary | multiclass | regression, when the schema is inferred."), simulate=_C),
    Setting("data-schema", str, "",
            "The public schema every department encodes its table with (JSON of a DataSchema; empty: inferred from the held-out rows).",
            "department"),
    # ------------------------------------------------------------------ record-level DP: what the run asks
    Setting("dp", bool, True, "DP-SGD at every department.", "department",
            coordinator=Cli(flag="--dp/--no-dp", help=None),
            simulate=Cli(flag="--dp/--no-dp", help="DP-SGD at every department (on by default).")),
    Setting("noise-multiplier", float, 0.0,
            "σ: Gaussian noise / clipping norm (0 with target-epsilon 0: each department plans σ to spend its own budget).",
            "department", Check(lambda v: v >= 0, "noise-multiplier must be >= 0"),
            coordinator=Cli(optional=True, min=0.0, help="σ. Default: each department plans σ so the planned rounds spend its own budget."),
            simulate=Cli(optional=True, min=0.0, help="σ: Gaussian noise / clipping norm. Default: each department plans σ so the planned rounds spend its budget.")),
    Setting("target-epsilon", float, 0.0,
            "Each department derives σ so the planned rounds spend this whole-history ε (0: off).", "department",
            Check(lambda v: v >= 0, "target-epsilon must be >= 0 (0 = off)"),
            coordinator=Cli(optional=True, help="Each department derives σ to spend this over the rounds."),
            simulate=Cli(optional=True, help="Derive σ so the planned rounds spend this whole-history ε (overrides --noise-multiplier).")),
    Setting("max-grad-norm", float, 1.0, "Per-example gradient clipping norm C.", "department",
            # Bounded so every clip factor C/‖g‖ of a bounded per-sample gradient stays a normal float32.
            Check(lambda v: 1e-6 <= v <= 1e6, "max-grad-norm must be in [1e-6, 1e6]"),
            coordinator=Cli(help=None), simulate=_C),
    Setting("delta", float, 0.0,
            "Ask each department to state ε at no larger δ (0: ask nothing; a simulation: the simulated departments' δ).",
            "department", Check(lambda v: v == 0 or 0 < v < 1, "delta must be 0 (ask nothing) or in (0, 1), e.g. 1e-5"),
            coordinator=Cli(optional=True, help="Ask each department to state ε at no larger δ; one whose own δ is larger "
                            "declines. Default: ask nothing (each department's δ)."),
            simulate=Cli(default=1e-5, help="δ of the (ε, δ) guarantee.")),
    Setting("max-epsilon", float, 0.0,
            "Ask each department to stop the run at this ε (0: ask nothing; a simulation: the simulated departments' budget).",
            "department", Check(lambda v: v >= 0, "max-epsilon must be positive, or 0 to ask nothing"),
            coordinator=Cli(optional=True, help="Ask each department to stop this run at this ε; one whose own budget is "
                            "smaller declines. Default: ask nothing (each department's budget)."),
            simulate=Cli(default=10.0, help="Each department's budget: it refuses rounds past this ε.")),
    Setting("accountant", str, "",
            "Ask for this accountant: pld | prv | rdp (empty: each department's own; a simulation: the simulated departments').",
            "department", Check(_one_of(("", *ACCOUNTANTS)), f"accountant must be one of {ACCOUNTANTS}, or empty to let each department choose"),
            coordinator=Cli(optional=True, help="Ask for this accountant (pld | prv | rdp); a department that does not "
                            "accept it declines. Default: each department's own."),
            simulate=Cli(default="pld", help="pld (dp-accounting, tightest) | prv (Opacus) | rdp.")),
    # ------------------------------------------------------------------ local training
    Setting("local-epochs", int, 1, "Local epochs per round.", "department",
            Check(lambda v: v >= 1, "local-epochs must be at least 1"),
            coordinator=Cli(help=None, min=1), simulate=Cli(min=1)),
    Setting("batch-size", int, 64, "Expected (Poisson) batch size.", "department",
            Check(lambda v: v >= 1, "batch-size must be at least 1"),
            coordinator=Cli(help=None, min=1), simulate=Cli(min=1)),
    Setting("learning-rate", float, 0.5, "SGD learning rate.", "department",
            Check(lambda v: v > 0, "learning-rate must be positive"), coordinator=_C, simulate=_C),
    Setting("momentum", float, 0.5, "SGD momentum (reset every round).", "department",
            Check(lambda v: 0 <= v < 1, "momentum must be in [0, 1)"), coordinator=Cli(help=None), simulate=_C),
    Setting("grad-sample-mode", str, "auto",
            "Per-example clipping: auto (book-keeping, one backward a step, where every trainable layer is Linear, Embedding, LayerNorm, GroupNorm, Conv1d or Conv2d; else Opacus' hooks) | bk | ghost | hooks | functorch | ew.",
            "department", Check(_one_of(GRAD_SAMPLE_MODES), f"grad-sample-mode must be one of {GRAD_SAMPLE_MODES}"),
            simulate=_C),
    Setting("device", str, "auto",
            "auto | cpu | cuda: where each department trains (a department without a GPU trains on its CPU, and says so).",
            "department", Check(_one_of(DEVICES), f"device must be one of {DEVICES}"), coordinator=_C, simulate=_C),
    Setting("base-dtype", str, "auto",
            "A pretrained base's frozen weights: auto (bfloat16 on a GPU that has it, else float32) | float32 | bfloat16. "
            "Adapters, head, per-example norms, clipping and noise stay float32.",
            "department", Check(_one_of(BASE_DTYPES), f"base-dtype must be one of {BASE_DTYPES}"), coordinator=_C, simulate=_C),
    # ------------------------------------------------------------------ the coordinator: sampling, aggregation, timeouts
    Setting("fraction-train", float, 1.0,
            "Fraction of departments sampled each round (with --central-dp: each one's Poisson sampling probability).",
            "coordinator", Check(lambda v: 0 < v <= 1, "fraction-train must be in (0, 1]"), coordinator=_C, simulate=_C),
    Setting("aggregation", str, "fedavg",
            "fedavg | trimmed-mean | median | krum: how the coordinator combines updates (robust rules resist a bad department).",
            "coordinator", Check(_one_of(AGGREGATIONS), f"aggregation must be one of {', '.join(AGGREGATIONS)}"),
            coordinator=_C, simulate=_C),
    Setting("trim-fraction", float, 0.2, "trimmed-mean: share of updates cut at each end, per coordinate.", "coordinator",
            Check(lambda v: 0 <= v < 0.5, "trim-fraction must be in [0, 0.5): the share of updates cut at each end"),
            coordinator=_C, simulate=_C),
    Setting("byzantine", int, 1, "krum: how many malicious departments to tolerate (needs more than 2f+2 updates).",
            "coordinator", Check(lambda v: v >= 0, "byzantine (Krum's assumed number of malicious departments) must be >= 0"),
            coordinator=Cli(min=0), simulate=Cli(min=0)),
    Setting("max-update-norm", float, 0.0,
            "Scale down any update that moves the global model by more than this L2 norm (0: no bound).", "coordinator",
            Check(lambda v: v >= 0, "max-update-norm must be >= 0 (0 = no bound)"),
            coordinator=Cli(min=0.0), simulate=Cli(min=0.0)),
    Setting("min-departments", int, 2, "Stop if fewer departments are connected.", "coordinator",
            Check(lambda v: v >= 1, "min-departments must be at least 1"), coordinator=Cli(min=1)),
    Setting("round-timeout", float, 600.0, "Seconds a round waits for replies; late departments are left out.",
            "coordinator", Check(lambda v: v > 0, "round-timeout must be positive (seconds)"), coordinator=_C),
    Setting("connect-timeout", float, 120.0, "Seconds to wait for --min-departments to be connected.", "coordinator",
            Check(lambda v: v > 0, "connect-timeout must be positive (seconds)"), coordinator=_C),
    # ------------------------------------------------------------------ the coordinator's files
    Setting("out", str, "runs",
            "Output folder: each run gets OUT/<run-name>/ (summary.json, checkpoint, model, card, schema.json); OUT/latest points at the newest.",
            "coordinator",
            coordinator=Cli(type=Path, default=Path("runs")),
            simulate=Cli(type=Path, default=Path("runs"), help="Output folder: each run gets OUT/<run-name>/ (summary.json, "
                         "checkpoint, model, card, schema.json), OUT/latest points at the newest; the simulated departments' "
                         "ledgers/ stay in OUT across runs.")),
    Setting("run-name", str, "",
            "The run's folder under OUT and its id in every ledger, kept across resumes (empty: run-<UTC time>-<random>).",
            "coordinator", Check(lambda v: v == "" or bool(RUN_NAME.match(v)),
                                 "run-name must be letters, digits, '.', '_' or '-' (a folder name), at most 100 characters")),
    Setting("resume", bool, False, "Continue run-name from its last checkpoint (OUT/<run-name>/checkpoint.safetensors).",
            "coordinator"),
    Setting("record", str, "",
            "The coordinator's signed record of the ledger heads it acknowledged (empty: OUT/record/acknowledged.jsonl).",
            "coordinator"),
    Setting("record-signing-key", str, "", "The key that signs the record (empty: a key generated beside it).", "coordinator"),
    # ------------------------------------------------------------------ client-level DP at the coordinator
    # central-dp, its σ and C reach the departments: under secure aggregation they clip and noise themselves.
    Setting("central-dp", bool, False,
            "Client-level DP at the coordinator: clip each department's update, noise the sum, own budget and signed ledger.",
            "department",
            coordinator=Cli(flag="--central-dp", help="Client-level DP: clip each department's update, noise the sum, own budget and signed ledger."),
            simulate=Cli(flag="--central-dp", help="Client-level DP at the coordinator: clip each department's update, noise the sum, own budget and ledger.")),
    Setting("central-noise-multiplier", float, 1.0, "Client-level σ: noise on the sum / --central-clip-norm.", "department",
            coordinator=_C, simulate=_C),
    Setting("central-clip-norm", float, 1.0, "Largest L2 norm of one department's model update.", "department",
            Check(lambda v: v > 0, "central-clip-norm must be positive"), coordinator=_C, simulate=_C),
    Setting("central-delta", float, 1e-3, "δ of the client-level guarantee; must be below 1/departments.", "coordinator",
            Check(lambda v: 0 < v < 1, "central-delta must be in (0, 1) and below 1/departments"), coordinator=_C, simulate=_C),
    Setting("central-max-epsilon", float, 10.0, "The coordinator's client-level budget over its whole ledger (all runs).",
            "coordinator", Check(lambda v: v > 0, "central-max-epsilon must be positive"),
            coordinator=_C, simulate=Cli(help="The coordinator's client-level budget over its whole ledger.")),
    Setting("central-ledger", str, "",
            "Folder of the coordinator's client-level ledger (empty: OUT/central); keep it across runs so ε covers them all.",
            "coordinator",
            coordinator=Cli(type=Path, default=Path("central-ledger"),
                            help="Folder of the coordinator's ledger; keep it across runs so ε covers them all.")),
    Setting("central-signing-key", str, "", "The key that signs the client-level ledger (empty: a key generated beside it).",
            "coordinator"),
    # ------------------------------------------------------------------ secure aggregation (docs/explanation/secure-aggregation.md)
    Setting("secure-aggregation", bool, False,
            "Secure aggregation: the coordinator learns only the weighted sum of each round's updates, never one of them.",
            "coordinator", coordinator=Cli(flag="--secure-aggregation"), simulate=Cli(flag="--secure-aggregation")),
    Setting("secagg-threshold", int, 0,
            "Secure aggregation's threshold t: departments needed to unmask a round (0: a majority, min(n, max(3, "
            "(n + 1) // 2 + 1)); with distributed DP min(n, max(3, n − ⌈n/10⌉)), as each adds noise μ/(t − c)).",
            "coordinator", Check(lambda v: v == 0 or v >= 2, "secagg-threshold must be 0 (the default) or at least 2"),
            coordinator=Cli(min=0), simulate=Cli(min=0)),
    Setting("secagg-bound", float, 1.0,
            "Secure aggregation: each department clips every coordinate of its update to ±this before masking it.",
            "department", Check(lambda v: 0 < v < float("inf"), "secagg-bound must be a finite number > 0"),
            coordinator=_C, simulate=_C),
    Setting("secagg-frac-bits", int, 16, "Secure aggregation: fractional bits of the fixed-point encoding.",
            "department", Check(lambda v: 0 <= v <= 40, "secagg-frac-bits must be in [0, 40]"),
            coordinator=Cli(min=0), simulate=Cli(min=0)),
    Setting("secagg-max-weight", int, 1048576,
            "Secure aggregation: the largest example count a department may report (it declines above it).",
            "department", Check(lambda v: v >= 1, "secagg-max-weight must be at least 1"),
            coordinator=Cli(min=1), simulate=Cli(min=1)),
    # ------------------------------------------------------------------ distributed DP (docs/explanation/distributed-dp.md)
    Setting("distributed-dp", bool, False,
            "Distributed DP: each round is one DP-SGD step over the federation; the departments add the noise in "
            "shares, in the integers, under secure aggregation (which it turns on).",
            "department", coordinator=Cli(flag="--distributed-dp"), simulate=Cli(flag="--distributed-dp")),
    Setting("sample-rate", float, 0.0,
            "Distributed DP: each record's Poisson sampling rate q, the same in every department "
            "(0 in a simulation: batch-size / the pooled records).",
            "department", Check(lambda v: 0 <= v <= 1, "sample-rate must be in [0, 1] (0: planned from batch-size)"),
            coordinator=Cli(min=0.0), simulate=Cli(min=0.0)),
    Setting("ddp-colluders", int, 0,
            "Distributed DP: departments assumed to collude with the coordinator; each adds noise μ/(t − this).",
            "department", Check(lambda v: v >= 0, "ddp-colluders must be >= 0"),
            coordinator=Cli(min=0), simulate=Cli(min=0)),
    Setting("ddp-scale", float, 0.0,
            "Distributed DP: one record's clipped gradient in integer units, γ·C (0: 64·√D for D rotated coordinates).",
            "department", Check(lambda v: v == 0 or 1 <= v < float("inf"), "ddp-scale must be 0 (automatic) or >= 1"),
            coordinator=Cli(min=0.0), simulate=Cli(min=0.0)),
    # ------------------------------------------------------------------ simulation only
    Setting("simulated-policy", str, "",
            "The simulated departments' own policy (JSON of client.policy.DepartmentPolicy); a deployed department never reads it.",
            "simulation"),
    # ------------------------------------------------------------------ how the host side finds the rest
    Setting("settings-key", str, "",
            "Set by `coordinator run` and `simulate`: the opaque name of the run's coordinator and simulation settings, "
            "kept on the coordinator's host (empty with `flwr run .`: every setting is in the run config).", "department"),
)

BY_KEY: dict[str, Setting] = {setting.key: setting for setting in CATALOGUE}


def defaults(scope: str | None = None) -> dict[str, Any]:
    """Every setting's default by key (only ``scope``'s, when given), in catalogue order."""
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; one of {SCOPES}")
    return {s.key: s.default for s in CATALOGUE if scope is None or s.scope == scope}


def keys(scope: str) -> tuple[str, ...]:
    """The run-config keys of one scope."""
    return tuple(defaults(scope))


def in_cli(command: str) -> tuple[Setting, ...]:
    """The settings ``command`` (``coordinator`` or ``simulate``) shows as options, in catalogue order."""
    return tuple(s for s in CATALOGUE if s.cli(command) is not None)


def option_default(setting: Setting, command: str) -> Any:
    """The default of ``setting``'s option in ``command``."""
    cli = setting.cli(command)
    if cli is None:
        raise ValueError(f"{setting.key} is not an option of {command}")
    if cli.optional:
        return None if cli.default is _SAME else cli.default
    return setting.default if cli.default is _SAME else cli.default


def option_help(setting: Setting, command: str) -> str | None:
    """The help of ``setting``'s option in ``command`` (None: the option has none)."""
    cli = setting.cli(command)
    if cli is None:
        raise ValueError(f"{setting.key} is not an option of {command}")
    return setting.help if cli.help is _SAME else cli.help


def option_annotation(setting: Setting, command: str) -> Any:
    """``Annotated[type, typer.Option(...)]`` for ``setting``'s option in ``command``."""
    from typing import Annotated

    import typer

    cli = setting.cli(command)
    if cli is None:
        raise ValueError(f"{setting.key} is not an option of {command}")
    kind = cli.type or setting.type
    if cli.optional:
        kind = Optional[kind]
    options: dict[str, Any] = {"help": option_help(setting, command)}
    if cli.min is not None:
        options["min"] = cli.min
    decls = (cli.flag,) if cli.flag else ()
    return Annotated[kind, typer.Option(*decls, **options)]


def cli_options(command: str, tail: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command the catalogue's options for ``command`` (``coordinator`` or ``simulate``).

    The decorated function declares its own options (those that are not run
    settings) and ends with ``**options``: the wrapper typer sees has the
    catalogue's options in its signature (typer reads ``inspect.signature``),
    and hands their values to the function in ``options``.  The function's own
    parameters named in ``tail`` are listed after the catalogue's.
    """
    import inspect
    import typing

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
        if len(own) == len(inspect.signature(fn).parameters):
            raise TypeError(f"{fn.__name__} must take **options for the catalogue's options")
        names = {p.name for p in own}
        added = [
            inspect.Parameter(s.param, inspect.Parameter.KEYWORD_ONLY, annotation=option_annotation(s, command),
                              default=option_default(s, command))
            for s in in_cli(command)
        ]
        clash = names & {p.name for p in added}
        if clash:
            raise TypeError(f"{fn.__name__} declares {sorted(clash)}, which the catalogue gives")
        head = [p if p.kind is not p.POSITIONAL_OR_KEYWORD or p.name == "ctx" else p.replace(kind=p.KEYWORD_ONLY)
                for p in own if p.name not in tail]
        last = [p.replace(kind=p.KEYWORD_ONLY) for p in own if p.name in tail]
        setting_names = {p.name for p in added}

        def command_fn(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        command_fn.__name__, command_fn.__qualname__ = fn.__name__, fn.__qualname__
        command_fn.__doc__, command_fn.__module__ = fn.__doc__, fn.__module__
        command_fn.__wrapped_command__ = fn  # type: ignore[attr-defined]
        command_fn.__signature__ = inspect.Signature(head + added + last)  # type: ignore[attr-defined]
        command_fn.__annotations__ = {p.name: p.annotation for p in head + added + last}
        command_fn.setting_params = frozenset(setting_names)  # type: ignore[attr-defined]
        return command_fn

    return wrap


def by_param(command: str) -> dict[str, Setting]:
    """``command``'s catalogue options by CLI parameter name."""
    return {s.param: s for s in in_cli(command)}


__all__ = [
    "ACCOUNTANTS", "AGGREGATIONS", "BY_KEY", "CATALOGUE", "CLIS", "Check", "Cli", "DEVICES", "FACTORY",
    "GRAD_SAMPLE_MODES", "MODELS", "RUN_NAME", "SCOPES", "Setting", "TASKS", "by_param", "cli_options", "defaults",
    "in_cli", "keys", "option_annotation", "option_default", "option_help",
]
