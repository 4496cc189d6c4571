"""Re-rendering saved results: the reference results' text, tables and targets come back from their raw numbers.

Proves that presenting (``*_summary.py`` and ``templates/*.md.j2``) is a function of what
a result saves, and that ``fedsilo bench report`` goes through it; no benchmark runs here.
"""

from __future__ import annotations

import importlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from fedsilo.benchmarks.cli import SUITE
from fedsilo.benchmarks.report import render

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "reference"
# The benchmarks whose rerender these tests hold to their stored output.
RERENDERED = ("dp-cost", "accounting", "utility", "secagg", "robustness", "pretrained")


def _normalised(value):
    """Whitespace-normalised strings, recursively: wording is compared, not line breaks or double spaces."""
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("name", [n for n in RERENDERED if (REFERENCE / f"{n}.json").exists()])
def test_reference_results_rerender_to_what_is_stored(name, tmp_path):
    saved_path = tmp_path / f"{name}.json"
    shutil.copy(REFERENCE / f"{name}.json", saved_path)  # a copy: a re-render must not touch the reference
    saved = json.loads(saved_path.read_text())
    module = importlib.import_module(f"fedsilo.benchmarks.{SUITE[name]}")
    result = asdict(module.rerender(saved_path, draw_plots=False))
    for key in ("title", "text", "tables", "targets"):
        assert _normalised(result[key]) == _normalised(saved[key]), key
    assert set(saved["raw"]) <= set(result["raw"])  # saved again, it loses nothing
    assert not list(tmp_path.glob("*.png"))  # draw_plots=False draws nothing


def _reference_copy(tmp_path: Path, *names: str) -> Path:
    out = tmp_path / "results"
    out.mkdir()
    for name in names:
        shutil.copy(REFERENCE / f"{name}.json", out)
    return out


def test_report_rerenders_from_raw_so_a_changed_number_reaches_the_summary(tmp_path):
    out = _reference_copy(tmp_path, "dp-cost")
    data = json.loads((out / "dp-cost.json").read_text())
    data["raw"]["settings"]["reps"] = 99  # the stored text says 5: only a re-render can say 99
    (out / "dp-cost.json").write_text(json.dumps(data))
    text = render(out).read_text()
    assert "Time per epoch (median of 99)" in text and "median of 99 timed epochs" in text
    assert "median of 99" not in render(out, tmp_path / "stored.md", rerender=False).read_text()


def test_report_keeps_the_stored_text_of_a_result_it_cannot_rerender(tmp_path, capsys):
    out = _reference_copy(tmp_path, "accounting")
    data = json.loads((out / "accounting.json").read_text())
    del data["raw"]["seconds_per_call"]  # an older format, say
    data["text"] = "The text this result was saved with."
    (out / "accounting.json").write_text(json.dumps(data))
    assert "The text this result was saved with." in render(out).read_text()
    assert "kept its stored text" in capsys.readouterr().err


def test_report_of_the_reference_results_matches_their_stored_text(tmp_path):
    """The whole BENCHMARKS.md: re-rendered and stored agree, but for whitespace."""
    rerendered = render(REFERENCE, tmp_path / "rerendered.md").read_text()
    stored = render(REFERENCE, tmp_path / "stored.md", rerender=False).read_text()
    assert [" ".join(line.split()) for line in rerendered.splitlines()] == \
        [" ".join(line.split()) for line in stored.splitlines()]
