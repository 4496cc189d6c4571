"""Flower's internals are used in one module only, and an unsupported Flower is refused by name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fedsilo.shared.flower_internals import SUPPORTED_FLOWER, UnsupportedFlower, check_flower, flower_version

ROOT = Path(__file__).resolve().parents[1]
INTERNALS = ROOT / "shared" / "flower_internals.py"
# Flower's public API as fedsilo uses it: the Message API, the apps, their strategies, the logger.
PUBLIC = {"flwr.app", "flwr.clientapp", "flwr.clientapp.typing", "flwr.serverapp", "flwr.serverapp.strategy",
          "flwr.common"}


def _package_sources():
    skip = {"tests", "examples", ".venv", "build", "docs", "site"}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in skip or any(p.startswith(".") or p.endswith(".egg-info") for p in parts):
            continue
        yield path


def _flower_imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []


def test_no_module_but_one_imports_flower_outside_its_public_api():
    found = []
    for path in _package_sources():
        if path == INTERNALS:
            continue
        for line, module, names in _flower_imports(path):
            if not (module == "flwr" or module.startswith("flwr.")):
                continue
            # flwr.common itself is public (its logger); its submodules are not.
            if module not in PUBLIC or (module == "flwr.common" and set(names) - {"log"}):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not found, "Flower internals outside shared/flower_internals.py:\n" + "\n".join(found)
    assert any("flower_internals" in p.name for p in _package_sources())  # the scan saw the package


def test_the_installed_flower_is_supported_and_others_are_refused_by_name():
    assert check_flower() == flower_version()
    assert check_flower(f"{SUPPORTED_FLOWER[-1]}.7") == f"{SUPPORTED_FLOWER[-1]}.7"
    for other in ("1.42.0", "2.0.0", "1.4.1", "not installed"):
        with pytest.raises(UnsupportedFlower, match=rf"flwr {other}.*flwr\[simulation\]=={SUPPORTED_FLOWER[-1]}"):
            check_flower(other)


def test_the_department_executor_will_not_start_on_an_unsupported_flower():
    program = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda name: '1.99.0' if name == 'flwr' else real(name)\n"
        "import fedsilo.client.executor\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "UnsupportedFlower" in result.stderr and "flwr 1.99.0" in result.stderr, result.stderr[-2000:]
