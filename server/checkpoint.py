"""The coordinator's checkpoint: ``RUN_DIR/checkpoint.safetensors``, after every completed round.

A round that fails writes one too: the rounds before it (with the failed round
noted in the summary it holds), so a resume runs the failed round again.

One file, replaced atomically (written beside, fsynced, renamed): the global
model's arrays as safetensors tensors (and the coordinator's optimizer state, where it keeps
one: distributed DP's momentum), and in the safetensors metadata the
round it completed, the run's settings, the run summary so far and which
departments had refused on budget grounds.  A coordinator killed at any
moment leaves either the previous checkpoint or the new one, never half of
one.

What the checkpoint does not need to hold lives on disk already and is
append-only: each department's ledger (on its host, or ``OUT/ledgers`` in a
simulation), the coordinator's record of acknowledged heads and its
client-level ledger.  Resuming reopens those, so nothing is charged from a
copy; the checkpoint notes the client-level ledger's length, so a release
charged after it (and re-run) is named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.shared.settings import defaults

CHECKPOINT_FILE = "checkpoint.safetensors"
OPTIMIZER_PREFIX = "optimizer/"  # the optimizer state's tensors, beside the model's (whose keys have no '/')
FORMAT = "fedsilo-checkpoint"
VERSION = 1
# Settings an operator may change when resuming: how long to wait, not what the run is.
OPERATIONAL = frozenset({"resume", "round-timeout", "connect-timeout"})
# Run statuses a resume may continue: it did not end, or it stopped at a round that failed.
RESUMABLE = ("running", "failed", "too-few-updates", "secure-aggregation-aborted")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from another run; the message says what to do."""


@dataclass
class Checkpoint:
    """The state after ``round`` completed rounds."""

    run_name: str
    round: int
    settings: dict[str, Any]
    summary: dict[str, Any]  # the run summary so far, as its JSON object (Summary.to_dict())
    arrays: dict[str, np.ndarray]
    exhausted: list[str] = field(default_factory=list)
    # Entries in the coordinator's client-level ledger at this checkpoint (None: no --central-dp).
    central_entries: int | None = None
    # The coordinator's optimizer state (distributed DP's momentum), key -> array; empty for FedAvg.
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, run_dir: Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(run_dir) / CHECKPOINT_FILE
        staging = path.with_name(f".{path.name}.tmp")
        state = {
            "format": FORMAT, "version": VERSION, "run_name": self.run_name, "round": self.round,
            "settings": self.settings, "summary": self.summary, "exhausted": sorted(self.exhausted),
            "keys": list(self.arrays), "central_entries": self.central_entries,
            "optimizer_keys": list(self.optimizer),
        }
        tensors = {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}
        tensors.update({OPTIMIZER_PREFIX + k: np.ascontiguousarray(v) for k, v in self.optimizer.items()})
        save_file(tensors, str(staging), metadata={FORMAT: json.dumps(state, allow_nan=False)})
        with open(staging, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(staging, path)
        _fsync_dir(path.parent)
        return path

    @classmethod
    def load(cls, run_dir: Path) -> "Checkpoint":
        from safetensors import safe_open

        path = Path(run_dir) / CHECKPOINT_FILE
        if not path.exists():
            raise CheckpointError(
                f"{run_dir} has no {CHECKPOINT_FILE}: the run completed no round before it stopped, "
                "so there is nothing to resume; start a new run instead"
            )
        try:
            with safe_open(str(path), framework="numpy") as fh:
                state = json.loads((fh.metadata() or {})[FORMAT])
                arrays = {key: fh.get_tensor(key) for key in state["keys"]}  # the model's own layer order
                optimizer = {key: fh.get_tensor(OPTIMIZER_PREFIX + key) for key in state.get("optimizer_keys", [])}
        except Exception as err:  # OSError, KeyError, JSON errors, safetensors' own SafetensorError
            raise CheckpointError(f"{path} is not a readable fedsilo checkpoint ({type(err).__name__}: {err})") from None
        if state.get("format") != FORMAT or state.get("version") != VERSION:
            raise CheckpointError(f"{path} is a checkpoint of another format or version ({state.get('format')} {state.get('version')})")
        return cls(state["run_name"], int(state["round"]), dict(state["settings"]), dict(state["summary"]),
                   arrays, list(state.get("exhausted", [])), state.get("central_entries"), optimizer)

    def check_settings(self, settings: dict[str, Any]) -> None:
        """The resumed run must be the same run: same settings, apart from the operational ones."""
        # A setting added since the checkpoint was written reads as its default (it did not exist then).
        saved = {**{k: v for k, v in defaults().items() if k in settings}, **self.settings}
        changed = sorted(
            key for key in set(saved) | set(settings)
            if key not in OPERATIONAL and saved.get(key) != settings.get(key)
        )
        if changed:
            shown = "; ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed[:5])
            raise CheckpointError(
                f"the resumed run's settings differ from the checkpoint's ({shown}); a resume continues "
                "the same run — start a new run to change them"
            )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resumable(run: Path) -> tuple[Path, Checkpoint]:
    """The run folder named by ``run`` (or its output folder's latest run) and its checkpoint.

    Only a run that did not end may continue: its summary says ``running`` (the
    coordinator died), ``failed`` (it stopped: too few departments, an error
    while aggregating a round) or ``too-few-updates`` (a robust rule was left
    with fewer usable updates than its guarantee needs).  A failed round leaves
    a checkpoint of the rounds before it (round 0: the initial model, when the
    first round failed), so the resume runs that round again.
    """
    from fedsilo.shared.runs import SUMMARY, resolve_run_dir
    from fedsilo.shared.safe_read import UnreadableFile
    from fedsilo.shared.summary_format import read_summary

    run_dir = resolve_run_dir(run).resolve()
    summary = run_dir / SUMMARY
    if not summary.exists():
        raise CheckpointError(f"{run} holds no run ({SUMMARY} is missing); give a run folder, e.g. runs/latest")
    try:
        status = read_summary(summary).status
    except UnreadableFile as err:  # the message names the file, the field and what to do
        raise CheckpointError(f"the run cannot be resumed: {err}") from None
    if status not in RESUMABLE:
        raise CheckpointError(f"{run_dir} ended as '{status}': there is nothing to resume; start a new run")
    return run_dir, Checkpoint.load(run_dir)
