"""What every benchmark shares: its result format, the machine it ran on, memory and time."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Table:
    """A table for BENCHMARKS.md: ``rows`` are lists of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Target:
    """One target from the issue and whether this run met it (``None``: not measured)."""

    target: str
    measured: str
    met: bool | None
    note: str = ""  # what limits it; when missed, what would close it


@dataclass
class BenchResult:
    """One benchmark's outcome: machine-readable ``raw`` data plus what the summary shows."""

    name: str
    title: str
    quick: bool
    text: str = ""  # a paragraph: what was measured and how
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # PNG file names inside OUT
    targets: list[Target] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # 1/5/15-minute load averages just before it started: other work on the
    # machine skews timings (a load near the core count means it was busy).
    load_before: list[float] | None = None

    def save(self, out: Path) -> Path:
        path = Path(out) / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**asdict(self), "machine": machine()}, indent=2, allow_nan=False) + "\n")
        return path


def rerendered(path: Path | str, rebuild: Callable[[dict[str, Any]], BenchResult]) -> BenchResult:
    """``rebuild(saved)`` of the result saved at ``path``, keeping its saved time and load average.

    A benchmark's ``rerender`` gives ``rebuild``: its presentation from the saved raw numbers;
    nothing is measured again.
    """
    saved = json.loads(Path(path).read_text(encoding="utf-8"))
    result = rebuild(saved)
    result.seconds, result.load_before = saved.get("seconds", 0.0), saved.get("load_before")
    return result


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, where the OS reports them."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine() -> dict[str, Any]:
    """The machine the numbers came from."""
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = 0
    try:
        mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _pss_bytes(pid: int) -> int:
    """Proportional set size of one process (shared pages split among sharers)."""
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler:
    """Calls :meth:`sample` every ``interval`` seconds on a background thread, inside ``with``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class TreeMemory(Sampler):
    """Peak memory of a process and all its descendants (Ray workers included), sampled.

    PSS, not RSS: forked workers share most of their pages, and summing RSS
    would count those many times.  Use as a context manager around the work.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.pid = pid or os.getpid()
        self.peak = 0

    def sample(self) -> None:
        from fedsilo.shared.flower_cli import descendants

        total = sum(_pss_bytes(p) for p in [self.pid, *descendants(self.pid)])
        self.peak = max(self.peak, total)

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30


class Stopwatch:
    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
