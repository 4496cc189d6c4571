"""MkDocs hook: generate the reference pages from the code, and serve BENCHMARKS.md.

Nothing here is committed output: every ``mkdocs build`` walks the installed
``fedsilo`` CLI and the run-settings catalogue again, so the reference can never
go stale.

* ``docs/reference/cli.md`` holds the marker ``<!-- fedsilo:cli -->``; it is
  replaced by every command of ``fedsilo.cli.app`` (through
  ``typer.main.get_command``), with its help, usage and every option's default
  and help.
* ``docs/reference/settings.md`` holds ``<!-- fedsilo:settings -->``; it is
  replaced by a table of the run settings from
  ``fedsilo.shared.settings.CATALOGUE`` or, where that module does not exist,
  from ``fedsilo.shared.config.RUN_CONFIG_DEFAULTS`` (keys and defaults only).
* ``docs/explanation/architecture.md`` holds ``<!-- fedsilo:modules -->``; it
  is replaced by every module of each side, with its docstring's first
  paragraph (read with ``ast``: nothing is imported).
* ``BENCHMARKS.md`` (rendered by ``fedsilo bench`` at the repository root) and
  the plots it shows are added to the site as they are. A page links it the
  way GitHub resolves it (``../../BENCHMARKS.md``); the link is rewritten to
  the copy in the site, so the same Markdown works in both places.
"""

from __future__ import annotations

import enum
import os
import posixpath
import re
from pathlib import Path

import click
from mkdocs.structure.files import File, Files

CLI_MARKER = "<!-- fedsilo:cli -->"
SETTINGS_MARKER = "<!-- fedsilo:settings -->"
MODULES_MARKER = "<!-- fedsilo:modules -->"

# Top-level folders that are not sides of the package (the same list as setup.py's).
_NOT_PACKAGE = {"tests", "examples", "docs", "site", "build", "dist"}

# Files outside docs/ that the site shows, by their path in the repository.
_MOUNTED = ("BENCHMARKS.md",)
_MOUNTED_GLOBS = ("benchmarks/reference/*.png",)

_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def _repo_root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_files(files: Files, config) -> Files:
    """Add BENCHMARKS.md and its plots, at the same paths they have in the repository."""
    root = _repo_root(config)
    paths = [root / p for p in _MOUNTED]
    for pattern in _MOUNTED_GLOBS:
        paths.extend(sorted(root.glob(pattern)))
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"docs: {path} is missing; the site shows it (docs/hooks/reference.py). "
                "Render it with `fedsilo bench report`, or drop it from _MOUNTED."
            )
        uri = path.relative_to(root).as_posix()
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_reference())
    if MODULES_MARKER in markdown:
        markdown = markdown.replace(MODULES_MARKER, modules_reference(_repo_root(config)))
    return _rewrite_repo_links(markdown, page, config)


def _rewrite_repo_links(markdown: str, page, config) -> str:
    """Point a link that leaves docs/ for a mounted repository file at its copy in the site."""
    if page.file.abs_src_path is None:
        return markdown
    root = _repo_root(config)
    docs = Path(config["docs_dir"]).resolve()
    here = Path(page.file.abs_src_path).resolve().parent

    def fix(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        resolved = Path(os.path.normpath(here / path))
        if docs in resolved.parents or resolved == docs:
            return match.group(0)
        try:
            uri = resolved.relative_to(root).as_posix()
        except ValueError:
            return match.group(0)
        if uri not in _MOUNTED:
            return match.group(0)
        page_dir = posixpath.dirname(page.file.src_uri)
        new = posixpath.relpath(uri, page_dir or ".") + (f"#{anchor}" if anchor else "")
        return f"{match.group(1)}{new}{match.group(3)}"

    return _LINK.sub(fix, markdown)


# --- the module map ---------------------------------------------------------


def modules_reference(root: Path) -> str:
    """Every module of each top-level subpackage, with the first paragraph of its docstring."""
    import ast

    lines: list[str] = []
    for side in sorted(p for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        if side.name in _NOT_PACKAGE or side.name.startswith("."):
            continue
        lines += [f"### `{side.name}/`", "", "| module | what it does |", "|---|---|"]
        for path in sorted(side.rglob("*.py")):
            if "__pycache__" in path.parts or (path.name == "__init__.py" and path.parent != side):
                continue
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            first = doc.strip().split("\n\n")[0]
            first = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", first).replace("``", "`")  # reST roles and literals
            if path.name == "__init__.py" and first.rstrip(".") in ("", f"fedsilo.{side.name}"):
                continue  # a package marker says nothing the heading does not
            lines.append(f"| `{path.relative_to(root).as_posix()}` | {_cell(first) or '—'} |")
        lines.append("")
    return "\n".join(lines)


# --- the CLI reference -------------------------------------------------------


def _cell(text: object) -> str:
    """Text for one Markdown table cell: one line, pipes and angle brackets escaped."""
    parts = " ".join(str(text).split()).split("`")
    # Outside code spans (even parts) escape what Markdown or HTML would read; a code span
    # shows its text as it is, and Python-Markdown's tables do not split inside one.
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _default(param: click.Parameter) -> str:
    if getattr(param, "required", False):
        return "required"
    default = param.default
    if callable(default):
        return "computed"
    if isinstance(param, click.Option) and param.is_flag:
        if param.secondary_opts:  # --dp/--no-dp: name the side that is on by default
            return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
        return "on" if default else "off"
    if default is None or default == () or default == []:
        return "—"
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, (list, tuple)):
        default = ", ".join(str(d) for d in default)
    return f"`{default}`" if str(default) != "" else '`""`'


def _type(param: click.Parameter) -> str:
    kind = param.type
    if isinstance(kind, click.Choice):
        return " \\| ".join(f"`{c}`" for c in kind.choices)
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    name = getattr(kind, "name", "") or type(kind).__name__
    if getattr(param, "multiple", False) or getattr(param, "nargs", 1) == -1:
        name += ", repeatable"
    return name


def _names(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return f"`{param.human_readable_name}` (argument)"
    names = list(param.opts) + list(param.secondary_opts)
    return " / ".join(f"`{n}`" for n in names)


def _command_section(cmd: click.Command, path: list[str], ctx: click.Context) -> list[str]:
    name = " ".join(path)
    out = [f"## {name}", ""]
    help_text = (cmd.help or cmd.short_help or "").strip()
    if help_text:
        out += [help_text.split("\b")[0].strip(), ""]
    pieces = " ".join(cmd.collect_usage_pieces(ctx))
    out += ["```", f"{name} {pieces}".rstrip(), "```", ""]
    params = [p for p in cmd.params if not getattr(p, "hidden", False) and p.name != "help"]
    fallback = _setting_help(path)  # an option that is a run setting and says nothing: the setting's own help
    if params:
        out += ["| option | type | default | help |", "|---|---|---|---|"]
        for p in params:
            out.append(f"| {_names(p)} | {_type(p)} | {_cell(_default(p))} | {_cell(getattr(p, 'help', '') or fallback.get(p.name, ''))} |")
        out.append("")
    return out


def cli_reference() -> str:
    """Every command of the ``fedsilo`` CLI as Markdown, walked from the click command tree."""
    import warnings

    with warnings.catch_warnings():  # typer's own imports of deprecated click names: not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        import typer.main

        from fedsilo.cli import app

    root = typer.main.get_command(app)
    lines: list[str] = []
    commands: list[tuple[click.Command, list[str], click.Context]] = []

    def walk(cmd: click.Command, path: list[str], parent: click.Context | None) -> None:
        ctx = click.Context(cmd, info_name=path[-1], parent=parent)
        if isinstance(cmd, click.Group):
            for sub_name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, sub_name)
                if sub is not None and not sub.hidden:
                    walk(sub, path + [sub_name], ctx)
        else:
            commands.append((cmd, path, ctx))

    walk(root, ["fedsilo"], None)
    lines += ["| command | what it does |", "|---|---|"]
    for cmd, path, _ in commands:
        anchor = "-".join(path)
        summary = (cmd.short_help or (cmd.help or "").split("\n\n")[0]).strip()
        lines.append(f"| [`{' '.join(path)}`](#{anchor}) | {_cell(summary)} |")
    lines.append("")
    for cmd, path, ctx in commands:
        lines += _command_section(cmd, path, ctx)
    return "\n".join(lines)


# --- the run-settings reference ---------------------------------------------

# What each scope means, for the table's headings (the catalogue's module docstring says the same).
_SCOPE_TEXT = {
    "department": "A department reads it: the data, model, training and privacy *asks*. Only these travel "
                  "in the run config that `coordinator run` and `simulate` submit.",
    "coordinator": "Only the coordinator reads it: paths, keys, aggregation, client-level DP, timeouts. "
                   "It never leaves the coordinator's host.",
    "simulation": "Only `fedsilo simulate` sets it (the partition, the simulated departments' own policy); "
                  "it reaches the simulated departments from the simulation, on its host.",
}
_COMMANDS = {"coordinator": "coordinator run", "simulate": "simulate"}


def _catalogue():
    """The settings catalogue, or None where this fedsilo has none (older builds)."""
    try:
        from fedsilo.shared import settings
    except ImportError:
        return None
    return settings if hasattr(settings, "CATALOGUE") else None


def _setting_help(command_path: list[str]) -> dict[str, str]:
    """The catalogue's help by CLI parameter name, for the options of ``coordinator run`` / ``simulate``."""
    settings = _catalogue()
    name = " ".join(command_path[1:])
    command = {"coordinator run": "coordinator", "simulate": "simulate"}.get(name)
    if settings is None or command is None or not hasattr(settings, "by_param"):
        return {}
    return {param: s.help for param, s in settings.by_param(command).items()}


def settings_reference() -> str:
    """The run settings as Markdown tables by scope, from the settings catalogue (or the defaults dict)."""
    settings = _catalogue()
    if settings is not None:
        return _catalogue_tables(settings)
    from fedsilo.shared.config import RUN_CONFIG_DEFAULTS

    lines = [
        "!!! note",
        "    Generated from `fedsilo.shared.config.RUN_CONFIG_DEFAULTS` (keys, types and",
        "    defaults); `fedsilo.shared.settings.CATALOGUE` does not exist in this build.",
        "",
        "| key | type | default |",
        "|---|---|---|",
    ]
    for key, default in RUN_CONFIG_DEFAULTS.items():
        lines.append(f"| `{key}` | {type(default).__name__} | {_cell(_value(default))} |")
    return "\n".join(lines) + "\n"


def _value(default: object) -> str:
    if isinstance(default, enum.Enum):
        default = default.value
    return f"`{default!r}`" if isinstance(default, str) else f"`{default}`"


def _options(setting) -> str:
    """Where the CLI shows a setting: ``coordinator run --rounds``, ``simulate --rounds``."""
    shown = []
    for attr, command in _COMMANDS.items():
        cli = getattr(setting, attr, None)
        if cli is None:
            continue
        flag = getattr(cli, "flag", "") or "--" + getattr(setting, "param", setting.key).replace("_", "-")
        shown.append(f"`{command} {flag}`")
    return "<br>".join(shown) if shown else "run config only"


def _catalogue_tables(settings) -> str:
    catalogue = settings.CATALOGUE
    scopes = list(getattr(settings, "SCOPES", ())) or sorted({s.scope for s in catalogue})
    lines = [
        f"{len(catalogue)} settings, generated from `fedsilo.shared.settings.CATALOGUE`. "
        "*key* is the run-config key (`flwr run . --run-config \"key=value\"`); *CLI* names the options "
        "that set it; *valid* is the check every run applies.",
        "",
    ]
    for scope in scopes:
        entries = [s for s in catalogue if s.scope == scope]
        if not entries:
            continue
        lines += [f"## Scope: {scope}", "", _SCOPE_TEXT.get(scope, ""), "",
                  "| key | type | default | help | valid | CLI |", "|---|---|---|---|---|---|"]
        for s in entries:
            kind = s.type.__name__ if isinstance(s.type, type) else str(s.type)
            check = getattr(s, "check", None)
            valid = check.message if check is not None else ""
            lines.append(f"| `{s.key}` | {kind} | {_cell(_value(s.default))} | {_cell(s.help)} "
                         f"| {_cell(valid)} | {_options(s)} |")
        lines.append("")
    return "\n".join(lines)
