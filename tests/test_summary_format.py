"""summary.json as a typed, versioned record: written by RunSummary, read strictly, v0.4 files migrated."""

from __future__ import annotations

import json

import pytest

from fedsilo.audit import audit_path
from fedsilo.server.checkpoint import CheckpointError, resumable
from fedsilo.server.strategy import RoundReport
from fedsilo.server.summary import RunSummary
from fedsilo.shared.summary_format import (
    SUMMARY_VERSION, DepartmentTotals, RoundRecord, Summary, SummaryFormatError, read_summary,
)

SETTINGS = {"dp": True, "delta": 1e-5, "max-epsilon": 8.0, "accountant": "pld"}

# What fedsilo 0.4 wrote after one round (no "v"), every field it had.
V04 = {
    "run_id": "run-1", "status": "completed", "stop_reason": "", "settings": SETTINGS,
    "dataset": {"name": "digits", "num_test": 360, "num_classes": 10, "task": "multiclass"},
    "dp": True, "delta": 1e-5,
    "asked": {"delta": 1e-5, "max_epsilon": 8.0, "accountant": "pld", "dp": True},
    "accountant": "pld", "max_epsilon": 8.0, "initial": {"accuracy": 0.1, "loss": 2.3},
    "rounds": [{
        "round": 1, "accuracy": 0.5, "loss": 1.2, "metrics": {"accuracy": 0.5, "loss": 1.2},
        "epsilon": {"hr": 1.5, "it": None}, "trained": ["hr"], "refused": {"it": "budget"}, "rejected": {},
        "failed": {}, "incompatible": {}, "declined": {}, "rolled_back": {}, "replayed": {}, "bounded": {},
        "charged": {"hr": {"ledger_seq": 1, "ledger_head": "ab" * 32, "epsilon": 1.5}}, "seconds": 2.5,
    }],
    "departments": {"hr": {"epsilon": 1.5, "rounds_trained": 1, "rounds_refused": 0, "steps": 4,
                           "max_epsilon": 8.0, "delta": 1e-5, "num_examples": 96},
                    "it": {"epsilon": None, "rounds_trained": 0, "rounds_refused": 1, "steps": 0}},
    "task": "multiclass", "final_accuracy": 0.5, "final_loss": 1.2, "final_metrics": {"accuracy": 0.5, "loss": 1.2},
    "model": "model.safetensors", "ledgers": "ledgers", "record": "record/acknowledged.jsonl", "wall_time_s": 3.0,
    "dp_path": "ghost clipping", "flower_run_ids": ["123"],
    "resumes": [{"after_round": 0, "flower_run_id": "123", "at": 1.0, "replayed": [], "trained": ["hr"]}],
    "failed_rounds": [{"round": 1, "reason": "too few", "epsilon": {}, "trained": [], "refused": {}, "rejected": {},
                       "failed": {}, "incompatible": {}, "declined": {}, "rolled_back": {}, "replayed": {},
                       "bounded": {}, "charged": {}, "seconds": 1.0}],
    "model_card": "model-card.json",
}


def _write(folder, data):
    (folder / "summary.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


def test_a_v0_4_summary_loads_typed_and_is_written_back_the_same_plus_its_version(tmp_path):
    summary = read_summary(_write(tmp_path, V04))
    assert summary.v == SUMMARY_VERSION and summary.status == "completed"
    assert isinstance(summary.rounds[0], RoundRecord) and summary.rounds[0].epsilon == {"hr": 1.5, "it": None}
    assert isinstance(summary.departments["hr"], DepartmentTotals) and summary.departments["hr"].steps == 4
    assert summary.resumes[0].trained == ["hr"] and summary.failed_rounds[0].reason == "too few"
    assert summary.to_dict() == {"v": SUMMARY_VERSION, **V04}
    assert Summary.from_json(summary.to_json()) == summary  # and a v1 file reads back as itself


def test_an_older_summary_missing_fields_reads_them_as_their_defaults(tmp_path):
    summary = read_summary(_write(tmp_path, {"run_id": 77, "rounds": [{"round": 1, "trained": ["hr"]}]}))
    assert summary.run_id == "77" and summary.rounds[0].epsilon == {} and summary.ledgers is None
    assert summary.central is None and summary.departments == {}


def test_a_newer_summary_names_the_file_and_says_to_upgrade(tmp_path):
    _write(tmp_path, {**V04, "v": SUMMARY_VERSION + 1})
    with pytest.raises(SummaryFormatError, match=r"summary\.json.*v2, newer than the v1.*upgrade fedsilo"):
        read_summary(tmp_path)
    (tmp_path / "checkpoint.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="upgrade fedsilo"):
        resumable(tmp_path)
    result = audit_path(tmp_path)
    assert not result.readable and any("upgrade fedsilo" in p for p in result.unreadable)


@pytest.mark.parametrize("change,field", [
    (lambda d: d["rounds"][0]["epsilon"].update(hr="1.5"), r"rounds\[0\]\.epsilon\['hr'\]"),
    (lambda d: d["rounds"][0].update(round=1.0), r"rounds\[0\]\.round"),
    (lambda d: d["departments"]["hr"].update(steps=True), r"departments\['hr'\]\.steps"),
    (lambda d: d.update(status=None), "status"),
    (lambda d: d.update(rounds={}), "rounds"),
    (lambda d: d.update(central={"ledger": 3}), r"central\.ledger"),
    (lambda d: d["resumes"][0].update(replayed="hr"), r"resumes\[0\]\.replayed"),
])
def test_a_field_of_the_wrong_type_is_named(tmp_path, change, field):
    data = json.loads(json.dumps(V04))
    change(data)
    with pytest.raises(SummaryFormatError, match=field):
        read_summary(_write(tmp_path, data))


def test_a_version_1_file_says_every_field_and_no_other(tmp_path):
    complete = {"v": 1, **V04}
    with pytest.raises(SummaryFormatError, match="lacks field 'wall_time_s'"):
        Summary.from_dict({k: v for k, v in complete.items() if k != "wall_time_s"})
    with pytest.raises(SummaryFormatError, match=r"unknown field\(s\) rounds\[0\]\.extra.*upgrade fedsilo"):
        Summary.from_dict({**complete, "rounds": [{**V04["rounds"][0], "extra": 1}]})
    assert Summary.from_dict({k: v for k, v in complete.items() if k != "model_card"}).model_card is None


def test_run_summary_writes_a_v1_file_after_every_round_and_resumes_from_its_copy(tmp_path):
    summary = RunSummary(tmp_path, "run-1", SETTINGS, {"name": "digits", "num_test": 360})
    summary.set_initial({"accuracy": 0.1, "loss": float("nan")}, "multiclass")
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["v"] == SUMMARY_VERSION and written["initial"] == {"accuracy": 0.1, "loss": None}
    assert "failed_rounds" not in written and "model_card" not in written  # written once they hold something
    report = RoundReport(trained={"hr": 96}, epsilon={"hr": 1.5}, budget={"hr": 8.0}, delta={"hr": 1e-5},
                         steps={"hr": 4}, clipped={"hr": float("inf")})
    summary.add_round(1, {"accuracy": 0.5, "loss": 1.2}, report, 2.0)
    summary.add_failed_round(2, None, "too few", 1.0)
    on_disk = read_summary(tmp_path)
    assert on_disk == summary.summary
    assert on_disk.rounds[0].bounded == {"hr": None} and on_disk.departments["hr"].num_examples == 96
    restored = RunSummary.restore(tmp_path, on_disk.to_dict())
    restored.resumed(1, "456")
    again = read_summary(tmp_path)
    assert again.resumes[0].after_round == 1 and again.status == "running" and again.rounds == on_disk.rounds
    summary.finish("completed", "", "model.safetensors", "model-card.json")
    assert read_summary(tmp_path).model_card == "model-card.json"
