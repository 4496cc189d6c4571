"""The model a run leaves behind: ``model.safetensors`` and a model card signed by the coordinator.

The card (``model-card.json``) says everything needed to use and to trust the
weights without running any pickle: the architecture (a built-in name or the
factory ``package.module:callable``, whether ``--fix-model`` applied), the
input schema with its encodings, the task and classes, the held-out metrics,
the run id, each department's whole-history ε at its δ (as acknowledged in the
coordinator's record: identity, ledger entry count and head hash), the
client-level ε where used, the fedsilo version, and the SHA-256 of the weights
file.  It is signed with the key that signs the coordinator's record.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from .record import load_any_public_key, public_key_line
from .signing import Signer, fingerprint, verify

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model-card.json"
CARD_FORMAT = "fedsilo-model-card"
CARD_VERSION = 1


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
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
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
    grad_sample_mode: str, status: str, rounds: int,
) -> dict[str, Any]:
    from fedsilo import __version__

    return {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        "run_id": run_id,
        "created": time.time(),
        "software": f"fedsilo {__version__}",
        "status": status,
        "rounds": rounds,
        "model": {"architecture": model, "kind": "factory" if ":" in model else "built-in",
                  "fix_model": fix_model, "input_shape": list(input_shape), "num_outputs": num_outputs,
                  "grad_sample_mode": grad_sample_mode},
        "weights": {"file": WEIGHTS_FILE, "format": "safetensors", "sha256": weights_sha256},
        "task": task,
        "classes": [str(c) for c in classes],
        "dataset": dataset,
        "schema": schema,
        "held_out": held_out,
        "metrics": {k: _finite(v) for k, v in metrics.items()},
        "privacy": {"record_level": departments, "client_level": client_level},
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
    path = Path(run_dir) / CARD_FILE
    if not path.exists():
        raise CardError(
            f"no {CARD_FILE} in '{run_dir}': point --model at a run folder written by fedsilo 0.3 or later"
        )
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CardError(f"'{path}' is not valid JSON ({err})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise CardError(f"'{path}' is not a fedsilo model card")
    if card.get("version") != CARD_VERSION:
        raise CardError(f"'{path}' has card version {card.get('version')!r}; this fedsilo reads version {CARD_VERSION}")
    return card


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
    elif file_sha256(weights) != card.get("weights", {}).get("sha256"):
        problems.append(f"'{weights.name}' does not match the SHA-256 in the model card: the weights were altered")
    return problems
