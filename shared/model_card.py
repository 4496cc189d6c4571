"""The model a run leaves behind: ``model.safetensors`` and a model card signed by the coordinator.

The card (``model-card.json``) says everything needed to use and to trust the
weights without running any pickle: the architecture (a built-in name, the
factory ``package.module:callable``, whether ``--fix-model`` applied, or a
pretrained base by its weights' and tokenizer's SHA-256 with LoRA's settings), the
input schema with its encodings, the task and classes, the held-out metrics,
the run id, each department's whole-history ε at its δ (as acknowledged in the
coordinator's record: identity, ledger entry count and head hash), the
client-level ε where used, the fedsilo version, and the SHA-256 of the weights
file.  It is signed with the key that signs the coordinator's record.

A card is read with :mod:`fedsilo.shared.safe_read` and its shape checked
(:func:`read_card`) before anything uses it; its weights file must be a
regular file no larger than :data:`MAX_WEIGHTS_BYTES`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from . import safe_read
from .record import load_any_public_key, public_key_line
from .safe_read import UnreadableFile
from .signing import Signer, fingerprint, verify

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model-card.json"
CARD_FORMAT = "fedsilo-model-card"
CARD_VERSION = 1
MAX_CARD_BYTES = 16 << 20
MAX_WEIGHTS_BYTES = 8 << 30
# The fields a card must have, with their JSON types: checked before any is used.
_SHAPE = {"run_id": str, "signer": str, "public_key": str, "signature": str, "task": str,
          "model": dict, "weights": dict, "classes": list, "privacy": dict}
_MODEL_SHAPE = {"architecture": str, "fix_model": bool, "input_shape": list, "num_outputs": int}


class CardError(ValueError):
    """A model card that is missing, malformed, or does not verify; the message says which."""


def save_weights(state_dict: dict, path: Path) -> str:
    """Write the weights as safetensors (no pickle); returns their SHA-256."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    staging = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(staging))
    staging.replace(path)
    return file_sha256(path)


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a regular file (a FIFO or device is refused, never read)."""
    import os
    import stat

    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CardError(f"'{path}' is not a regular file")
        os.set_blocking(fd, True)
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _payload(card: dict[str, Any]) -> bytes:
    body = {k: v for k, v in card.items() if k != "signature"}
    return b"fedsilo-model-card-v1:" + json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def build_card(
    *, run_id: str, model: str, fix_model: bool, input_shape: tuple[int, ...], num_outputs: int, task: str,
    classes: tuple, schema: dict | None, dataset: str, held_out: dict[str, Any], metrics: dict[str, float],
    departments: list[dict[str, Any]], client_level: dict[str, Any] | None, weights_sha256: str,
    grad_sample_mode: str, status: str, rounds: int, pretrained: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The card's body (unsigned).  ``pretrained`` (:func:`pretrained_section`): the base and LoRA of an ``hf:`` model."""
    from fedsilo import __version__

    kind = "pretrained" if pretrained is not None else "factory" if ":" in model else "built-in"
    return {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        "run_id": run_id,
        "created": time.time(),
        "software": f"fedsilo {__version__}",
        "status": status,
        "rounds": rounds,
        "model": {"architecture": model, "kind": kind,
                  "fix_model": fix_model, "input_shape": list(input_shape), "num_outputs": num_outputs,
                  "grad_sample_mode": grad_sample_mode, **({"pretrained": pretrained} if pretrained else {})},
        "weights": {"file": WEIGHTS_FILE, "format": "safetensors", "sha256": weights_sha256},
        "task": task,
        "classes": [str(c) for c in classes],
        "dataset": dataset,
        "schema": schema,
        "held_out": held_out,
        "metrics": {k: _finite(v) for k, v in metrics.items()},
        "privacy": {"record_level": departments, "client_level": client_level},
    }


def pretrained_section(base, lora, model, max_length: int) -> dict[str, Any]:
    """What names an ``hf:`` model's parts: its base (by digests), the tokenizer, LoRA's settings, what trained.

    The weights file holds only the adapters and the head, so its SHA-256 (the
    card's ``weights``) is the adapters' hash; the base is not in the run folder
    and is named by the SHA-256 of its weights, which whoever predicts must hold.
    """
    trained = sum(v.numel() for v in model.state_dict().values())
    return {
        "base_weights_sha256": base.digest,
        "base_model_type": base.model_type,
        "base_hidden_size": base.hidden_size,
        "tokenizer_sha256": base.tokenizer_digest,
        "max_length": int(max_length),
        "lora": getattr(model, "lora", lora).to_dict(),  # the modules it adapted, by name
        "trained_parameters": int(trained),
        "total_parameters": int(sum(p.numel() for p in model.parameters())),
    }


def sign_card(card: dict[str, Any], signer: Signer) -> dict[str, Any]:
    signed = {**card, "signer": signer.fingerprint, "public_key": public_key_line(signer.public_key)}
    signed["signature"] = signer.sign(_payload(signed))
    return signed


def write_card(card: dict[str, Any], path: Path) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    staging.replace(path)


def read_card(run_dir: Path) -> dict[str, Any]:
    """The run's model card, read safely and checked for the shape every reader relies on.

    Raises
    ------
    CardError
        Missing, not a regular bounded UTF-8 JSON object, not a fedsilo card,
        another card version, or a field of the wrong type.
    """
    import os

    path = Path(run_dir) / CARD_FILE
    if not os.path.lexists(path):
        raise CardError(
            f"no {CARD_FILE} in '{run_dir}': point --model at a run folder written by fedsilo 0.3 or later"
        )
    try:
        card = safe_read.load_json(path, "model card", MAX_CARD_BYTES)
    except UnreadableFile as err:
        raise CardError(str(err)) from None
    if card.get("format") != CARD_FORMAT:
        raise CardError(f"'{path}' is not a fedsilo model card")
    if card.get("version") != CARD_VERSION:
        raise CardError(f"'{path}' has card version {str(card.get('version'))[:40]!r}; this fedsilo reads version {CARD_VERSION}")
    _check_shape(card, path)
    return card


def _check_shape(card: dict[str, Any], path: Path) -> None:
    def wrong(what: str) -> CardError:
        return CardError(f"'{path}': the card's {what} is missing or of the wrong type; it is not a card fedsilo wrote")

    for name, kind in _SHAPE.items():
        if not isinstance(card.get(name), kind):
            raise wrong(f"'{name}'")
    for name, kind in _MODEL_SHAPE.items():
        if type(card["model"].get(name)) is not kind:
            raise wrong(f"model '{name}'")
    shape = card["model"]["input_shape"]
    if not 1 <= len(shape) <= 4 or not all(type(n) is int and 1 <= n <= 1 << 24 for n in shape):
        raise wrong("model 'input_shape'")
    if not 1 <= card["model"]["num_outputs"] <= 1 << 24:
        raise wrong("model 'num_outputs'")
    weights = card["weights"]
    if not isinstance(weights.get("file", WEIGHTS_FILE), str) or not isinstance(weights.get("sha256"), str):
        raise wrong("weights")
    if Path(weights.get("file", WEIGHTS_FILE)).name != weights.get("file", WEIGHTS_FILE):
        raise wrong("weights file (a name in the run folder, no path)")
    if not all(isinstance(c, str) for c in card["classes"]):
        raise wrong("classes")
    if card.get("schema") is not None and not isinstance(card["schema"], dict):
        raise wrong("schema")
    privacy = card["privacy"]
    stated = privacy.get("record_level", [])
    if not isinstance(stated, list) or not all(
        isinstance(s, dict) and type(s.get("ledger_seq", 0)) is int and isinstance(s.get("epsilon"), (int, float, type(None)))
        for s in stated
    ):
        raise wrong("privacy record_level")
    central = privacy.get("client_level")
    if central is not None and not (isinstance(central, dict) and type(central.get("epsilon")) in (int, float)):
        raise wrong("privacy client_level")


def card_problems(card: dict[str, Any], run_dir: Path, trusted=None) -> list[str]:
    """Why the card must not be trusted: its signature, its key, its weights file.

    ``trusted`` is the coordinator's public key from a source the caller trusts;
    without it the card is only checked against the key it names (consistency).
    """
    problems = []
    key = load_any_public_key(str(card.get("public_key", "")))
    if key is None or fingerprint(key) != card.get("signer"):
        problems.append("the model card names a signing key that does not match its signer")
    elif trusted is not None and fingerprint(trusted) != card.get("signer"):
        problems.append(f"the model card is signed by {card.get('signer')}, not by the trusted coordinator key {fingerprint(trusted)}")
    elif not verify(key, _payload(card), str(card.get("signature", ""))):
        problems.append("the model card's signature does not verify: the card was altered after the coordinator signed it")
    weights = Path(run_dir) / str(card.get("weights", {}).get("file", WEIGHTS_FILE))
    if not weights.exists():
        problems.append(f"the weights file '{weights}' is missing")
    elif not weights.is_file() or weights.stat().st_size > MAX_WEIGHTS_BYTES:
        problems.append(f"the weights file '{weights}' is not a regular file of at most {MAX_WEIGHTS_BYTES} bytes")
    elif file_sha256(weights) != card.get("weights", {}).get("sha256"):
        problems.append(f"'{weights.name}' does not match the SHA-256 in the model card: the weights were altered")
    return problems
