"""The wheel is the package: every subpackage and data file ships, every import is declared.

Every other test runs the editable install, which imports straight from the checkout
and so cannot notice a subpackage or a dependency the wheel lacks (v0.4's wheel had no
``fedsilo.simulations.bench``, and ``fedsilo --help`` failed when installed). These
tests build the real wheel from the tracked sources; ``.ci/smoke`` installs it in a
fresh environment and runs it.
"""

from __future__ import annotations

import ast
import email
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level folders of the checkout that are not part of the package (setup.py's NOT_SHIPPED).
NOT_SHIPPED = {"tests", "examples", "docs", "build", "dist", "site"}
# Folders inside a subpackage that are the project's, not the package's: the reference
# measurements BENCHMARKS.md shows (no __init__.py, no package-data pattern matches them).
PROJECT_DATA = (Path("benchmarks/reference"), Path("benchmarks/data"))


def _sources() -> list[Path]:
    """The checkout's files as a fresh clone has them: tracked, plus new files git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    return [Path(name) for name in listed if name and (ROOT / name).is_file()]


def _shipped(relative: Path) -> bool:
    parts = relative.parts
    return (len(parts) > 1 and parts[0] not in NOT_SHIPPED and not parts[0].startswith(".")
            and not any(folder in relative.parents for folder in PROJECT_DATA))


def _package_dirs(sources: list[Path]) -> set[Path]:
    """Folders (relative to the root) that are subpackages: an __init__.py in each folder down to it."""
    inits = {p.parent for p in sources if p.name == "__init__.py" and _shipped(p)}
    return {d for d in inits if all(parent in inits for parent in list(d.parents)[:-1])}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built, as `pip wheel . --no-deps` would, from a copy of the sources (no stale build/)."""
    tree = tmp_path_factory.mktemp("source") / "fedsilo"
    for relative in _sources():
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, tree / relative)
    out = tmp_path_factory.mktemp("wheel")
    # Without build isolation: the test environment's setuptools, no index needed.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("fedsilo-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_wheel_ships_every_subpackage(wheel):
    sources = _sources()
    expected = {"fedsilo"} | {"fedsilo." + ".".join(d.parts) for d in _package_dirs(sources)}
    shipped = {n.rsplit("/", 1)[0].replace("/", ".") for n in wheel.namelist() if n.endswith("/__init__.py")}
    assert shipped == expected, f"missing from the wheel: {sorted(expected - shipped)}; unexpected: {sorted(shipped - expected)}"
    assert "fedsilo.benchmarks" in shipped  # v0.4 forgot the benchmarks (then fedsilo.simulations.bench)
    # Every module of every subpackage, not just its __init__.
    modules = {f"fedsilo/{p.as_posix()}" for p in sources if p.suffix == ".py" and p.parent in _package_dirs(sources)}
    modules |= {f"fedsilo/{p.name}" for p in sources if p.suffix == ".py" and len(p.parts) == 1 and p.name != "setup.py"}
    assert modules <= set(wheel.namelist()), sorted(modules - set(wheel.namelist()))


def test_wheel_ships_the_data_files_of_its_packages_and_nothing_of_the_project(wheel):
    names = set(wheel.namelist())
    packages = _package_dirs(_sources())
    data = {f"fedsilo/{p.as_posix()}" for p in _sources()
            if p.suffix not in (".py", ".pyc") and _shipped(p) and any(d == p.parent or d in p.parents for d in packages)}
    missing = sorted(data - names)
    assert not missing, (f"files inside the package are not in the wheel: {missing}; add their pattern "
                         "to [tool.setuptools.package-data] in pyproject.toml")
    top = {n.split("/")[1] for n in names if n.startswith("fedsilo/") and n.count("/") >= 1}
    assert not any(n.startswith("fedsilo/benchmarks/reference/") for n in names), "reference results must not ship"
    for project_only in ("setup.py", "tests", "examples", "docs", "README.md", "pyproject.toml",
                         "constraints.txt", "Makefile"):
        assert project_only not in top, f"{project_only} must not ship inside the package"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_wheel_metadata_declares_the_script_and_python(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert re.search(r"^fedsilo\s*=\s*fedsilo\.cli:main$", wheel.read(entry_points).decode(), re.M)
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    message = email.message_from_bytes(wheel.read(metadata))
    assert message["Requires-Python"] == ">=3.11"  # flwr 1.41's own floor; tomllib is 3.11+
    declared = {_normalize(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in message.get_all("Requires-Dist")}
    assert {"httpx", "tomli-w", "torch", "flwr"} <= declared


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path):
    """(line, top-level module) of every absolute import in ``path``, except optional ones
    (inside a ``try`` whose handler catches ImportError)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    optional: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            h.type is not None and any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                                       for n in ast.walk(h.type))
            for h in node.handlers
        ):
            optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_normalize(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for relative in _sources():
        if relative.suffix != ".py" or relative.name == "setup.py" or not (_shipped(relative) or len(relative.parts) == 1):
            continue
        for line, module in _imports(ROOT / relative):
            if module in sys.stdlib_module_names or module in ("fedsilo", "__future__"):
                continue
            owners = {_normalize(d) for d in distributions.get(module, [])}
            if not owners:
                problems.append(f"{relative}:{line} imports {module}, which no installed distribution provides")
            elif not owners & declared:
                problems.append(f"{relative}:{line} imports {module} (from {', '.join(sorted(owners))}), "
                                "not in pyproject's [project] dependencies")
    assert not problems, "\n".join(problems)


def _commands(command, prefix=()):
    import click

    yield prefix, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*prefix, name))


def test_no_command_defaults_a_file_or_folder_inside_the_installed_package():
    """Keys, certificates, runs, ledgers and state go where the user says, or under the current
    folder: never beside the code, which may be a read-only site-packages shared by users."""
    import click
    import typer

    from fedsilo.cli import app
    from fedsilo.shared.config import RUN_CONFIG_DEFAULTS

    seen = 0
    for path, command in _commands(typer.main.get_command(app)):
        for param in command.params:
            default = param.default
            if isinstance(param.type, click.Path) or isinstance(default, Path):
                for value in default if isinstance(default, (list, tuple)) else [default]:
                    if value in (None, "") or callable(value):
                        continue
                    seen += 1
                    # Relative: it resolves against the user's current folder, wherever fedsilo is installed.
                    assert not Path(value).expanduser().is_absolute(), (
                        f"fedsilo {' '.join(path)} --{param.name} defaults to {value}")
    assert seen >= 5  # the walk found the commands' path options (certs, state, out, ...)
    # Nor does the run configuration (what `flwr run .` and the ServerApp start from).
    absolute = {k: v for k, v in RUN_CONFIG_DEFAULTS.items() if isinstance(v, str) and v.startswith(("/", "~"))}
    assert not absolute, absolute
