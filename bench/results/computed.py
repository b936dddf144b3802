"""Tables computed from the models alone (no training), rendered like the trained ones.

A table config with ``compute: <name>`` is produced by the function registered here under that
name; it returns one record per (row, column, field) in the shape ``table.aggregate`` produces,
so rendering, the CSV and the paper → measured cells are shared.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from bench.registry import Registry

COMPUTED: Registry = Registry("computed table")


@COMPUTED.register("feedback_memory")
def feedback_memory_table(table: DictConfig) -> list[dict]:
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
