"""``fedsilo bench``: DP cost, simulation scale, privacy–utility, accounting, deployment.

Each benchmark is a module with ``run(out: Path, quick: bool, smoke: bool = False) -> BenchResult``
(``smoke``: its smallest size, for the tests);
:mod:`.cli` runs them one after the other on this machine (so ratios hold on a
noisy machine), saves ``OUT/NAME.json`` and renders ``OUT/BENCHMARKS.md``.

A benchmark measures in its module (numbers into ``raw``) and presents in ``NAME_summary``
(tables of formatted cells, targets, plot), its sentences in ``templates/NAME.md.j2``; its
``rerender(path, draw_plots=True)`` rebuilds a saved result from ``raw`` alone, which is how
``fedsilo bench report`` renders it.
"""
