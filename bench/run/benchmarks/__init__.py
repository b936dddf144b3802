"""Extra ``make perf`` benchmarks, one file each; importing this package registers them.

Each module registers ``run(args) -> list[dict]`` in ``BENCHMARKS``. ``bench perf`` runs the core
update/epoch ratios (``bench.run.perf``) and then every registered benchmark, and writes each one's
rows to ``<out dir>/<name>.csv`` next to the core CSV. ``bench perf --only NAME`` runs one.
Rows use the core CSV's columns where they apply (benchmark, case, rule, ratio_to_bp, target,
meets_target) so the README's perf table can be read off every file alike.
"""
import importlib
import pkgutil

from bench.registry import Registry

BENCHMARKS: Registry = Registry("benchmark")

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BENCHMARKS"]
