"""What a department accepts as the run's app: fedsilo's, unaltered, its protocol, no code."""

from __future__ import annotations

import io
import tomllib
import zipfile

import tomli_w

from fedsilo.client.app_check import check_app
from fedsilo.shared.flower_cli import write_app
from fedsilo.shared.protocol import APP_ID, PROTOCOL_VERSION


def _fab(tmp_path, edit=None, extra: dict[str, str] | None = None) -> bytes:
    app = write_app(tmp_path / "app")
    project = tomllib.loads((app / "pyproject.toml").read_text())
    if edit:
        edit(project)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", tomli_w.dumps(project))
        archive.writestr(".info/CONTENT", "pyproject.toml,abc,1\n")  # Flower's own metadata
        for name, text in (extra or {}).items():
            archive.writestr(name, text)
    return buffer.getvalue()


def test_the_app_fedsilo_submits_is_accepted(tmp_path):
    assert check_app(APP_ID, _fab(tmp_path)).accepted


def test_another_app_id_is_refused(tmp_path):
    verdict = check_app("intruder/evil", _fab(tmp_path))
    assert not verdict.accepted and "'intruder/evil', not fedsilo's" in verdict.reason


def test_an_app_that_ships_code_is_refused(tmp_path):
    verdict = check_app(APP_ID, _fab(tmp_path, extra={"fedsilo/client/app.py": "import os"}))
    assert not verdict.accepted and "ships files of its own (fedsilo/client/app.py)" in verdict.reason


def test_another_component_is_refused(tmp_path):
    def swap(project):
        project["tool"]["flwr"]["app"]["components"]["clientapp"] = "evil:app"

    verdict = check_app(APP_ID, _fab(tmp_path, swap))
    assert not verdict.accepted and "clientapp 'evil:app'" in verdict.reason


def test_another_protocol_is_refused(tmp_path):
    def older(project):
        project["tool"]["fedsilo"]["protocol"] = PROTOCOL_VERSION - 1

    verdict = check_app(APP_ID, _fab(tmp_path, older))
    assert not verdict.accepted and f"protocol {PROTOCOL_VERSION - 1}" in verdict.reason


def test_garbage_is_refused_without_echoing_it(tmp_path):
    verdict = check_app(APP_ID, b"not a zip \x00\x01")
    assert not verdict.accepted and "not a readable Flower app" in verdict.reason
    long_name = "x" * 500 + ".py"
    verdict = check_app(APP_ID, _fab(tmp_path, extra={long_name: ""}))
    assert not verdict.accepted and len(verdict.reason) < 300
