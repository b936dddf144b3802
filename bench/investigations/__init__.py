"""Measurements behind table decisions that are not tables themselves: each module runs with
``python -m bench.investigations.<name>`` and writes its evidence under ``results/investigations/``."""
