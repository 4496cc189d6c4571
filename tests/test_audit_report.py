"""``fedsilo audit PATH --report DIR``: an HTML report with plots, also (above all) when the audit fails."""

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from test_audit import _write_run

# Minutes of real simulations: the fast tier (`make test`, ≤ 10 min) keeps one real simulation,
# one TLS deployment, the intruder and the policy tests; `make test-all` runs these too.
pytestmark = pytest.mark.slow

FEDSILO = [sys.executable, "-m", "fedsilo"]
PLOTS = ("epsilon.png", "accuracy.png", "privacy-utility.png")


def _audit(path, report, *args):
    return subprocess.run([*FEDSILO, "audit", str(path), "--report", str(report), *args],
                          capture_output=True, text=True, timeout=300)


def _images(page: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page.read_text(encoding="utf-8"))


# A real simulated run: conftest's digits_simulation, shared with test_simulation_e2e.py (one worker, one run).


@pytest.fixture(scope="module")
def run(digits_simulation):
    return digits_simulation.out


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report") / "html"
    result = _audit(run, folder)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder, result


def test_report_of_a_verified_run(run, report):
    folder, result = report
    page = folder / "index.html"
    assert f"report: {page}" in result.stdout
    text = page.read_text(encoding="utf-8")
    assert sorted(_images(page)) == sorted(PLOTS)
    for name in PLOTS:
        pixels = imread(folder / name)  # a valid PNG
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    summary = json.loads((run / "latest" / "summary.json").read_text())
    names = [json.loads(p.read_text().splitlines()[0])["department"] for p in (run / "ledgers").glob("*.jsonl")]
    assert sorted(names) == sorted(summary["departments"])
    for department in names:
        assert department in text
    assert f"{summary['final_accuracy']:.4f}" in text
    assert "Verified" in text and "FAILED" not in text
    assert html.escape(str(summary["run_id"])) in text and "What these numbers mean" in text


def test_a_tampered_run_still_gets_its_report_saying_failed(run, tmp_path):
    tampered = tmp_path / "run"
    shutil.copytree(run, tampered, symlinks=True)  # latest/ and ledgers/ stay links in the copy
    ledger = sorted((tampered / "ledgers").glob("*.jsonl"))[0]
    lines = ledger.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["noise_multiplier"] *= 5  # pretend more noise was used
    lines[0] = json.dumps(entry, sort_keys=True)
    ledger.write_text("\n".join(lines) + "\n")
    result = _audit(tampered, tmp_path / "html")
    assert result.returncode == 1, result.stdout + result.stderr
    text = (tmp_path / "html" / "index.html").read_text(encoding="utf-8")
    assert "Verification FAILED" in text and "signature does not match" in text
    assert f"<b>{entry['department']}</b>" in text  # the problem is named with its department
    for name in _images(tmp_path / "html" / "index.html"):
        assert (tmp_path / "html" / name).is_file()


def test_truncated_ledger_and_ledgers_only(tmp_path):
    path = _write_run(tmp_path)  # the coordinator's record of four rounds
    path.write_text("\n".join(path.read_text().splitlines()[:2]) + "\n")
    result = _audit(tmp_path, tmp_path / "html", "--json")
    assert result.returncode == 1 and json.loads(result.stdout)["ok"] is False  # --json stays parseable
    text = (tmp_path / "html" / "index.html").read_text(encoding="utf-8")
    assert "FAILED" in text and "truncated or deleted" in text and "finance" in text
    only = _audit(tmp_path / "ledgers", tmp_path / "only")
    assert only.returncode == 0, only.stdout + only.stderr
    page = tmp_path / "only" / "index.html"
    assert _images(page) == ["epsilon.png"] and "Ledgers only" in page.read_text(encoding="utf-8")
    assert not (tmp_path / "only" / "accuracy.png").exists()


def test_the_page_renders_in_a_headless_browser(report, tmp_path):
    browser = next((b for b in (shutil.which("chromium"), shutil.which("chromium-browser")) if b), None)
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install -y --no-install-recommends chromium)")
    folder, _ = report
    shot = tmp_path / "page.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,3000",
         (folder / "index.html").resolve().as_uri()],
        capture_output=True, timeout=120,
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    rgb = (imread(shot)[..., :3] * 255).astype(int)
    assert rgb.shape[:2] == (3000, 1200) and rgb.std() > 10  # not a blank page
    assert (rgb.min(axis=2) < 200).mean() > 0.01  # text, tables and plots
    # The plots loaded: their lines and markers are matplotlib's blue and orange, nowhere else on the page.
    blue = (np.abs(rgb - [31, 119, 180]).max(axis=2) < 30).sum()
    orange = (np.abs(rgb - [255, 127, 14]).max(axis=2) < 30).sum()
    assert blue > 500 and orange > 100, (blue, orange)


def test_the_coordinators_record_catches_a_truncated_ledger_and_an_edited_record(digits_simulation, tmp_path):
    """A real simulated run: its signed record of acknowledged heads is what exposes a ledger cut short."""
    rounds = digits_simulation.rounds
    assert rounds >= 2  # a ledger cut to its first entry is then short of what was acknowledged
    copy = tmp_path / "run"
    shutil.copytree(digits_simulation.out, copy, symlinks=True)
    honest = subprocess.run([*FEDSILO, "audit", str(copy), "--json"], capture_output=True, text=True, timeout=300)
    report = json.loads(honest.stdout)
    assert honest.returncode == 0 and all(d["acknowledged"] == rounds for d in report["departments"]), honest.stdout
    assert any("coordinator's record" in line for line in report["checked"])
    ledger = sorted((copy / "ledgers").glob("*.jsonl"))[0]
    ledger.write_text(ledger.read_text().splitlines()[0] + "\n")  # a valid chain, one round short
    cut = subprocess.run([*FEDSILO, "audit", str(copy), "--json"], capture_output=True, text=True, timeout=300)
    assert cut.returncode == 1
    problems = " ".join(p for d in json.loads(cut.stdout)["departments"] for p in d["problems"])
    assert f"the coordinator acknowledged {rounds} entries" in problems and "rolled back" in problems
    record = copy / "record" / "acknowledged.jsonl"
    lines = record.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["epsilon"] = 0.01  # the coordinator's record edited to hide a spend
    lines[0] = json.dumps(entry, sort_keys=True)
    record.write_text("\n".join(lines) + "\n")
    edited = subprocess.run([*FEDSILO, "audit", str(copy), "--json"], capture_output=True, text=True, timeout=300)
    assert "the coordinator's signature does not match" in " ".join(json.loads(edited.stdout)["problems"])
