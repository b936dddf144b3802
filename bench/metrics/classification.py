"""Classification scores from a confusion matrix (rlra Table 5, middle: precision, recall, F1)."""
from __future__ import annotations

import torch


def macro_scores(confmat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Macro-averaged precision, recall and F1 in % from a confusion matrix (rows: true class,
    columns: predicted), as rlra Table 5 (middle) reports them. Classes that never occur and are
    never predicted are left out of the average; a class with no predictions has precision 0."""
    cm = confmat.double()
    tp, predicted, actual = cm.diagonal(), cm.sum(0), cm.sum(1)
    present = (predicted + actual) > 0
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    return {name: 100.0 * v[present].mean().float() for name, v in
            (("precision", precision), ("recall", recall), ("f1", f1))}
