"""``fedsilo predict``: apply a run's model to new rows, through its signed card and schema.

Nothing here unpickles: the weights are safetensors, the architecture is a
built-in name, a factory imported from this environment or a pretrained base
the caller holds (``--base-model DIR``, found by its weights' digest), and the encodings
come from the schema inside the card — whose signature, and the weights'
SHA-256, are checked first.  Nothing is allocated from the card before it is
bounded: the schema's width (``shared/schema.py``'s limits), the input shape and
outputs against the schema, and the weights' parameter count (read from the
safetensors header, :data:`MAX_PARAMETERS`) are checked before a model is built.
A card signed by another key than the coordinator key beside the run is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsilo.audit import key_index
from fedsilo.shared.metrics import metrics_from_outputs
from fedsilo.shared.models import build_model, predict_outputs
from fedsilo.shared.pretrained import BaseModelError, LoraSettings, bind_tokenizer, find_base, spec_of
from fedsilo.shared.runs import resolve_run_dir
from fedsilo.shared.schema import DataSchema, SchemaError, read_table

from fedsilo.shared.model_card import WEIGHTS_FILE, CardError, card_problems, load_weights, read_card

# Parameters of a model predict builds: 2·10^8 float32 is 800 MB.
MAX_PARAMETERS = 200_000_000


def _weights_parameters(path: Path) -> int:
    """How many parameters the safetensors file holds, from its header only (nothing loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            total = 0
            for key in fh.keys():
                count = 1
                for n in fh.get_slice(key).get_shape():
                    count *= int(n)
                total += count
            return total
    except Exception as err:  # safetensors raises its own error types for a malformed header
        raise CardError(f"the weights file '{path}' is not a readable safetensors file ({str(err)[:200]})") from None


@dataclass
class Prediction:
    frame: object  # the input rows with the prediction columns appended
    metrics: dict[str, float] | None  # when the rows carry the label column
    card: dict
    trusted: str  # which key the card was checked against


def load_run_model(run_dir: Path, keys: Path | None = None, bases: tuple[Path | str, ...] = ()):
    """(card, schema, model, what the card was checked against) of a finished run (or an output folder's latest).

    A run that fine-tuned a pretrained base needs the caller's own copy of it among
    ``bases`` (found by the SHA-256 of its weights the card names).
    """
    run_dir = resolve_run_dir(run_dir)
    card = read_card(run_dir)
    trusted, where = None, "the key named in the card (consistency only: pass --keys to check who signed it)"
    if keys is not None:
        index, _ = key_index(Path(keys))
        if card.get("signer") not in index:
            raise CardError(f"the model card is signed by {card.get('signer')}, which is not among the keys in '{keys}'")
        name, trusted = index[card["signer"]]
        where = f"{Path(keys) / name}"
    elif (Path(run_dir) / "record" / "coordinator.pub").exists():
        index, _ = key_index(Path(run_dir) / "record")
        if card.get("signer") not in index:
            raise CardError(
                f"the model card is signed by {card.get('signer')}, not by the coordinator key beside the run "
                f"(record/coordinator.pub): it was re-signed by someone else; pass --keys with the coordinator key you trust"
            )
        trusted = index[card["signer"]][1]
        where = "the coordinator key beside the run (record/coordinator.pub: consistency only; pass --keys to check who signed it)"
    problems = card_problems(card, run_dir, trusted)
    if problems:
        raise CardError("; ".join(problems))
    if card.get("schema") is None:
        raise CardError(
            f"the run in '{run_dir}' trained on the embedded dataset '{card.get('dataset')}', which has no table schema; "
            "predict applies models trained on tables (CSV or Parquet)"
        )
    schema = DataSchema.from_dict(card["schema"], "the model card's schema")  # bounded in width
    spec = card["model"]
    shape = tuple(spec["input_shape"])
    if shape != (schema.num_features,) or int(spec["num_outputs"]) != schema.label.num_outputs:
        raise CardError(
            f"the model card's input shape {list(shape)[:4]} and {spec['num_outputs']} outputs do not match its "
            f"schema ({schema.num_features} features, {schema.label.num_outputs} outputs): the card is inconsistent"
        )
    parameters = _weights_parameters(Path(run_dir) / card["weights"].get("file", WEIGHTS_FILE))
    if parameters > MAX_PARAMETERS:
        raise CardError(f"the weights hold {parameters} parameters, more than the {MAX_PARAMETERS} predict loads")
    lora = None
    if spec.get("kind") == "pretrained":
        lora, schema = _pretrained_parts(spec, schema, bases)
    model = build_model(spec["architecture"], shape, int(spec["num_outputs"]), "tabular", task=card["task"],
                        embeddings=schema.embeddings, fix=bool(spec["fix_model"]),
                        bases=tuple(str(b) for b in bases), lora=lora)
    weights = load_weights(Path(run_dir) / card["weights"].get("file", WEIGHTS_FILE))
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CardError(f"the weights do not fit the model the card describes ({spec['architecture']}): {err}") from None
    return card, schema, model, where


def _pretrained_parts(spec: dict, schema: DataSchema, bases: tuple[Path | str, ...]):
    """LoRA's settings from the card, and the schema bound to the caller's own copy of the base's tokenizer."""
    parts = spec.get("pretrained")
    lora_raw = parts.get("lora") if isinstance(parts, dict) else None
    if not (isinstance(parts, dict) and isinstance(parts.get("base_weights_sha256"), str) and isinstance(lora_raw, dict)
            and type(lora_raw.get("rank")) is int and type(lora_raw.get("alpha")) in (int, float)
            and isinstance(lora_raw.get("targets"), list) and all(isinstance(t, str) for t in lora_raw["targets"])):
        raise CardError("the model card's pretrained section is missing or malformed: it is not a card fedsilo wrote")
    try:
        lora = LoraSettings(lora_raw["rank"], float(lora_raw["alpha"]), tuple(lora_raw["targets"]))
        if spec_of(parts["base_weights_sha256"]) != spec["architecture"]:
            raise CardError("the model card names two different base models: it is inconsistent")
        if not bases:
            raise BaseModelError(
                f"this run fine-tuned a pretrained base (weights sha256 {parts['base_weights_sha256']}); "
                "pass your copy of it with --base-model DIR")
        base = find_base(spec["architecture"], bases, "the --base-model folders given")
        return lora, bind_tokenizer(schema, base)
    except (BaseModelError, ValueError) as err:
        if isinstance(err, CardError):
            raise
        raise CardError(str(err)) from None


def predict_file(run_dir: Path, data: Path, keys: Path | None = None, bases: tuple[Path | str, ...] = ()) -> Prediction:
    """Predictions for every row of ``data``; metrics too when it holds the label column."""
    card, schema, model, where = load_run_model(run_dir, keys, bases)
    frame = read_table(data)
    source = f"'{data}'"
    x = schema.encode(frame, source)
    outputs = predict_outputs(model, x, tuple(card["model"]["input_shape"]))
    result = frame.copy()
    if schema.task == "regression":
        result["prediction"] = schema.decode_predictions(outputs)
    else:
        logits = outputs - outputs.max(axis=1, keepdims=True)
        probability = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        result["prediction"] = [schema.label.classes[i] for i in outputs.argmax(axis=1)]
        for i, name in enumerate(schema.label.classes):
            result[f"probability_{name}"] = probability[:, i]
    metrics = None
    if schema.label.column in frame.columns:
        metrics = metrics_from_outputs(outputs, schema.encode_labels(frame, source), schema.task, schema)
    return Prediction(result, metrics, card, where)


def write_predictions(frame, out: Path, overwrite: bool = False) -> None:
    """CSV or Parquet by suffix; an existing file is never replaced unless asked."""
    out = Path(out).expanduser()
    if out.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise SchemaError(f"--out '{out}' must end in .csv or .parquet")
    if out.exists() and not overwrite:
        raise FileExistsError(f"'{out}' already exists; choose another --out, or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    if out.suffix.lower() == ".csv":
        frame.to_csv(staging, index=False)
    else:
        frame.to_parquet(staging, index=False)
    staging.replace(out)
