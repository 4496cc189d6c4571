"""``fedsilo bench``: DP cost, simulation scale, privacy–utility, accounting, deployment.

Each benchmark is a module with ``run(out: Path, quick: bool, smoke: bool = False) -> BenchResult``
(``smoke``: its smallest size, for the tests);
:mod:`.cli` runs them one after the other on this machine (so ratios hold on a
noisy machine), saves ``OUT/NAME.json`` and renders ``OUT/BENCHMARKS.md``.
"""
