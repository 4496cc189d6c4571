"""No file can crash a reader, hang it, or pass for what it is not.

Every reader of a file someone else may have written — ledger, coordinator
record, model card, schema, table, key — either reads it or raises its typed
error (never another exception), fuzzed with hypothesis; then each bad file
found by an attacker (issue 19) is tried against the real ``fedsilo audit``,
``schema check`` and ``predict``: exit code 2, one line, no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedsilo.cli import app
from fedsilo.shared import safe_read
from fedsilo.shared.accounting import Mechanism
from fedsilo.audit import audit_ledger, audit_path
from fedsilo.shared.ledger import LedgerEntry, LedgerError, PrivacyLedger, verify_ledger
from fedsilo.shared.model_card import CardError, read_card
from fedsilo.shared.record import verify_record
from fedsilo.shared.safe_read import UnreadableFile
from fedsilo.shared.schema import DataSchema, SchemaError, read_table
from fedsilo.shared.signing import SigningKeyError, load_public_key, simulated_identity

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)
runner = CliRunner()

# Any JSON value, small: what a crafted file may hold where a field should be.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Bytes a crafted file may hold: random, or JSON-ish text with the characters that matter.
NOISE = st.binary(max_size=400) | st.text(alphabet='{}[]",:0123456789.eE+-nulltrueINaf\\ \n\xe9', max_size=400).map(str.encode)


@pytest.fixture(scope="module")
def ledger_file(tmp_path_factory):
    """A real two-entry ledger written by the department's own code."""
    folder = tmp_path_factory.mktemp("ledger")
    ledger = PrivacyLedger(folder / "finance.jsonl", "finance", simulated_identity(folder, "finance"))
    for rnd in (1, 2):
        ledger.append(run_id="r1", round=rnd, mechanism=Mechanism(1.1, 0.1, 10), max_grad_norm=1.0, delta=1e-5,
                      accountant="pld", epsilon=0.5 * rnd, num_examples=100)
    return folder / "finance.jsonl"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _cli(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output, result.exception  # output: stdout and stderr, as a terminal shows them


# ---------------------------------------------------------------------------- fuzz


@FUZZ
@given(data=NOISE)
def test_any_bytes_as_a_ledger_are_read_or_named_never_raised(tmp_path, data):
    path = _write(tmp_path / "fuzz.jsonl", data)
    found = verify_ledger(path)  # never raises
    assert found.ok or found.problems
    try:
        PrivacyLedger(path, "fuzz")
    except LedgerError:
        pass
    row = audit_ledger(path)
    assert not row.verified  # random bytes never verify
    try:
        verify_record(path)
    except UnreadableFile:
        pass


@FUZZ
@given(field=st.sampled_from(sorted(LedgerEntry.__dataclass_fields__)), value=JSON)
def test_any_value_in_any_ledger_field_is_read_or_named(ledger_file, tmp_path, field, value):
    lines = ledger_file.read_text().splitlines()
    entry = json.loads(lines[1])
    entry[field] = value
    path = _write(tmp_path / "edited.jsonl", (lines[0] + "\n" + json.dumps(entry) + "\n").encode())
    found = verify_ledger(path)
    assert len(found.entries) + len(found.unreadable) >= 1
    try:
        PrivacyLedger(path, "finance")
    except LedgerError:
        pass
    else:
        assert not found.problems


@FUZZ
@given(data=NOISE | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_as_a_schema_or_card_are_read_or_refused(tmp_path, data):
    path = _write(tmp_path / "schema.json", data)
    with pytest.raises(SchemaError):
        DataSchema.load(path)
    _write(tmp_path / "model-card.json", data)
    with pytest.raises(CardError):
        read_card(tmp_path)


@FUZZ
@given(part=st.sampled_from(["label", "column"]), field=st.text(max_size=10) | st.sampled_from(
    ["name", "kind", "mean", "scale", "impute", "fill", "indicator", "categories", "encoding", "features", "ngrams",
     "analyzer", "column", "task", "classes"]), value=JSON)
def test_any_value_in_a_schema_field_is_read_or_refused(part, field, value):
    raw = {"format": "fedsilo-schema", "version": 1, "label": {"column": "y", "task": "binary", "classes": ["a", "b"]},
           "columns": [{"name": "x", "kind": "numeric", "mean": 0.0, "scale": 1.0}]}
    (raw["label"] if part == "label" else raw["columns"][0])[field] = value
    try:
        schema = DataSchema.from_json(json.dumps(raw))
    except SchemaError:
        return
    assert 1 <= schema.num_features <= 1 << 20


@FUZZ
@given(field=st.sampled_from(["run_id", "signer", "model", "weights", "classes", "privacy", "schema", "task"]),
       value=JSON)
def test_any_value_in_a_card_field_is_read_or_refused(tmp_path, field, value):
    card = {"format": "fedsilo-model-card", "version": 1, "run_id": "r", "signer": "s", "public_key": "k",
            "signature": "", "task": "binary", "classes": ["a", "b"], "schema": None,
            "model": {"architecture": "mlp", "fix_model": False, "input_shape": [3], "num_outputs": 2},
            "weights": {"file": "model.safetensors", "sha256": "0"}, "privacy": {"record_level": [], "client_level": None}}
    card[field] = value
    (tmp_path / "model-card.json").write_text(json.dumps(card))
    try:
        read_card(tmp_path)
    except CardError:
        pass
    result = audit_path(tmp_path)  # the card cross-check, never a crash
    assert not result.ok


@FUZZ
@given(data=NOISE)
def test_any_bytes_as_a_table_or_key_are_read_or_refused(tmp_path, data):
    try:
        read_table(_write(tmp_path / "t.csv", data))
    except SchemaError:
        pass
    with pytest.raises(SigningKeyError):
        load_public_key(_write(tmp_path / "k.pub", data))


# ---------------------------------------------------------------------------- safe_read


def test_safe_read_refuses_each_kind_of_bad_file_by_name(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    (tmp_path / "dir").mkdir()
    (tmp_path / "latin").write_bytes(b'{"a": "caf\xe9"}')
    (tmp_path / "big").write_bytes(b" " * 100)
    cases = {"fifo": "named pipe", "loop": "loops", "dir": "directory", "latin": r"byte 10 \(0xe9\)",
             "missing": "does not exist"}
    for name, expected in cases.items():
        with pytest.raises(UnreadableFile, match=expected) as err:
            safe_read.read_text(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(UnreadableFile, match="more than the 10"):
        safe_read.read_text(tmp_path / "big", max_bytes=10)
    for text, expected in [("[" * 100_000, "nests 100000 levels"), ('{"a": NaN}', "NaN"), ('{"a": 1e400}', "out of range"),
                           ('{"a": ' + "9" * 400 + "}", "400 digits"), ("[1]", "array where an object"),
                           ('"x"', "string where an object")]:
        with pytest.raises(UnreadableFile, match=expected):
            safe_read.parse_json(text, "f.json")
    assert safe_read.parse_json('{"a": "[[[[{{{{" , "b": [1, [2]]}' + " " * 10, "f") == {"a": "[[[[{{{{", "b": [1, [2]]}


# ---------------------------------------------------------------------------- the attacker's files


def _ledger_cases(tmp_path: Path, ledger_file: Path) -> dict[str, Path]:
    """Each bad ledger of issue 19, as a file named ``*.jsonl``."""
    good = ledger_file.read_text().splitlines()
    entry = json.loads(good[0])
    out = {}

    def line(name: str, text: str) -> None:
        out[name] = _write(tmp_path / f"{name}.jsonl", text.encode() + b"\n")

    out["binary"] = _write(tmp_path / "binary.jsonl", bytes(range(256)) * 4)
    out["latin-1"] = _write(tmp_path / "latin-1.jsonl", good[0].replace("finance", "financ\xe9").encode("latin-1") + b"\n")
    line("array-line", "[1, 2, 3]")
    line("string-line", '"a ledger"')
    line("nested", "[" * 100_000 + "]" * 100_000)
    line("steps-1e400", json.dumps({**entry, "steps": 0}).replace('"steps": 0', '"steps": 1e400'))
    line("steps-400-digits", json.dumps({**entry, "steps": 0}).replace('"steps": 0', '"steps": ' + "9" * 400))
    line("steps-1e15", json.dumps({**entry, "steps": 10**15}))
    (tmp_path / "directory.jsonl").mkdir()
    out["directory"] = tmp_path / "directory.jsonl"
    os.symlink(tmp_path / "loop.jsonl", tmp_path / "loop.jsonl")
    out["symlink-loop"] = tmp_path / "loop.jsonl"
    out["empty"] = _write(tmp_path / "empty.jsonl", b"")
    return out


def test_each_bad_ledger_is_unreadable_never_verified_and_never_raises(tmp_path, ledger_file):
    for name, path in _ledger_cases(tmp_path, ledger_file).items():
        found = verify_ledger(path)
        assert name == "empty" or found.unreadable, name
        with pytest.raises(LedgerError) if name != "empty" else _nothing():
            PrivacyLedger(path, "finance")
        row = audit_ledger(path)
        assert row.unreadable and not row.verified, (name, row.problems)
    assert "not valid JSON" not in " ".join(audit_ledger(tmp_path / "steps-1e15.jsonl").problems)
    assert "[0, 10000000]" in " ".join(audit_ledger(tmp_path / "steps-1e15.jsonl").problems)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_fedsilo_audit_exits_2_on_each_bad_ledger_without_a_traceback(tmp_path, ledger_file):
    cases = _ledger_cases(tmp_path, ledger_file)
    cases["missing"] = tmp_path / "missing-folder" / "none.jsonl"
    for name, path in cases.items():
        code, output, exception = _cli("audit", str(path))
        assert code == 2, (name, code, output, exception)
        assert "Traceback" not in output and "ledgers verified" not in output.lower(), (name, output)
    # In a folder beside a good ledger, and with --ledgers: still exit 2, never "All ledgers verified".
    folder = tmp_path / "collected"
    folder.mkdir()
    (folder / "finance.jsonl").write_text(ledger_file.read_text())
    (folder / "finance.pub").write_text((ledger_file.parent / "finance.pub").read_text())
    (folder / "empty.jsonl").write_text("")
    code, output, _ = _cli("audit", str(folder))
    assert code == 2 and "empty" in output and "All ledgers verified" not in output, output
    code, output, _ = _cli("audit", str(ledger_file), "--ledgers", str(tmp_path / "loop.jsonl"))
    assert code == 2 and "loops" in output, output


def test_a_fifo_ledger_does_not_hang_the_real_audit(tmp_path):
    """In a folder and given by name: the real command, in its own process, under a timeout."""
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "folder" / "fifo.jsonl")
    os.mkfifo(tmp_path / "given.jsonl")
    done = subprocess.run([sys.executable, "-m", "fedsilo", "audit", str(tmp_path / "folder"), "--ledgers",
                           str(tmp_path / "given.jsonl")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr + done.stdout
    assert done.stdout.count("named pipe") >= 2 and "Traceback" not in done.stderr, done.stdout


def test_schema_check_exits_2_on_binary_deep_huge_or_subnormal_schemas(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("x,y\n1,a\n2,b\n")
    base = {"format": "fedsilo-schema", "version": 1, "label": {"column": "y", "task": "binary", "classes": ["a", "b"]},
            "columns": [{"name": "x", "kind": "numeric", "mean": 0.0, "scale": 1.0}]}
    wide = {**base, "columns": [{"name": f"t{i}", "kind": "text", "features": 1 << 20} for i in range(64)]}
    many = {**base, "columns": [{"name": "c", "kind": "categorical", "categories": [str(i) for i in range(200_000)]}]}
    subnormal = {**base, "columns": [{"name": "x", "kind": "numeric", "mean": 0.0, "scale": 1e-320}]}
    cases = {
        "binary": bytes(range(256)), "nested": b"[" * 100_000, "wide": json.dumps(wide).encode(),
        "categories": json.dumps(many).encode(), "subnormal": json.dumps(subnormal).encode(),
        "array": b"[]", "nan": json.dumps(base).replace("0.0", "NaN").encode(),
    }
    for name, data in cases.items():
        path = _write(tmp_path / f"{name}.json", data)
        code, output, exception = _cli("schema", "check", str(path), "--data", str(table))
        assert code == 2 and "Traceback" not in output, (name, code, output, exception)
        assert "error:" in output and len(output.strip().splitlines()) == 1, (name, output)
    with pytest.raises(SchemaError, match="scale"):
        DataSchema.from_dict(subnormal)
    code, output, _ = _cli("schema", "check", str(_write(tmp_path / "ok.json", json.dumps(base).encode())), "--data", str(table))
    assert code == 0, output


# ---------------------------------------------------------------------------- predict


def _run_folder(tmp_path: Path, schema: DataSchema | None = None):
    """A run folder with real weights and a card signed by the coordinator's key (record/coordinator.pub)."""
    from fedsilo.shared.model_card import WEIGHTS_FILE, build_card, save_weights, sign_card, write_card
    from fedsilo.shared.models import build_model
    from fedsilo.shared.signing import Signer, generate_identity

    schema = schema or DataSchema.from_dict({
        "format": "fedsilo-schema", "version": 1, "label": {"column": "y", "task": "binary", "classes": ["a", "b"]},
        "columns": [{"name": "x", "kind": "numeric", "mean": 0.0, "scale": 1.0}]})
    run = tmp_path / "run"
    (run / "record").mkdir(parents=True)
    generate_identity(tmp_path / "coordinator.key", run / "record" / "coordinator.pub", "coordinator")
    model = build_model("mlp", (1,), 2, "tabular", task="binary")
    sha = save_weights(model.state_dict(), run / WEIGHTS_FILE)
    card = build_card(run_id="r", model="mlp", fix_model=False, input_shape=(1,), num_outputs=2, task="binary",
                      classes=("a", "b"), schema=schema.to_dict(), dataset="t.csv", held_out={}, metrics={},
                      departments=[], client_level=None, weights_sha256=sha, grad_sample_mode="ghost",
                      status="finished", rounds=1)
    return run, card, Signer.from_file(tmp_path / "coordinator.key")


def test_predict_refuses_a_re_signed_card_and_a_huge_schema_without_allocating(tmp_path):
    from fedsilo.shared.model_card import CARD_FILE, sign_card, write_card
    from fedsilo.shared.signing import Signer, generate_identity

    run, card, coordinator = _run_folder(tmp_path)
    table = tmp_path / "rows.csv"
    table.write_text("x,y\n1,a\n2,b\n")
    write_card(sign_card(card, coordinator), run / CARD_FILE)
    code, output, exception = _cli("predict", "--model", str(run), "--data", str(table), "--out", str(tmp_path / "p.csv"))
    assert code == 0, (output, exception)

    generate_identity(tmp_path / "mallory", tmp_path / "mallory.pub", "mallory")
    mallory = Signer.from_file(tmp_path / "mallory")
    huge = {**card["schema"], "columns": [{"name": f"t{i}", "kind": "text", "features": 1 << 20} for i in range(64)]}
    for name, doctored in {"re-signed": card, "huge": {**card, "schema": huge}}.items():
        write_card(sign_card(doctored, mallory), run / CARD_FILE)
        code, output, exception = _cli("predict", "--model", str(run), "--data", str(table),
                                       "--out", str(tmp_path / f"{name}.csv"))
        assert code == 2 and "Traceback" not in output and not isinstance(exception, MemoryError), (name, output)
        assert "re-signed" in output, output
    # The same huge schema signed by the genuine key: refused for its width, before a model is built.
    write_card(sign_card({**card, "schema": huge}, coordinator), run / CARD_FILE)
    code, output, exception = _cli("predict", "--model", str(run), "--data", str(table), "--out", str(tmp_path / "h.csv"))
    assert code == 2 and "features" in output and "Traceback" not in output, (output, exception)
    # A card that is not JSON, or a FIFO in its place.
    (run / CARD_FILE).unlink()
    os.mkfifo(run / CARD_FILE)
    code, output, _ = _cli("predict", "--model", str(run), "--data", str(table), "--out", str(tmp_path / "f.csv"))
    assert code == 2 and "named pipe" in output, output


@FUZZ
@given(values=st.fixed_dictionaries({}, optional={name: JSON for name in (
    "seq", "department", "identity", "run_id", "round", "ledger_seq", "ledger_head", "epsilon", "delta", "budget",
    "timestamp", "prev_hash", "signer", "signature", "head_signature", "public_key")}))
def test_any_record_line_is_read_or_named(tmp_path, values):
    from dataclasses import fields

    from fedsilo.shared.record import Acknowledgement

    raw = {f.name: values.get(f.name, 0) for f in fields(Acknowledgement)}
    path = _write(tmp_path / "acknowledged.jsonl", (json.dumps(raw) + "\n").encode())
    found = verify_record(path)  # never raises on a line it can read
    assert found.problems or found.entries


@pytest.mark.parametrize("line", ['{"seq": NaN}', "[" * 100_000 + "]" * 100_000, '{"seq": 1e999}', '[1, 2]'])
def test_a_record_line_that_is_not_fedsilo_json_is_a_problem_named_never_a_crash(tmp_path, line):
    path = _write(tmp_path / "acknowledged.jsonl", (line + "\n").encode())
    try:
        found = verify_record(path)
    except UnreadableFile as err:  # the whole file is refused (a line nested past the bound)
        assert "acknowledged.jsonl" in str(err) and "line 1" in str(err)
        return
    assert not found.entries and "record line 1" in " ".join(found.problems)
