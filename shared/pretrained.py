"""Pretrained base models from a local folder, fine-tuned with LoRA: ``--model hf:DIR``.

A base is an ordinary Hugging Face folder (``config.json``, safetensors weights,
a fast tokenizer's ``tokenizer.json``).  A run names it by the SHA-256 of its
weights (:attr:`BaseModel.digest`), never by a path: the coordinator and every
department each load their *own* copy, found by that digest among the folders
their host allows (``department start --base-model DIR``), so a department never
loads weights the coordinator sends.

What is refused, always:

* weights in pickle formats (``pytorch_model.bin``, ``*.pt``, ``*.ckpt``,
  ``*.pkl``): only safetensors load, and ``from_pretrained`` is told so;
* a tokenizer without ``tokenizer.json`` (a slow tokenizer may need a pickled
  vocabulary or code): only the ``tokenizers`` library's JSON loads;
* remote code, and any download (``local_files_only``; the hub is set offline
  before ``transformers`` is imported).

The model that trains on a base is :class:`fedsilo.shared.text_model.TextModel`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from . import safe_read

PREFIX = "hf:"
DIGEST = re.compile(r"^hf:sha256:([0-9a-f]{64})$")
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
# Every file a tokenizer may read besides tokenizer.json; all of them enter its digest.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack")
MAX_CONFIG_BYTES = 1 << 20
# Token ids travel through the float32 feature matrix: exact below 2^24.
MAX_VOCABULARY = 1 << 24
MAX_LENGTH = 4096
DEFAULT_MAX_LENGTH = 128
DEFAULT_LORA_RANK = 8
DEFAULT_LORA_ALPHA = 16.0


class BaseModelError(ValueError):
    """A base model folder that cannot be used, or a run's base this host does not hold."""


def is_pretrained(spec: str) -> bool:
    return spec.startswith(PREFIX)


def spec_of(digest: str) -> str:
    """The model setting a run carries: ``hf:sha256:HEX``."""
    return f"{PREFIX}sha256:{digest}"


def digest_of_spec(spec: str) -> str:
    """The weights digest named by a run's ``hf:sha256:HEX`` model setting."""
    match = DIGEST.match(spec)
    if not match:
        raise BaseModelError(
            f"model '{spec}' names no base by its weights' digest; a run carries hf:sha256:<64 hex digits> "
            "(fedsilo simulate and coordinator run turn --model hf:DIR into it)"
        )
    return match.group(1)


def _sha256_files(folder: Path, names: Iterable[str]) -> str:
    """SHA-256 over (name, length, bytes) of each file, in the order given."""
    h = hashlib.sha256()
    for name in names:
        path = folder / name
        size = path.stat().st_size
        h.update(name.encode() + b"\0" + str(size).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class BaseModel:
    """A checked base model folder and what names it."""

    folder: Path
    digest: str           # SHA-256 of the weights: the run's name for this base
    tokenizer_digest: str  # SHA-256 of the tokenizer's files: the schema's name for the tokenizer
    model_type: str
    hidden_size: int
    vocab_size: int
    max_positions: int
    weight_files: tuple[str, ...]

    @property
    def spec(self) -> str:
        return spec_of(self.digest)

    def describe(self) -> str:
        return f"{self.model_type} base {self.folder} (weights sha256 {self.digest[:12]}…, hidden {self.hidden_size})"


_opened: dict[tuple[str, int, int], BaseModel] = {}


def open_base(folder: Path | str) -> BaseModel:
    """Check a base model folder and compute its digests (cached per folder, size and mtime).

    Raises
    ------
    BaseModelError
        The folder is missing, holds pickled weights only, lacks ``config.json``
        or ``tokenizer.json``, or its config is not a text encoder's.
    """
    folder = Path(folder).expanduser().resolve()
    where = f"base model folder '{folder}'"
    if not folder.is_dir():
        raise BaseModelError(f"{where} does not exist; pass a Hugging Face model folder (config.json, model.safetensors, tokenizer.json)")
    weights = _weight_files(folder, where)
    stamp = sum(int((folder / w).stat().st_mtime_ns) for w in weights)
    key = (str(folder), sum((folder / w).stat().st_size for w in weights), stamp)
    if key in _opened:
        return _opened[key]
    if not (folder / "config.json").is_file():
        raise BaseModelError(f"{where} has no config.json; it must be a Hugging Face model folder")
    config = safe_read.load_json(folder / "config.json", "base model config", MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise BaseModelError(f"{where}: config.json is not a JSON object")
    if not (folder / TOKENIZER).is_file():
        raise BaseModelError(
            f"{where} has no {TOKENIZER}; fedsilo loads only fast tokenizers from JSON "
            "(save one with tokenizer.save_pretrained on a PreTrainedTokenizerFast)"
        )
    if config.get("auto_map"):
        raise BaseModelError(f"{where}: config.json asks for remote code (auto_map); fedsilo runs no code from a model folder")
    numbers = {k: config.get(k) for k in ("hidden_size", "vocab_size", "max_position_embeddings")}
    if not all(type(v) is int and v > 0 for v in numbers.values()):
        raise BaseModelError(
            f"{where}: config.json needs positive integers hidden_size, vocab_size and max_position_embeddings "
            f"(a text encoder's), got {numbers}"
        )
    if numbers["vocab_size"] > MAX_VOCABULARY:
        raise BaseModelError(f"{where}: a vocabulary of {numbers['vocab_size']} tokens; at most {MAX_VOCABULARY} are supported")
    tokenizer_files = tuple(n for n in TOKENIZER_FILES if (folder / n).is_file())
    base = BaseModel(
        folder=folder,
        digest=_sha256_files(folder, weights),
        tokenizer_digest=_sha256_files(folder, tokenizer_files),
        model_type=str(config.get("model_type", "unknown")),
        hidden_size=numbers["hidden_size"],
        vocab_size=numbers["vocab_size"],
        max_positions=numbers["max_position_embeddings"],
        weight_files=weights,
    )
    _opened[key] = base
    return base


def _weight_files(folder: Path, where: str) -> tuple[str, ...]:
    if (folder / WEIGHTS).is_file():
        return (WEIGHTS,)
    if (folder / SHARD_INDEX).is_file():
        index = safe_read.load_json(folder / SHARD_INDEX, "safetensors shard index", MAX_CONFIG_BYTES)
        shards = sorted(set(index.get("weight_map", {}).values())) if isinstance(index, dict) else []
        if shards and all(isinstance(s, str) and s.endswith(".safetensors") and "/" not in s and (folder / s).is_file() for s in shards):
            return tuple(shards)
        raise BaseModelError(f"{where}: {SHARD_INDEX} does not list safetensors shards that are all in the folder")
    pickled = sorted(p.name for pattern in PICKLES for p in folder.glob(pattern))
    if pickled:
        raise BaseModelError(
            f"{where} holds weights only as {', '.join(pickled[:3])}: fedsilo never loads pickles; convert them "
            "to safetensors (model.save_pretrained(DIR, safe_serialization=True)) on a trusted machine"
        )
    raise BaseModelError(f"{where} has no {WEIGHTS}; pass a Hugging Face model folder saved with safetensors")


def find_base(spec: str, folders: Iterable[Path | str], holder: str = "this host's base models") -> BaseModel:
    """The base among ``folders`` whose weights have the digest ``spec`` names.

    Raises
    ------
    BaseModelError
        None of them does: the message names the digest, and the folders looked in.
    """
    digest = digest_of_spec(spec)
    looked = []
    for folder in folders:
        base = open_base(folder)
        if base.digest == digest:
            return base
        looked.append(f"{base.folder} ({base.digest[:12]}…)")
    raise BaseModelError(
        f"the run's base model (weights sha256 {digest}) is not among {holder}"
        + (f" ({', '.join(looked)})" if looked else " (none given)")
        + "; give a folder holding exactly those weights with --base-model DIR"
    )


def offline() -> None:
    """No hub, no telemetry, before ``transformers`` or ``huggingface_hub`` is imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def load_tokenizer(base: BaseModel):
    """The base's fast tokenizer, from its JSON files only."""
    offline()
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config: Any = {}
    if (base.folder / "tokenizer_config.json").is_file():
        # Hugging Face writes model_max_length as a 31-digit integer, which fedsilo's strict reader refuses;
        # only a few names are read from it, from a bounded file.
        text = safe_read.read_text(base.folder / "tokenizer_config.json", MAX_CONFIG_BYTES, "tokenizer config")
        try:
            config = json.loads(text)
        except ValueError as err:
            raise BaseModelError(f"base model folder '{base.folder}': tokenizer_config.json is not JSON ({err})") from None
        config = config if isinstance(config, dict) else {}
    special = {k: config[k] for k in ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token", "bos_token", "eos_token")
               if isinstance(config.get(k), str)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(base.folder / TOKENIZER), **special)
    if tokenizer.pad_token is None:
        raise BaseModelError(f"base model folder '{base.folder}': its tokenizer has no pad token (tokenizer_config.json pad_token)")
    return tokenizer


def tokenize(tokenizer, texts: list[str], max_length: int):
    """Token ids (N, max_length) as float32, padded with the pad id; ids are exact in float32."""
    import numpy as np

    encoded = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length",
                        return_attention_mask=False, return_token_type_ids=False)
    return np.asarray(encoded["input_ids"], dtype=np.int64).astype(np.float32), int(tokenizer.pad_token_id)


# --------------------------------------------------------------------------- LoRA


@dataclass(frozen=True)
class LoraSettings:
    """LoRA's rank, scaling and target modules (empty: peft's default for the architecture)."""

    rank: int = DEFAULT_LORA_RANK
    alpha: float = DEFAULT_LORA_ALPHA
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (type(self.rank) is int and 1 <= self.rank <= 1024):
            raise ValueError(f"lora-rank must be a whole number in [1, 1024], got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1e6):
            raise ValueError(f"lora-alpha must be a positive number, got {self.alpha!r}")
        if not all(isinstance(t, str) and re.match(r"^[A-Za-z_][\w.]*$", t) for t in self.targets):
            raise ValueError(f"lora-targets must be module names such as query,value; got {self.targets!r}")

    @classmethod
    def parse(cls, rank: int, alpha: float, targets: str) -> "LoraSettings":
        return cls(int(rank), float(alpha), tuple(t.strip() for t in targets.split(",") if t.strip()))

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}




def resolve_model_option(model: str) -> tuple[str, str]:
    """A command's ``--model``: ``hf:DIR`` → (``hf:sha256:HEX``, the folder); anything else → (itself, "").

    Raises
    ------
    BaseModelError
        ``hf:`` names no usable folder (a digest is what a run carries, not what a user passes).
    """
    if not is_pretrained(model):
        return model, ""
    target = model[len(PREFIX):]
    if DIGEST.match(model) and not Path(target).expanduser().exists():
        raise BaseModelError(f"--model {model}: give the base model's folder (hf:DIR); the digest is what fedsilo sends")
    base = open_base(target)
    return base.spec, str(base.folder)


_tokenizers: dict[str, Any] = {}


def tokenizer_of(base: BaseModel):
    """The base's tokenizer, loaded once per process."""
    if base.tokenizer_digest not in _tokenizers:
        _tokenizers[base.tokenizer_digest] = load_tokenizer(base)
    return _tokenizers[base.tokenizer_digest]


def pretrained_schema(schema, base: BaseModel, max_length: int):
    """A drafted schema turned into one a pretrained base reads: its one text column, tokenized.

    Raises
    ------
    BaseModelError
        The schema has other input columns, or none that holds text.
    """
    from .schema import Column, DataSchema

    if max_length > base.max_positions:
        raise BaseModelError(f"--max-length {max_length} is more than the base's {base.max_positions} positions; lower it")
    inputs = schema.inputs
    if len(inputs) != 1 or inputs[0].kind == "numeric":
        shown = ", ".join(f"{c.name} ({c.kind})" for c in inputs[:6])
        raise BaseModelError(
            f"a pretrained base reads one text column, and the data has {len(inputs)} input column(s): {shown}; "
            "name the text column with --feature-columns TEXT"
        )
    text = Column(inputs[0].name, "text", encoder="model", max_length=int(max_length), tokenizer=base.tokenizer_digest)
    columns = tuple(text if c.name == text.name else c for c in schema.columns)
    return DataSchema(schema.label, columns, tokenizer_of(base))


def bind_tokenizer(schema, base: BaseModel | None):
    """``schema`` bound to ``base``'s tokenizer when it has a tokenized column (this party's own copy)."""
    if schema is None or schema.token_column is None:
        return schema
    if base is None:
        raise BaseModelError(
            f"the run's schema tokenizes column '{schema.token_column.name}' with a base model's tokenizer, "
            "and the run names no base model (--model hf:DIR)")
    return schema.with_tokenizer(tokenizer_of(base), base.tokenizer_digest)


def schema_with_own_tokenizer(schema, folders: Iterable[Path | str]):
    """``schema`` bound to the tokenizer it names, from the first of this host's ``folders`` that holds it."""
    column = None if schema is None else schema.token_column
    if column is None:
        return schema
    for folder in folders:
        base = open_base(folder)
        if base.tokenizer_digest == column.tokenizer:
            return bind_tokenizer(schema, base)
    raise BaseModelError(
        f"schema column '{column.name}' is tokenized with tokenizer sha256 {column.tokenizer}, and none of this "
        "host's base models (--base-model DIR) has that tokenizer")


def lora_of(settings) -> LoraSettings:
    """The LoRA settings a run carries (``lora-rank``, ``lora-alpha``, ``lora-targets``)."""
    return LoraSettings.parse(settings.lora_rank, settings.lora_alpha, settings.lora_targets)
