"""Where a run's results live: one folder per run under the output folder.

``OUT/`` holds what outlives a run — a simulation's department ``ledgers/``, the
coordinator's ``record/`` and ``central/`` ledger — and one folder per run,
``OUT/<run-name>/`` (``summary.json``, ``checkpoint.safetensors``, the model, its
card, ``schema.json``), with ``OUT/latest`` pointing at the newest.  No run
writes into another run's folder: a second run gets a folder of its own, and
only ``--resume`` continues an existing one.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

SUMMARY = "summary.json"
EVENTS = "events.jsonl"  # the run's event log (server/events.py): not a ledger, though JSON lines too
LATEST = "latest"
SIMULATION = "simulation.json"  # written by `fedsilo simulate` only: a simulated run's own facts


class RunFolderError(FileExistsError):
    """A run folder that is missing, or taken by another run; the message says what to do."""


def new_run_name(now: float | None = None) -> str:
    """``run-YYYYMMDD-HHMMSS-xxxx`` (UTC): sorts by time, unique across coordinators."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"run-{stamp}-{secrets.token_hex(2)}"


def create_run_folder(out: Path, name: str) -> Path:
    """Make ``OUT/<name>/`` for a new run; refuse one that already holds a run."""
    folder = Path(out) / name
    if (folder / SUMMARY).exists():
        raise RunFolderError(
            f"{folder} already holds a run; a new run never writes into it. "
            f"Continue it with --resume {folder}, or leave out the run name to start another run"
        )
    folder.mkdir(parents=True, exist_ok=True)
    link_latest(out, name)
    return folder


def link_latest(out: Path, name: str) -> None:
    """Point ``OUT/latest`` at ``name`` (replaced atomically; a real folder called latest is left alone)."""
    link = Path(out) / LATEST
    if link.exists() and not link.is_symlink():
        return  # an older fedsilo's run folder of that name: never touched
    tmp = Path(out) / f".{LATEST}.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(name, target_is_directory=True)
    os.replace(tmp, link)


def link_ledgers(out: Path, run_dir: Path) -> None:
    """``RUN_DIR/ledgers`` -> ``OUT/ledgers`` once the simulated departments' ledgers exist."""
    ledgers, link = Path(out) / "ledgers", Path(run_dir) / "ledgers"
    if ledgers.is_dir() and not (link.exists() or link.is_symlink()):
        link.symlink_to(os.path.relpath(ledgers, run_dir), target_is_directory=True)


def resolve_run_dir(path: Path | str) -> Path:
    """A run folder from what a user names: the run folder itself, or its output folder (its latest run)."""
    path = Path(path).expanduser()
    return (path / LATEST).resolve() if (path / LATEST).is_dir() else path


def runs_in(out: Path) -> list[Path]:
    """The run folders under ``out``, oldest first (by name: names start with their UTC time)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink() and (p / SUMMARY).exists())


def keep_earlier_log(run_dir: Path, name: str = "flower.log") -> None:
    """Before a resumed attempt writes ``name``, move the earlier attempt's to ``flower.1.log``, ``.2``, ..."""
    log = Path(run_dir) / name
    if not log.exists():
        return
    stem, suffix = log.name.rsplit(".", 1)
    n = 1
    while (log.parent / f"{stem}.{n}.{suffix}").exists():
        n += 1
    log.replace(log.parent / f"{stem}.{n}.{suffix}")


def typed_options(ctx, names) -> list[str]:
    """Which of the command's parameters ``names`` were given on the command line (not left at their default).

    A resume continues a run with its own settings, so an option given beside
    ``--resume`` either applies (the operational ones) or is refused — never silently dropped.
    """
    from click.core import ParameterSource

    return [name for name in names
            if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)]


def refuse_with_resume(ctx, allowed: set[str]) -> None:
    """Raise ``ValueError`` naming every option given beside ``--resume`` that a resume cannot change."""
    params = {p.name: p for p in ctx.command.params}
    refused = typed_options(ctx, [name for name in params if name not in allowed | {"resume"}])
    if refused:
        flags = ", ".join(params[name].opts[0] for name in refused)
        raise ValueError(f"--resume continues the run with its own settings, so {flags} cannot be given with it; "
                         "start a new run to change them")
