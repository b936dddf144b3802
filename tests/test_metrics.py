"""bench/metrics: macro precision/recall/F1, class separation, the shared rule/backprop gradient pass
(probe and sfa-fig2) and the sign-flip record; each checked against a hand computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from bench.metrics.classification import macro_scores


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


# --------------------------------------------------------------------------- bench/metrics, by hand

def test_macro_scores_on_a_hand_made_confusion_matrix():
    """Rows true, columns predicted. Class 2 occurs once and is never predicted (P = R = F1 = 0,
    still averaged); class 3 never occurs and is never predicted (left out of the average)."""
    cm = torch.tensor([[4, 1, 0, 0],
                       [2, 2, 0, 0],
                       [0, 1, 0, 0],
                       [0, 0, 0, 0]])
    scores = macro_scores(cm)
    # P: 4/6, 2/4, 0  R: 4/5, 2/4, 0  F1: 8/11, 1/2, 0   (means over the 3 present classes)
    assert scores["precision"].item() == pytest.approx(100 * 7 / 18, rel=1e-6)
    assert scores["recall"].item() == pytest.approx(100 * 1.3 / 3, rel=1e-6)
    assert scores["f1"].item() == pytest.approx(100 * 9 / 22, rel=1e-6)
    assert macro_scores(torch.eye(3, dtype=torch.long) * 5)["f1"].item() == pytest.approx(100.0)


def test_separation_scores_by_hand():
    from bench.metrics.separation import separation_scores

    labels = np.array([0, 1, 0, 1])
    # first half fits the 1-NN, second half is scored: 1 → 0 (right), 11 → 10 (right)
    tight = separation_scores(np.array([[0.0], [10.0], [1.0], [11.0]]), labels, k=1)
    # every point has a = 1; b = 10.5 (for 0 and 11) or 9.5 (for 1 and 10): s = 1 − a/b
    assert tight["silhouette"] == pytest.approx(1 - (1 / 10.5 + 1 / 9.5) / 2, rel=1e-12)
    assert tight["knn_acc"] == 100.0
    # 6 is nearer 10 (class 1) and 4 nearer 0 (class 0): both wrong
    assert separation_scores(np.array([[0.0], [10.0], [6.0], [4.0]]), labels, k=1)["knn_acc"] == 0.0
    assert math.isnan(separation_scores(np.zeros((4, 2)), np.zeros(4, dtype=int), k=1)["silhouette"])


def test_loss_gradients_rule_and_true_pass_and_first_layer_ratios(small_cfg):
    """The shared pass of the probe and sfa-fig2: FA's pass goes through B, the true pass is an
    independent backprop twin's, ``.grad`` stays untouched, and the ratios are their norms."""
    from bench.algorithms import RULES
    from bench.metrics.gradients import first_layer_ratios, layer_weights, loss_gradients
    from bench.models import create_model

    cfg = small_cfg("algorithm.name=fa", "data.shape=[6]", "data.num_classes=3", "model.depth=1", "model.width=5")
    torch.manual_seed(0)
    module = RULES.get("fa")(cfg, create_model(cfg.model, (6,), 3), 3, (6,))
    x, y = torch.randn(7, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    named = layer_weights(module.model)
    assert [n for n, _ in named] == ["net.1.weight", "net.3.weight"]  # weights only, no biases
    params = [p for _, p in named]
    (rule_w1, rule_w2), (rule_h,) = loss_gradients(module, x, y, params, true=False)
    (bp_w1, bp_w2), (bp_h,) = loss_gradients(module, x, y, params, true=True)
    assert all(p.grad is None for p in module.parameters())
    assert module.tap.outputs == []  # nothing outlives the call

    w1, b1 = module.model.net[1].weight, module.model.net[1].bias
    w2, b2 = module.model.net[3].weight, module.model.net[3].bias
    B = module.model.net[3].feedback
    h = torch.tanh(x @ w1.detach().T + b1.detach()).requires_grad_()
    e = torch.softmax(h @ w2.detach().T + b2.detach(), -1) - torch.nn.functional.one_hot(y, 3)
    e = e / len(y)
    torch.testing.assert_close(bp_w2, e.T @ h.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rule_w2, bp_w2)                      # the output layer's update is exact
    torch.testing.assert_close(bp_h, e @ w2.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rule_h, e @ B, rtol=1e-5, atol=1e-7)  # through B, not W
    d = (rule_h * (1 - h.detach() ** 2))
    torch.testing.assert_close(rule_w1, d.T @ x, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(rule_w1, bp_w1)

    weight_ratio, signal_ratio = first_layer_ratios(module, x, y)
    assert weight_ratio == pytest.approx(float(bp_w1.norm() / rule_w1.norm()), rel=1e-6)
    assert signal_ratio == pytest.approx(float(bp_h.norm() / rule_h.norm()), rel=1e-6)
    assert weight_ratio != pytest.approx(1.0, abs=1e-3)


def test_sign_flip_callback_records_the_fractions_at_epoch_end():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from bench.callbacks.probe import AlignmentProbe

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    module = SimpleNamespace(model=model, cfg=OmegaConf.create({"probe": {"sign_flips": True}}), global_step=9)
    probe = AlignmentProbe()
    probe.on_train_start(None, module)
    with torch.no_grad():
        model[1].weight.view(-1)[:2] *= -1.0  # 2 of 6 + 6 weights
    probe.on_train_batch_end(None, module, None, None, 0)
    probe.on_train_epoch_end(SimpleNamespace(is_global_zero=True, loggers=[], current_epoch=4), module)
    assert probe.records == [{"step": 9, "epoch": 4, "signs/flipped/0": 0.0, "signs/flipped/1": 2 / 6,
                              "signs/flipped_all": 2 / 12}]
