"""Evaluation metrics the tables read: macro precision/recall/F1 from the test confusion matrix."""
from __future__ import annotations

import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from bench.algorithms.base import macro_scores


@pytest.mark.parametrize("num_classes, n", [(3, 40), (10, 500)])
def test_macro_scores_match_sklearn(num_classes, n):
    g = torch.Generator().manual_seed(num_classes)
    y = torch.randint(0, num_classes, (n,), generator=g)
    # a biased predictor: right 60% of the time, so the scores are far from 0, 100 and each other
    pred = torch.where(torch.rand(n, generator=g) < 0.6, y, torch.randint(0, num_classes, (n,), generator=g))
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm.index_put_((y, pred), torch.ones(n, dtype=torch.long), accumulate=True)
    ours = macro_scores(cm)
    p, r, f, _ = precision_recall_fscore_support(y.numpy(), pred.numpy(), average="macro", zero_division=0)
    assert ours["precision"].item() == pytest.approx(100 * p, abs=1e-4)
    assert ours["recall"].item() == pytest.approx(100 * r, abs=1e-4)
    assert ours["f1"].item() == pytest.approx(100 * f, abs=1e-4)


def test_test_split_logs_precision_recall_f1(small_cfg):
    from bench.run.train import train

    cfg = small_cfg()
    summary = train(cfg)
    final = summary["final"]
    assert {"test/precision", "test/recall", "test/f1"} <= set(final), sorted(final)
    for key in ("test/precision", "test/recall", "test/f1"):
        assert 0.0 <= final[key] <= 100.0


def test_best_epoch_is_the_first_epoch_with_the_lowest_validation_error():
    from bench.results.run import best_epoch

    rows = [{"val/err1": 30.0}, {"val/err1": 12.5}, {"val/err1": 20.0}, {"val/err1": 12.5}]
    assert best_epoch(rows) == {"best/val_err1": 12.5, "best/epoch": 2.0}
    assert best_epoch([{"train/err1": 1.0}]) == {}
