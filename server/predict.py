"""``fedsilo predict``: apply a run's model to new rows, through its signed card and schema.

Nothing here unpickles: the weights are safetensors, the architecture is a
built-in name or a factory imported from this environment, and the encodings
come from the schema inside the card — whose signature, and the weights'
SHA-256, are checked first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsilo.shared.audit import key_index
from fedsilo.shared.metrics import metrics_from_outputs
from fedsilo.shared.models import build_model, predict_outputs
from fedsilo.shared.runs import resolve_run_dir
from fedsilo.shared.schema import DataSchema, SchemaError, read_table

from fedsilo.shared.model_card import CardError, card_problems, load_weights, read_card


@dataclass
class Prediction:
    frame: object  # the input rows with the prediction columns appended
    metrics: dict[str, float] | None  # when the rows carry the label column
    card: dict
    trusted: str  # which key the card was checked against


def load_run_model(run_dir: Path, keys: Path | None = None):
    """(card, schema, model, what the card was checked against) of a finished run (or an output folder's latest)."""
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
        if card.get("signer") in index:
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
    schema = DataSchema.from_dict(card["schema"], "the model card's schema")
    spec = card["model"]
    shape = tuple(spec["input_shape"])
    model = build_model(spec["architecture"], shape, int(spec["num_outputs"]), "tabular", task=card["task"],
                        embeddings=schema.embeddings, fix=bool(spec["fix_model"]))
    weights = load_weights(Path(run_dir) / card["weights"]["file"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CardError(f"the weights do not fit the model the card describes ({spec['architecture']}): {err}") from None
    return card, schema, model, where


def predict_file(run_dir: Path, data: Path, keys: Path | None = None) -> Prediction:
    """Predictions for every row of ``data``; metrics too when it holds the label column."""
    card, schema, model, where = load_run_model(run_dir, keys)
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
