"""Pretrained bases with LoRA under DP-SGD, on tiny bases made here (random BERT weights, a word-level tokenizer).

Units: what names a base, what is refused, what trains and travels, exact per-example
clipping through ghost clipping, the schema's tokenized column, the department's policy.
End to end: a real simulation with ``--model hf:DIR`` and ``fedsilo predict`` on its
held-out table with the caller's own copy of the base.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedsilo.client.policy import DepartmentPolicy, RunRequest
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.data import encode_frame, load_table
from fedsilo.shared.flower_cli import offline_env
from fedsilo.shared.model_factory import ModelError
from fedsilo.shared.models import build_model
from fedsilo.shared.pretrained import (
    BaseModelError, LoraSettings, bind_tokenizer, find_base, open_base, pretrained_schema, resolve_model_option,
    tokenizer_of,
)
from fedsilo.shared.schema import DataSchema, SchemaError, infer_schema
from tiny_base import make_tiny_base, text_table

MAX_LENGTH = 12


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"a": make_tiny_base(root / "a", seed=0), "b": make_tiny_base(root / "b", seed=1)}


@pytest.fixture(scope="module")
def tickets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tickets")
    return {"train": text_table(root / "train.csv", 480, seed=0), "test": text_table(root / "test.csv", 150, seed=1)}


def _schema(base_dir: Path, table: Path, max_length: int = MAX_LENGTH) -> DataSchema:
    drafted = infer_schema(pd.read_csv(table), "topic", "auto", "tickets")
    return pretrained_schema(drafted, open_base(base_dir), max_length)


# --------------------------------------------------------------------------- the base folder


def test_a_base_is_named_by_its_weights_and_a_copy_elsewhere_has_the_same_name(bases, tmp_path):
    a, b = open_base(bases["a"]), open_base(bases["b"])
    assert a.digest != b.digest and a.tokenizer_digest == b.tokenizer_digest  # other weights, same tokenizer
    assert a.digest == hashlib.sha256(b"model.safetensors\0" + str((bases["a"] / "model.safetensors").stat().st_size).encode()
                                      + b"\0" + (bases["a"] / "model.safetensors").read_bytes()).hexdigest()
    copy = shutil.copytree(bases["a"], tmp_path / "own-copy")
    assert open_base(copy).digest == a.digest  # a department's own copy
    assert resolve_model_option(f"hf:{copy}") == (a.spec, str(copy.resolve()))
    assert resolve_model_option("mlp") == ("mlp", "")
    assert find_base(a.spec, [bases["b"], copy]).folder == copy.resolve()
    with pytest.raises(BaseModelError, match=a.digest):
        find_base(a.spec, [bases["b"]])


def test_pickled_weights_remote_code_and_slow_tokenizers_are_refused(bases, tmp_path):
    pickled = shutil.copytree(bases["a"], tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(BaseModelError, match="never loads pickles"):
        open_base(pickled)
    remote = shutil.copytree(bases["a"], tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(BaseModelError, match="remote code"):
        open_base(remote)
    slow = shutil.copytree(bases["a"], tmp_path / "slow")
    (slow / "tokenizer.json").unlink()
    with pytest.raises(BaseModelError, match="tokenizer.json"):
        open_base(slow)
    with pytest.raises(BaseModelError, match="does not exist"):
        open_base(tmp_path / "nowhere")
    with pytest.raises(BaseModelError, match="give the base model's folder"):
        resolve_model_option(open_base(bases["a"]).spec)


# --------------------------------------------------------------------------- what trains and travels


def test_only_the_adapters_and_the_head_train_and_travel(bases):
    base = open_base(bases["a"])
    model = build_model(base.spec, (MAX_LENGTH,), 3, bases=(str(bases["a"]),), lora=LoraSettings(rank=4, alpha=8.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable), trainable
    assert not any("embeddings" in n for n in trainable)
    assert set(model.state_dict()) == trainable  # the frozen base is named by its digest, never sent
    assert model.lora.targets == ("query", "value")  # peft's default for BERT, by name
    travelling = sum(v.numel() for v in model.state_dict().values())
    assert travelling * 5 < sum(p.numel() for p in model.parameters())
    with pytest.raises(RuntimeError, match="exactly its adapters and head"):
        model.load_state_dict({**model.state_dict(), "encoder.base_model.model.pooler.dense.weight": torch.zeros(1)})
    with torch.device("meta"):  # what a department admits a run's model from: shapes only
        shapes = build_model(base.spec, (MAX_LENGTH,), 3, bases=(str(bases["a"]),), lora=LoraSettings(rank=4, alpha=8.0))
    assert {k: tuple(v.shape) for k, v in shapes.state_dict().items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=base.digest):
        build_model(base.spec, (MAX_LENGTH,), 3, bases=(str(bases["b"]),))


def _encoded(bases, tickets, rows: int = 64):
    schema = _schema(bases["a"], tickets["train"])
    data = load_table(tickets["train"], "topic", schema=schema)
    return data.subset(np.arange(rows)), schema


def _trained_lora(bases, data):
    """A LoRA model whose adapters all get gradients: LoRA's B starts at zero, so it is moved."""
    base = open_base(bases["a"])
    model = build_model(base.spec, data.input_shape, 3, bases=(str(bases["a"]),), seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_ghost_clipping_gives_each_examples_exact_gradient_norm(bases, tickets):
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

    data, _ = _encoded(bases, tickets, 16)
    model = _trained_lora(bases, data)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    wrapped = GradSampleModuleFastGradientClipping(model, max_grad_norm=1e9, use_ghost_clipping=True,
                                                   loss_reduction="sum")
    loss = torch.nn.functional.cross_entropy(wrapped(x), y, reduction="none")
    wrapped.zero_grad()
    loss.sum().backward(retain_graph=True)
    ghost = wrapped.get_norm_sample()
    wrapped._close()
    params = [p for p in model.parameters() if p.requires_grad]
    exact = []
    for i in range(len(x)):
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        exact.append(torch.stack([g.norm() for g in grads]).norm())
    assert torch.allclose(ghost, torch.stack(exact), rtol=1e-5, atol=1e-7), (ghost, exact)


def test_book_keeping_gives_the_exact_clipped_sum_of_a_lora_model(bases, tickets):
    """auto's path for a pretrained base: one backward, the sum of each example's own clipped gradient."""
    from fedsilo.shared.book_keeping import BookKeeper

    data, _ = _encoded(bases, tickets, 12)
    model = _trained_lora(bases, data)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    clip = 0.05  # below most examples' norms: the factors matter
    for i in range(len(x)):
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        factor = min(1.0, clip / (float(torch.stack([g.norm() for g in grads]).norm()) + 1e-6))
        for e, g in zip(expected, grads):
            e += factor * g.double()
    with BookKeeper(model, clip, 1e30) as keeper:
        got, norms = keeper.clipped_sum(torch.nn.functional.cross_entropy(model(x), y, reduction="none"))
    assert (norms > clip).sum() >= len(x) // 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-8)


def test_dp_sgd_moves_the_adapters_and_head_and_leaves_the_base_as_it_was(bases, tickets):
    from fedsilo.client.trainer import train_dp

    data, _ = _encoded(bases, tickets)
    base = open_base(bases["a"])
    model = build_model(base.spec, data.input_shape, 3, bases=(str(bases["a"]),))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_dp(model, data, Mechanism(1.0, 0.25, 8), max_grad_norm=1.0, learning_rate=0.5,
                      device=torch.device("cpu"), planned_size=len(data))
    assert result.steps == 8 and result.grad_sample_mode == "bk"
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if "lora_A" in k or "head" in k)


# --------------------------------------------------------------------------- the schema's tokenized column


def test_the_tokenized_column_is_written_with_its_tokenizer_and_encodes_only_with_that_tokenizer(bases, tickets):
    schema = _schema(bases["a"], tickets["train"])
    column = schema.token_column
    assert (column.encoder, column.max_length, column.tokenizer) == ("model", MAX_LENGTH, open_base(bases["a"]).tokenizer_digest)
    assert schema.num_features == MAX_LENGTH and column.describe().startswith("text, the base model's tokens")
    written = json.loads(schema.to_json())
    assert [c for c in written["columns"] if c["name"] == "text"] == [
        {"name": "text", "kind": "text", "encoder": "model", "max_length": MAX_LENGTH, "tokenizer": column.tokenizer}]
    parsed = DataSchema.from_json(schema.to_json())
    assert parsed == schema and parsed.tokenizer is None  # the tokenizer itself never travels
    frame = pd.read_csv(tickets["test"])
    with pytest.raises(SchemaError, match="no tokenizer was given"):
        parsed.encode(frame)
    ids = bind_tokenizer(parsed, open_base(bases["b"])).encode(frame)  # the same tokenizer files: the same ids
    expected = tokenizer_of(open_base(bases["a"]))(frame["text"].tolist()[:1], max_length=MAX_LENGTH,
                                                   padding="max_length", truncation=True)["input_ids"][0]
    assert ids.shape == (len(frame), MAX_LENGTH) and ids[0].tolist() == expected
    other = DataSchema(schema.label, tuple(c if c.name != "text" else type(c)(**{**c.__dict__, "tokenizer": "0" * 64})
                                           for c in schema.columns))
    with pytest.raises(SchemaError, match="tokenizer sha256 0000"):
        bind_tokenizer(other, open_base(bases["a"]))
    with pytest.raises(SchemaError, match="needs tokenizer"):
        DataSchema.from_dict({**written, "columns": [{"name": "text", "kind": "text", "encoder": "model"}]})


def test_a_pretrained_base_reads_one_text_column(bases):
    frame = pd.DataFrame({"text": ["a b", "c d"] * 5, "size": np.arange(10.0), "topic": ["x", "y"] * 5})
    with pytest.raises(BaseModelError, match="--feature-columns TEXT"):
        pretrained_schema(infer_schema(frame, "topic", "auto", "t"), open_base(bases["a"]), 8)
    with pytest.raises(BaseModelError, match="positions"):
        pretrained_schema(infer_schema(frame[["text", "topic"]], "topic", "auto", "t"), open_base(bases["a"]), 65)


# --------------------------------------------------------------------------- the department decides


def test_a_department_declines_a_run_whose_base_it_does_not_hold_naming_the_digest(bases):
    spec = open_base(bases["a"]).spec
    request = RunRequest(dp=True, model=spec)
    for held in ((), (str(bases["b"]),)):
        terms, looser = DepartmentPolicy(max_epsilon=8, base_models=held).terms_for(request)
        assert terms is None and spec.split(":")[-1] in looser[0] and "--base-model" in looser[0], looser
    terms, looser = DepartmentPolicy(max_epsilon=8, base_models=(str(bases["b"]), str(bases["a"]))).terms_for(request)
    assert terms is not None and not looser
    policy = DepartmentPolicy(max_epsilon=8, base_models=(str(bases["a"]),))
    assert DepartmentPolicy.from_json(policy.to_json()) == policy


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def simulated(bases, tickets, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "out"
    done = subprocess.run(
        [sys.executable, "-m", "fedsilo", "simulate", "--departments", "3", "--rounds", "2", "--secure-aggregation",
         "--dataset",
         str(tickets["train"]), "--test-data", str(tickets["test"]), "--label-column", "topic",
         "--model", f"hf:{bases['a']}", "--max-length", str(MAX_LENGTH), "--lora-rank", "4",
         "--target-epsilon", "8", "--max-epsilon", "8", "--partition", "iid", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=offline_env())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out, done.stdout


def test_a_simulation_fine_tunes_the_base_privately_under_secure_aggregation_and_sends_only_the_adapters(bases, simulated):
    out, stdout = simulated
    summary = json.loads((out / "latest" / "summary.json").read_text())
    base = open_base(bases["a"])
    assert summary["status"] == "completed" and summary["settings"]["model"] == base.spec
    assert all(0 < eps <= 8 for eps in summary["rounds"][-1]["epsilon"].values())
    # The secure sum masks the adapters and the head: the coordinator saw only their weighted sum.
    (session,) = summary["secure_aggregation"]
    travelling = _travelling(out)
    assert travelling <= session["vector_length"] <= travelling + 8 and len(session["participants"]) == 3
    assert all(sorted(r["secagg"]["u3"]) == sorted(session["participants"]) for r in summary["rounds"])
    traffic = summary["traffic"]
    uploads = [b for r in summary["rounds"] for b in r["upload_bytes"].values()]
    assert len(uploads) == 6 and all(b < traffic["whole_model_bytes"] / 5 for b in uploads), (traffic, uploads)
    assert re.search(r"Traffic per department per round: [\d,]+ B up", stdout), stdout
    card = json.loads((out / "latest" / "model-card.json").read_text())
    parts = card["model"]["pretrained"]
    assert card["model"]["kind"] == "pretrained" and card["model"]["architecture"] == base.spec
    assert (parts["base_weights_sha256"], parts["tokenizer_sha256"]) == (base.digest, base.tokenizer_digest)
    assert parts["lora"] == {"rank": 4, "alpha": 16.0, "targets": ["query", "value"]} and parts["max_length"] == MAX_LENGTH
    # The weights file holds the adapters and the head only: its hash is the adapters'.
    from safetensors import safe_open
    with safe_open(str(out / "latest" / "model.safetensors"), framework="pt") as fh:
        assert all("lora_" in k or k.startswith("head.") for k in fh.keys())


def _travelling(out: Path) -> int:
    """Parameters in the run's weights file: the adapters and the head."""
    from safetensors import safe_open

    with safe_open(str(out / "latest" / "model.safetensors"), framework="pt") as fh:
        return sum(fh.get_tensor(k).numel() for k in fh.keys())


def test_predict_with_the_callers_own_copy_reproduces_the_held_out_metrics(bases, tickets, simulated, tmp_path):
    out, _ = simulated
    card = json.loads((out / "latest" / "model-card.json").read_text())
    own = shutil.copytree(bases["a"], tmp_path / "my-copy")

    def predict(*extra):
        return subprocess.run([sys.executable, "-m", "fedsilo", "predict", "--model", str(out), "--data",
                               str(tickets["test"]), "--out", str(tmp_path / "p.csv"), *extra],
                              capture_output=True, text=True, timeout=300, env=offline_env())

    missing = predict()
    assert missing.returncode == 2 and "--base-model" in missing.stderr and card["model"]["pretrained"]["base_weights_sha256"] in missing.stderr
    other = predict("--base-model", str(bases["b"]))
    assert other.returncode == 2 and "not among" in other.stderr, other.stderr
    assert not (tmp_path / "p.csv").exists()
    done = predict("--base-model", str(own))
    assert done.returncode == 0, done.stdout + done.stderr
    printed = dict(re.findall(r"(\w+)=([0-9.]+)", done.stdout.split("metrics on these rows:")[1]))
    for name in ("accuracy", "macro_f1", "loss"):
        assert float(printed[name]) == pytest.approx(card["metrics"][name], abs=5e-5), (name, printed, card["metrics"])
    rows = pd.read_csv(tmp_path / "p.csv")
    assert len(rows) == 150 and set(rows["prediction"]) <= {"access", "billing", "outage"}


def test_a_bfloat16_base_keeps_adapters_norms_and_noise_in_float32(bases, tickets):
    from fedsilo.client.trainer import train_dp
    from fedsilo.shared.text_model import resolve_base_dtype

    assert resolve_base_dtype("auto", "cpu") == torch.float32 and resolve_base_dtype("bfloat16", "cpu") == torch.bfloat16
    data, _ = _encoded(bases, tickets, 32)
    base = open_base(bases["a"])
    model = build_model(base.spec, data.input_shape, 3, bases=(str(bases["a"]),), base_dtype=torch.bfloat16)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and {v.dtype for v in model.state_dict().values()} == {torch.float32}
    result = train_dp(model, data, Mechanism(1.0, 0.5, 4), max_grad_norm=1.0, learning_rate=0.5,
                      device=torch.device("cpu"), planned_size=len(data))
    assert result.steps == 4 and all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_distributed_dps_per_record_gradients_of_a_text_model_are_each_records_own(bases, tickets):
    from fedsilo.client.distributed_dp import _per_record_gradients

    data, _ = _encoded(bases, tickets, 6)
    base = open_base(bases["a"])
    model = build_model(base.spec, data.input_shape, 3, bases=(str(bases["a"]),), seed=1)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    trainable = list(model.state_dict())
    grads, losses = _per_record_gradients(model, params, buffers, trainable, "multiclass")(
        torch.from_numpy(data.x), torch.from_numpy(data.y))
    for i in range(len(data)):
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(data.x[i:i + 1])), torch.from_numpy(data.y[i:i + 1]))
        exact = torch.autograd.grad(loss, [params[k] for k in trainable])
        assert float(losses[i]) == pytest.approx(float(loss), rel=1e-5)
        assert all(torch.allclose(grads[k][i], g, rtol=1e-4, atol=1e-7) for k, g in zip(trainable, exact))


def test_schema_infer_drafts_for_a_base_and_schema_check_needs_a_copy_of_its_tokenizer(bases, tickets, tmp_path):
    from typer.testing import CliRunner

    from fedsilo.cli import app

    out = tmp_path / "schema.json"
    drafted = CliRunner().invoke(app, ["schema", "infer", str(tickets["test"]), "--label-column", "topic",
                                       "--model", f"hf:{bases['a']}", "--max-length", "10", "--out", str(out)])
    assert drafted.exit_code == 0, drafted.output
    column = json.loads(out.read_text())["columns"][0]
    assert column == {"name": "text", "kind": "text", "encoder": "model", "max_length": 10,
                      "tokenizer": open_base(bases["a"]).tokenizer_digest}
    without = CliRunner().invoke(app, ["schema", "check", str(out), "--data", str(tickets["train"])])
    assert without.exit_code == 2 and "--base-model" in without.output, without.output
    checked = CliRunner().invoke(app, ["schema", "check", str(out), "--data", str(tickets["train"]),
                                       "--base-model", str(bases["b"])])  # other weights, the same tokenizer
    assert checked.exit_code == 0 and "480 rows encode to 10 features" in checked.output, checked.output


def test_a_base_fine_tunes_for_regression_on_a_text_column(bases, tickets):
    from fedsilo.client.trainer import train_dp
    from fedsilo.shared.metrics import score

    frame = pd.read_csv(tickets["train"]).assign(words=lambda f: f["text"].str.split().str.len().astype(float))
    drafted = infer_schema(frame[["text", "words"]], "words", "regression", "tickets")
    schema = pretrained_schema(drafted, open_base(bases["a"]), MAX_LENGTH)
    data = encode_frame(frame[["text", "words"]], schema, "t", "t")
    model = build_model(open_base(bases["a"]).spec, data.input_shape, 1, task="regression", bases=(str(bases["a"]),))
    result = train_dp(model, data, Mechanism(1.0, 0.25, 8), max_grad_norm=1.0, learning_rate=0.1,
                      device=torch.device("cpu"), planned_size=len(data))
    assert result.steps == 8 and schema.task == "regression"
    assert np.isfinite(score(model, data, torch.device("cpu"))["rmse"])
