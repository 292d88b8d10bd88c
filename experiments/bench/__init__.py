"""Performance benchmarks P1-P6 of issue 5 (not tests).

Run: ``python -m experiments.bench.run_all [--quick] [--only P3,P4]``.

Each ``p*.py`` module has ``run(quick: bool) -> list[BenchResult]`` and can also be run on its own
(``python -m experiments.bench.p3_switch``). Ratios are measured within one run, interleaving the compared variants,
with warm-up iterations and the median of several repeats, on one CPU thread (``torch.set_num_threads(1)``).
"""
