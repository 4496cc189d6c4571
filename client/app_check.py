"""Is the app a run ships one this department will answer?  Checked, never run.

A department answers a run only with the fedsilo installed on its own host.
The FAB the coordinator submits is opened as a zip and read, never installed
or imported: it is accepted only when it is fedsilo's app (its id), names the
two installed components, speaks this department's protocol version, and
carries no files besides its ``pyproject.toml`` (and Flower's own metadata).
Anything else — a different app, an altered copy with code of its own, another
protocol — gets a refusal that names the reason.
"""

from __future__ import annotations

import io
import tomllib
import zipfile
from dataclasses import dataclass

from fedsilo.shared.protocol import APP_ID, CLIENTAPP, PROTOCOL_VERSION, SERVERAPP

# What Flower itself puts in a FAB next to the project file.
_FLOWER_METADATA = (".info/",)


@dataclass(frozen=True)
class AppVerdict:
    """The outcome of checking one FAB: ``accepted``, or the reason it is not."""

    accepted: bool
    reason: str = ""


def check_app(fab_id: str, fab_content: bytes) -> AppVerdict:
    """Check a run's app (FAB) against what this department runs.

    Parameters
    ----------
    fab_id : str
        ``publisher/name`` of the run's app, as the SuperLink reports it.
    fab_content : bytes
        The FAB file (a zip archive).

    Returns
    -------
    AppVerdict
        ``accepted`` only if every check passes; otherwise the first reason.
    """
    if fab_id != APP_ID:
        return AppVerdict(False, f"the run's app is '{fab_id}', not fedsilo's '{APP_ID}'")
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            project = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except KeyError:
        return AppVerdict(False, "the run's app has no pyproject.toml")
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        return AppVerdict(False, f"the run's app is not a readable Flower app ({type(err).__name__})")
    extra = sorted(n for n in names if n != "pyproject.toml" and not n.startswith(_FLOWER_METADATA))
    if extra:
        shown = ", ".join(_safe(n) for n in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        return AppVerdict(
            False,
            f"the run's app ships files of its own ({shown}); this department runs only the fedsilo "
            "installed on its host",
        )
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    for role, expected in (("clientapp", CLIENTAPP), ("serverapp", SERVERAPP)):
        if components.get(role) != expected:
            return AppVerdict(
                False, f"the run's app names {role} '{_safe(str(components.get(role)))}', not '{expected}'"
            )
    protocol = project.get("tool", {}).get("fedsilo", {}).get("protocol")
    if protocol != PROTOCOL_VERSION:
        return AppVerdict(
            False,
            f"the run's app speaks fedsilo protocol {_safe(str(protocol))}, this department speaks "
            f"{PROTOCOL_VERSION}; upgrade whichever side is older",
        )
    return AppVerdict(True)


def _safe(text: str, limit: int = 80) -> str:
    """A name from the coordinator's app, shortened and printable, for a message."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"

