"""Tables computed from the models alone (no training), rendered like the trained ones.

A table config with ``compute: <name>`` is produced by the function registered here under that
name, called as ``fn(table, budget)``; it returns one record per (row, column, field) in the
shape ``table.aggregate`` produces, so rendering, figures, the CSV and the paper → measured cells
are shared.
"""
from __future__ import annotations

import statistics

import torch
from omegaconf import DictConfig, OmegaConf

from bench.config import ConfigError
from bench.registry import Registry

COMPUTED: Registry = Registry("computed table")


@COMPUTED.register("feedback_memory")
def feedback_memory_table(table: DictConfig, budget: str = "full") -> list[dict]:
    """dfa Table 1: feedback-matrix memory of direct projection, naive Σ l_i·e vs unified l_max·e,
    from each model's real feedback points (one dry forward at the row's input shape)."""
    from bench.feedback.direct import feedback_memory
    from bench.models import create_model

    records = []
    for row, spec in table.rows.items():
        shape = tuple(spec.input_shape)
        error = int(spec.error_size)
        model = create_model(OmegaConf.create(OmegaConf.to_container(spec.model)), shape, error)
        report = feedback_memory(model, shape, error, str(spec.get("granularity", "micro")))
        measured = {"naive_gb": report["naive_bytes"] / 1e9, "unified_gb": report["unified_bytes"] / 1e9,
                    "points": float(len(report["points"]))}
        for column in table.columns:
            for field in table.metric.fields:
                paper = OmegaConf.select(OmegaConf.create(spec.get("paper") or {}), f"{column}.{field}", default=None)
                value = measured[field]
                records.append({"row": row, "column": column, "field": field, "paper": paper,
                                "measured_mean": value, "measured_std": 0.0, "seeds": 1,
                                "delta": (value - float(paper)) if paper is not None else None,
                                "status": "finished", "reason": ""})
    return records


def _record(row: str, column: str, field: str, values: list[float], paper=None) -> dict:
    mean = statistics.fmean(values) if values else None
    return {"row": row, "column": column, "field": field, "paper": paper, "measured_mean": mean,
            "measured_std": statistics.stdev(values) if len(values) > 1 else (0.0 if values else None),
            "seeds": len(values), "delta": (mean - float(paper)) if (mean is not None and paper is not None) else None,
            "status": "finished" if values else "failed", "reason": ""}


def build_rule(cfg: DictConfig):
    """The zoo model and the configured rule of a composed run config, at initialisation
    (forward init drawn from ``cfg.seed``; the rule draws its own feedback from it too)."""
    from bench.algorithms import RULES
    from bench.models import create_model

    torch.manual_seed(int(cfg.seed))
    shape, classes = tuple(cfg.data.shape), int(cfg.data.num_classes)
    model = create_model(cfg.model, shape, classes)
    module = RULES.get(str(cfg.algorithm.name))(cfg, model, classes, shape)
    module.eval()  # no dropout masks to match between the two passes
    return module


@COMPUTED.register("gradient_ratio")
def gradient_ratio_table(table: DictConfig, budget: str = "full") -> list[dict]:
    """sfa Figure 2: ‖∇_BP‖ / ‖∇_FA‖ at the first layer of a network at initialisation, per row
    (a depth) and column (an initialisation of W and B), from
    :func:`bench.metrics.gradients.first_layer_ratios`.

    Each cell's run config is composed like a trained cell's (common → row → column → budget,
    validated), so the model is the zoo's and the feedback the rule's own. Draws: the budget's
    ``seeds`` (each a fresh W, B and synthetic data set, ``data.name: synthetic``) times the
    ``data.n_train / data.batch_size`` batches of each; fields ``weight`` and ``signal`` are the
    mean (± std) of the two ratios over the draws."""
    records = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of a few hundred rows: threads only add synchronisation
    try:
        for row in table.rows:
            for column in table.columns:
                records += _gradient_ratio_cell(table, budget, row, column)
    finally:
        torch.set_num_threads(threads)
    return records


def _gradient_ratio_cell(table: DictConfig, budget: str, row: str, column: str) -> list[dict]:
    from bench.config import compose, table_budget
    from bench.data.synthetic import make_synthetic
    from bench.metrics.gradients import first_layer_ratios

    _, scalars = table_budget(table, budget, table.rows[row])
    cfg = compose(table.id, row, column, budget)
    if str(cfg.data.name) != "synthetic":
        raise ConfigError(f"table {table.id}: gradient_ratio draws its inputs from data.name=synthetic, "
                          f"got {cfg.data.name!r}")
    draws: dict[str, list[float]] = {"weight": [], "signal": []}
    for seed in range(int(scalars.get("seeds", 1))):
        cfg.seed = seed
        module = build_rule(cfg)
        data = make_synthetic(cfg.data, seed)
        batch = int(cfg.data.batch_size)
        for x, y in zip(data.train_x.split(batch), data.train_y.split(batch)):
            weight, signal = first_layer_ratios(module, x, y)
            draws["weight"].append(weight)
            draws["signal"].append(signal)
    paper_row = OmegaConf.create(table.rows[row].get("paper") or {})
    return [_record(row, column, field, draws[str(key)], OmegaConf.select(paper_row, f"{column}.{field}", default=None))
            for field, key in table.metric.fields.items()]

# grape-fig2 registers its computed table here (bench/results/forward_gradient.py).
from bench.results import forward_gradient as _forward_gradient  # noqa: E402,F401
