"""The federation's public data schema: how every party turns its own table into features.

A :class:`DataSchema` is drafted once from a table the coordinator may look at
(``fedsilo schema infer``), edited by hand if need be, and sent with the run, so
every department encodes its private table the same way: the same columns in
the same order, the same category lists, the same imputation values and scaling,
the same hashed text features, the same label codes.  A department computes
nothing from its records to encode them: every statistic here comes from the
schema, which is public.

Column kinds
------------
``numeric``      ``(value - mean) / scale``; a missing value becomes ``fill``
                 (``impute`` says where it came from: median, mean, zero) or is
                 an error (``impute: "error"``); ``indicator`` adds a 0/1 column.
``categorical``  the declared ``categories``; anything else — missing or unseen —
                 goes to one extra "other" slot.  ``encoding: "onehot"`` gives one
                 column per slot; ``"embedding"`` gives one column holding the slot
                 index, which the built-in MLP embeds (a factory model gets it as
                 a float).
``text``         ``encoder: "hashing"`` (the default): hashed word or character
                 n-grams (scikit-learn's ``HashingVectorizer``: stateless, no
                 vocabulary, no downloads), ``features`` columns, L2-normalized
                 per row.  ``encoder: "model"``: the token ids of the run's
                 pretrained base's tokenizer (``tokenizer`` is the SHA-256 of its
                 files, :mod:`fedsilo.shared.pretrained`), ``max_length`` columns,
                 truncated and padded with its pad id.  A tokenizer is public, so
                 tokenizing releases nothing; a party encodes with its *own* copy
                 of that tokenizer (:meth:`DataSchema.with_tokenizer`).
``ignore``       read from nobody's table (identifiers, free-form dates, ...).

Limits
------
A schema is public input from whoever drafted it, so it is bounded before
anything is allocated from it: at most :data:`MAX_SCHEMA_FEATURES` encoded
features in all, :data:`MAX_SCHEMA_CATEGORIES` categories per column and
classes per label, :data:`MAX_SCHEMA_COLUMNS` columns, names of at most
:data:`MAX_NAME` characters; a ``scale`` is a normal finite positive float whose
reciprocal is finite (a subnormal such as 1e-320 would encode to ∞).  Files are
read with :mod:`fedsilo.shared.safe_read`; encoding refuses a table whose
feature matrix would pass :data:`MAX_ENCODED_CELLS` and any value that encodes
to a non-finite number.  A department's policy may set tighter limits.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import safe_read
from .safe_read import UnreadableFile

TASKS = ("binary", "multiclass", "regression")
KINDS = ("numeric", "categorical", "text", "ignore")
ENCODINGS = ("onehot", "embedding")
IMPUTATIONS = ("median", "mean", "zero", "error")
ANALYZERS = ("word", "char_wb")
TEXT_ENCODERS = ("hashing", "model")
SCHEMA_FORMAT = "fedsilo-schema"
SCHEMA_VERSION = 1
TEXT_FEATURES = 64  # hashed features of a text column a drafted schema gives
# Hard limits of the schema format (a department's policy may be tighter).
MAX_SCHEMA_FEATURES = 1 << 20
MAX_TEXT_FEATURES = 1 << 20
MAX_TEXT_TOKENS = 4096
MAX_SCHEMA_CATEGORIES = 100_000
MAX_SCHEMA_COLUMNS = 10_000
MAX_NAME = 1024
MAX_SCHEMA_BYTES = 16 << 20
# rows × features of one encoded table: 2^27 cells is 512 MiB as float32.
MAX_ENCODED_CELLS = 1 << 27


class DataError(ValueError):
    """Input data cannot be used; the message names the file/column and the fix."""


class SchemaError(DataError):
    """A schema file, or a table that does not fit it; the message names the column and the fix."""


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _scale_ok(value: Any) -> bool:
    """A normal (not subnormal), finite, positive float with a finite reciprocal."""
    return _number(value) and value >= sys.float_info.min and math.isfinite(1.0 / value)


def _text_ok(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class Column:
    """One input column of the schema (see the module docstring for the kinds)."""

    name: str
    kind: str
    # numeric
    mean: float = 0.0
    scale: float = 1.0
    impute: str = "median"
    fill: float = 0.0
    indicator: bool = False
    # categorical
    categories: tuple[str, ...] = ()
    encoding: str = "onehot"
    # text
    features: int = TEXT_FEATURES
    ngrams: tuple[int, int] = (1, 2)
    analyzer: str = "word"
    encoder: str = "hashing"
    max_length: int = 128
    tokenizer: str = ""

    def __post_init__(self) -> None:
        if not _text_ok(self.name):
            raise SchemaError(f"every schema column needs a name of 1 to {MAX_NAME} characters, got {_shown(self.name)}")
        where = f"schema column '{self.name}'"
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise SchemaError(f"{where}: kind {_shown(self.kind)} is not one of {', '.join(KINDS)}")
        if self.kind == "numeric":
            if not (_number(self.mean) and _scale_ok(self.scale)):
                raise SchemaError(
                    f"{where}: mean must be a finite number and scale a normal positive number "
                    f"(at least {sys.float_info.min:.3g}, with a finite 1/scale), got {_shown(self.mean)}, {_shown(self.scale)}"
                )
            if not isinstance(self.impute, str) or self.impute not in IMPUTATIONS:
                raise SchemaError(f"{where}: impute {_shown(self.impute)} is not one of {', '.join(IMPUTATIONS)}")
            if not _number(self.fill):
                raise SchemaError(f"{where}: fill must be a finite number")
            if type(self.indicator) is not bool:
                raise SchemaError(f"{where}: indicator must be true or false")
        if self.kind == "categorical":
            if not isinstance(self.categories, (tuple, list)) or len(self.categories) > MAX_SCHEMA_CATEGORIES:
                raise SchemaError(f"{where}: categories must be a list of at most {MAX_SCHEMA_CATEGORIES} values")
            if not all(type(c) in (str, int, float, bool) and len(str(c)) <= MAX_NAME for c in self.categories):
                raise SchemaError(f"{where}: each category must be a text or number of at most {MAX_NAME} characters")
            object.__setattr__(self, "categories", tuple(str(c) for c in self.categories))
            if not self.categories:
                raise SchemaError(f"{where}: a categorical column needs its categories listed")
            if len(set(self.categories)) != len(self.categories):
                raise SchemaError(f"{where}: categories must be distinct")
            if not isinstance(self.encoding, str) or self.encoding not in ENCODINGS:
                raise SchemaError(f"{where}: encoding {_shown(self.encoding)} is not one of {', '.join(ENCODINGS)}")
        if self.kind == "text":
            if not (type(self.features) is int and 1 <= self.features <= MAX_TEXT_FEATURES):
                raise SchemaError(f"{where}: features must be a whole number in [1, {MAX_TEXT_FEATURES}]")
            if (not isinstance(self.ngrams, (tuple, list)) or len(self.ngrams) != 2
                    or not all(type(n) is int for n in self.ngrams)
                    or not 1 <= self.ngrams[0] <= self.ngrams[1] <= 8):
                raise SchemaError(f"{where}: ngrams must be [MIN, MAX] with 1 <= MIN <= MAX <= 8")
            object.__setattr__(self, "ngrams", tuple(self.ngrams))
            if not isinstance(self.analyzer, str) or self.analyzer not in ANALYZERS:
                raise SchemaError(f"{where}: analyzer {_shown(self.analyzer)} is not one of {', '.join(ANALYZERS)}")
            if not isinstance(self.encoder, str) or self.encoder not in TEXT_ENCODERS:
                raise SchemaError(f"{where}: encoder {_shown(self.encoder)} is not one of {', '.join(TEXT_ENCODERS)}")
            if self.encoder == "model":
                if not (type(self.max_length) is int and 1 <= self.max_length <= MAX_TEXT_TOKENS):
                    raise SchemaError(f"{where}: max_length must be a whole number in [1, {MAX_TEXT_TOKENS}]")
                if not (isinstance(self.tokenizer, str) and len(self.tokenizer) == 64
                        and all(c in "0123456789abcdef" for c in self.tokenizer)):
                    raise SchemaError(
                        f"{where}: encoder 'model' needs tokenizer, the SHA-256 (64 hex digits) of the base model's "
                        "tokenizer files; draft the schema with --model hf:DIR to fill it in")

    @property
    def width(self) -> int:
        """How many feature columns this column encodes to."""
        if self.kind == "numeric":
            return 1 + int(self.indicator)
        if self.kind == "categorical":
            return len(self.categories) + 1 if self.encoding == "onehot" else 1
        if self.kind == "text":
            return self.max_length if self.encoder == "model" else self.features
        return 0

    def feature_names(self) -> list[str]:
        if self.kind == "numeric":
            return [self.name] + ([f"{self.name} missing"] if self.indicator else [])
        if self.kind == "categorical":
            if self.encoding == "embedding":
                return [f"{self.name} (index)"]
            return [f"{self.name}={c}" for c in self.categories] + [f"{self.name}=<other>"]
        if self.kind == "text":
            return [f"{self.name}#{i}" for i in range(self.width)]
        return []

    def describe(self) -> str:
        """One line for people: kind, encoding, fill (shown by simulate and `schema infer`)."""
        if self.kind == "numeric":
            return (f"numeric, scaled (mean {self.mean:.4g}, scale {self.scale:.4g}), missing → {self.impute} {self.fill:.4g}"
                    + (" + indicator" if self.indicator else ""))
        if self.kind == "categorical":
            shown = ", ".join(self.categories[:6]) + (", …" if len(self.categories) > 6 else "")
            return f"categorical ({len(self.categories)}: {shown} + other), {self.encoding}"
        if self.kind == "text" and self.encoder == "model":
            return f"text, the base model's tokens (at most {self.max_length}; tokenizer {self.tokenizer[:12]}…)"
        if self.kind == "text":
            return f"text, {self.features} hashed {self.analyzer} {self.ngrams[0]}–{self.ngrams[1]}-grams"
        return "ignored"

    def to_dict(self) -> dict[str, Any]:
        """Only the fields of its kind: the file stays short and editable."""
        keep = {
            "numeric": ("mean", "scale", "impute", "fill", "indicator"),
            "categorical": ("categories", "encoding"),
            "text": ("encoder", "max_length", "tokenizer") if self.encoder == "model" else ("features", "ngrams", "analyzer"),
            "ignore": (),
        }[self.kind]
        body = asdict(self)
        out = {"name": self.name, "kind": self.kind}
        out.update({k: (list(body[k]) if isinstance(body[k], tuple) else body[k]) for k in keep})
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> "Column":
        if not isinstance(raw, dict) or "name" not in raw or "kind" not in raw:
            raise SchemaError(f"each schema column must be an object with 'name' and 'kind', got {_shown(raw)}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(map(str, set(raw) - known))
        if unknown:
            raise SchemaError(f"schema column {_shown(raw['name'])}: unknown field(s) {', '.join(unknown)[:200]}; known: {', '.join(sorted(known))}")
        try:
            return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()})
        except (TypeError, ValueError) as err:
            raise SchemaError(f"schema column {_shown(raw['name'])}: {err}") from None


@dataclass(frozen=True)
class Label:
    """The target: class labels in code order, or a regression target's public scaling."""

    column: str
    task: str
    classes: tuple[str, ...] = ()
    mean: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not _text_ok(self.column):
            raise SchemaError(f"the label column must be a name of 1 to {MAX_NAME} characters, got {_shown(self.column)}")
        if not isinstance(self.task, str) or self.task not in TASKS:
            raise SchemaError(f"label task {_shown(self.task)} is not one of {', '.join(TASKS)}")
        if not isinstance(self.classes, (tuple, list)) or len(self.classes) > MAX_SCHEMA_CATEGORIES:
            raise SchemaError(f"label '{self.column}': classes must be a list of at most {MAX_SCHEMA_CATEGORIES} values")
        if not all(type(c) in (str, int, float, bool) and len(str(c)) <= MAX_NAME for c in self.classes):
            raise SchemaError(f"label '{self.column}': each class must be a text or number of at most {MAX_NAME} characters")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if self.task == "regression":
            if self.classes:
                raise SchemaError("a regression label has no classes; remove 'classes' or change the task")
            if not (_number(self.mean) and _scale_ok(self.scale)):
                raise SchemaError("a regression label needs a finite mean and a normal positive scale (with a finite 1/scale)")
        else:
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
                raise SchemaError(f"label '{self.column}': a classifier needs at least two distinct classes, got {list(self.classes)}")
            if self.task == "binary" and len(self.classes) != 2:
                raise SchemaError(f"label '{self.column}': task binary needs exactly two classes, got {len(self.classes)}; use multiclass")

    @property
    def num_outputs(self) -> int:
        return 1 if self.task == "regression" else len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"column": self.column, "task": self.task}
        if self.task == "regression":
            out.update(mean=self.mean, scale=self.scale)
        else:
            out["classes"] = list(self.classes)
        return out


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class DataSchema:
    """The label and the input columns, in feature order."""

    label: Label
    columns: tuple[Column, ...] = field(default_factory=tuple)
    # The tokenizer this party encodes ``encoder: model`` text with: its own copy, never sent.
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.columns) > MAX_SCHEMA_COLUMNS:
            raise SchemaError(f"the schema has {len(self.columns)} columns; at most {MAX_SCHEMA_COLUMNS} are allowed")
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise SchemaError("schema columns must have distinct names")
        if self.label.column in names:
            raise SchemaError(f"the label column '{self.label.column}' cannot also be an input column")
        if self.num_features < 1:
            raise SchemaError("the schema has no input column (every column is 'ignore'); keep at least one")
        if self.num_features > MAX_SCHEMA_FEATURES:
            widest = max(self.inputs, key=lambda c: c.width)
            raise SchemaError(
                f"the schema encodes {self.num_features} features, more than the {MAX_SCHEMA_FEATURES} allowed "
                f"(widest: column '{widest.name}', {widest.width}); lower the text columns' features or the categories"
            )

    # ---------------------------------------------------------------- shape
    @property
    def inputs(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.kind != "ignore")

    @property
    def num_features(self) -> int:
        return sum(c.width for c in self.inputs)

    @property
    def feature_names(self) -> list[str]:
        return [n for c in self.inputs for n in c.feature_names()]

    @property
    def task(self) -> str:
        return self.label.task

    @property
    def token_column(self) -> Column | None:
        """The text column a pretrained base reads (``encoder: model``), if any."""
        return next((c for c in self.inputs if c.kind == "text" and c.encoder == "model"), None)

    def with_tokenizer(self, tokenizer: Any, digest: str) -> "DataSchema":
        """This schema bound to this party's copy of the tokenizer, which must have the schema's digest.

        Raises
        ------
        SchemaError
            The schema's text column names another tokenizer.
        """
        column = self.token_column
        if column is None:
            return self
        if column.tokenizer != digest:
            raise SchemaError(
                f"schema column '{column.name}' is tokenized with tokenizer sha256 {column.tokenizer}, but this "
                f"host's base model has tokenizer {digest}; use a base folder whose tokenizer files match"
            )
        return DataSchema(self.label, self.columns, tokenizer)

    @property
    def embeddings(self) -> tuple[tuple[int, int], ...]:
        """(feature index, number of slots) of every embedding-encoded column."""
        out, at = [], 0
        for column in self.inputs:
            if column.kind == "categorical" and column.encoding == "embedding":
                out.append((at, len(column.categories) + 1))
            at += column.width
        return tuple(out)

    # ---------------------------------------------------------------- encoding
    def encode(self, frame, source: str = "the table", max_cells: int | None = MAX_ENCODED_CELLS) -> np.ndarray:
        """The feature matrix (float32) of ``frame``, in schema order (:func:`fedsilo.shared.encoding.encode_features`).

        ``max_cells`` bounds rows × features; a department passes None, having
        bounded its table against its own limits when it started.

        Raises
        ------
        SchemaError
            A schema column is missing from the table, a numeric column holds text
            or infinite values, or a missing value where ``impute`` is ``error``.
        """
        from .encoding import encode_features

        return encode_features(self, frame, source, max_cells)

    def check_columns(self, frame, source: str = "the table") -> None:
        """The schema's input columns are all in ``frame`` (a property of the table, not of a record)."""
        from .encoding import check_columns

        check_columns(self, frame, source)

    def encodable_rows(self, frame) -> np.ndarray:
        """Which rows of ``frame`` encode, each decided from that row alone (:func:`fedsilo.shared.encoding.encodable_rows`)."""
        from .encoding import encodable_rows

        return encodable_rows(self, frame)

    def encode_labels(self, frame, source: str = "the table") -> np.ndarray:
        """Integer codes (classification) or the standardized target (regression)."""
        from .encoding import encode_labels

        return encode_labels(self, frame, source)

    def decode_predictions(self, outputs: np.ndarray) -> np.ndarray:
        """Regression outputs back in the target's units (classification: unchanged)."""
        if self.task == "regression":
            return outputs.reshape(-1) * self.label.scale + self.label.mean
        return outputs

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return {"format": SCHEMA_FORMAT, "version": SCHEMA_VERSION, "label": self.label.to_dict(),
                "columns": [c.to_dict() for c in self.columns]}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "the schema") -> "DataSchema":
        if not isinstance(raw, dict) or raw.get("format") != SCHEMA_FORMAT:
            raise SchemaError(f"{source} is not a fedsilo schema (no \"format\": \"{SCHEMA_FORMAT}\"); draft one with `fedsilo schema infer`")
        if raw.get("version") != SCHEMA_VERSION:
            raise SchemaError(f"{source} has schema version {_shown(raw.get('version'))}; this fedsilo reads version {SCHEMA_VERSION}")
        unknown = sorted(map(str, set(raw) - {"format", "version", "label", "columns"}))
        if unknown:
            raise SchemaError(f"{source}: unknown field(s) {', '.join(unknown)}")
        label = raw.get("label")
        if not isinstance(label, dict) or "column" not in label or "task" not in label:
            raise SchemaError(f"{source}: 'label' must be an object with 'column' and 'task'")
        extra = sorted(map(str, set(label) - {"column", "task", "classes", "mean", "scale"}))
        if extra:
            raise SchemaError(f"{source}: unknown label field(s) {', '.join(extra)[:200]}")
        columns = raw.get("columns")
        if not isinstance(columns, list):
            raise SchemaError(f"{source}: 'columns' must be a list")
        if len(columns) > MAX_SCHEMA_COLUMNS:
            raise SchemaError(f"{source} has {len(columns)} columns; at most {MAX_SCHEMA_COLUMNS} are allowed")
        try:
            parsed = Label(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in label.items()})
        except (TypeError, ValueError) as err:
            if isinstance(err, SchemaError):
                raise
            raise SchemaError(f"{source}: label: {err}") from None
        return cls(parsed, tuple(Column.from_dict(c) for c in columns))

    @classmethod
    def from_json(cls, text: str, source: str = "the schema") -> "DataSchema":
        """A schema from JSON text (a file's, or the one a run sends), bounded in size and depth."""
        if len(text) > MAX_SCHEMA_BYTES:
            raise SchemaError(f"{source} is {len(text)} characters, more than the {MAX_SCHEMA_BYTES} a schema may be")
        try:
            raw = safe_read.parse_json(text, source, what="schema", expect=None)
        except UnreadableFile as err:
            raise SchemaError(f"{source}: {err.reason}; draft one with `fedsilo schema infer`") from None
        return cls.from_dict(raw, source)

    @classmethod
    def load(cls, path: Path | str) -> "DataSchema":
        """A schema file, read safely (a regular file, bounded, strict UTF-8)."""
        path = Path(path).expanduser()
        try:
            text = safe_read.read_text(path, MAX_SCHEMA_BYTES, "schema file")
        except UnreadableFile as err:
            raise SchemaError(f"cannot read schema file {err}") from None
        return cls.from_json(text, f"schema file '{path}'")

    def with_label_column(self, column: str) -> "DataSchema":
        """The same schema for a table whose label column has another name (a department's own)."""
        label = Label(column, self.label.task, self.label.classes, self.label.mean, self.label.scale)
        return DataSchema(label, tuple(c for c in self.columns if c.name != column), self.tokenizer)


def natural_order(value: str):
    """Numbers in numeric order, then text: codes stable across tables."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


# Moved to modules of their own; still importable from here.
from .schema_inference import MAX_CATEGORIES, MAX_CLASSES, infer_label, infer_schema  # noqa: E402,F401
from .tables import MAX_TABLE_BYTES, TABLE_SUFFIXES, read_table  # noqa: E402,F401
