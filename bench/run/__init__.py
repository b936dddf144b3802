"""What plans and runs runs: one run (:mod:`bench.run.train`), a table's cells (:mod:`bench.run.cells`),
the local and W&B sweep runner (:mod:`bench.run.sweep`), SLURM (:mod:`bench.run.submit`), ``make perf``
(:mod:`bench.run.perf`, extra benchmarks in :mod:`bench.run.benchmarks`) and ``make regress``
(:mod:`bench.run.regress`).

A run's identity (its name, config hash and folder) is computed once, right after its config is
composed (:class:`bench.run.plan.RunPlan`), and passed along. ``bench.results`` only reads the run
folders this package writes, renders tables and draws figures.

Importing this package imports nothing heavy: :mod:`bench.run.plan` and :mod:`bench.run.cells` are
torch-free, so the CLI can plan and validate before torch and Lightning are imported.
"""
