"""Learned feedback (bench/algorithms/feedback_learning.py): Kolen–Pollack and weight mirrors teach
B the forward weights, by hand and through Lightning. ``build`` and ``step`` are the sfa family's
(tests/test_sign_feedback.py): ``step`` mimics ``AlgorithmModule.training_step`` hook for hook."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.results.io import read_csv
from bench.run.train import train
from conftest import angle, load_state, one_run_dir
from test_sign_feedback import build, step

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets: one torch thread (conftest)


def test_kp_feedback_approaches_W_on_a_regression_task(small_cfg):
    module = build(small_cfg, "kp", "algorithm.kp_decay=0.5", shape=(5,), classes=3, depth=2, width=12)
    module.loss_fn = lambda out, target: F.mse_loss(out, target)  # regression: real-valued targets
    torch.manual_seed(2)
    x = torch.randn(64, 5)
    target = torch.tanh(x @ torch.randn(5, 3))
    opt = torch.optim.SGD(module.model.parameters(), lr=0.1)
    layers = list(module.layers.values())
    d0 = [(l.feedback - l.weight).detach().clone() for l in layers]
    start = [angle(l.feedback, l.weight) for l in layers]
    losses = [step(module, opt, x, target) for _ in range(60)]
    for l, d, a0 in zip(layers, d0, start):
        # B − W contracts by exactly (1 − ηλ) per step, whatever the update of W was
        assert torch.allclose(l.feedback - l.weight.detach(), d * (1 - 0.1 * 0.5) ** 60, atol=1e-5)
        assert a0 > 60 and angle(l.feedback, l.weight) < 10
    assert float(losses[-1]) < 0.8 * float(losses[0])


def test_weight_mirrors_teach_B_the_forward_weights_linear_and_conv(small_cfg):
    module = build(small_cfg, "wm", "algorithm.mirror_rate=0.1", "algorithm.mirror_batch=128",
                   "model.channels=[4]", "model.kernel=3", "model.stride=2", "model.hidden=[6]",
                   shape=(2, 8, 8), classes=3, model="cnn")
    layers = module.layers
    assert sorted(layers) == ["classifier", "features.0.conv", "hidden.0.fc"]
    before = {n: angle(l.feedback, l.weight) for n, l in layers.items()}
    for _ in range(40):
        module.mirror()
    for n, l in layers.items():
        assert before[n] > 60 and angle(l.feedback, l.weight) < 15, (n, angle(l.feedback, l.weight))
        ratio = float(l.feedback.norm() / l.weight.norm())
        assert 0.8 < ratio < 1.3, (n, ratio)  # B → W itself, not only its direction (unbiased estimate)



def test_weight_mirror_step_equals_hand_computation(small_cfg):
    # One mirror phase on the 2-layer net: B ← (1 − α)B + α·(W x)ᵀx/n, x ~ N(0, I) from the rule's
    # own stream (seed + 104729), drawn layer by layer in module order.
    module = build(small_cfg, "wm", "algorithm.mirror_rate=0.25", "algorithm.mirror_batch=5", shape=(3,), classes=2)
    layers = list(module.layers.values())
    B0 = [l.feedback.detach().clone() for l in layers]
    gen = torch.Generator().manual_seed(int(module.cfg.seed) + 104729)
    expected = []
    for l, b in zip(layers, B0):
        x = torch.randn(5, l.weight.shape[1], generator=gen)
        expected.append(0.75 * b + 0.25 * (x @ l.weight.detach().T).T @ x / 5)
    module.mirror()
    for l, e, b in zip(layers, expected, B0):
        assert torch.allclose(l.feedback, e, atol=1e-6) and not torch.allclose(l.feedback, b, atol=1e-3)



def test_kp_through_lightning_probe_reads_B_and_B_reaches_W(small_cfg, tmp_path):
    # ηλ = 1: after the first step B equals W exactly. The probe (a callback) must read B before
    # the rule's own pre-step hook turns it into B − W.
    cfg = small_cfg("algorithm.name=kp", "algorithm.optimizer=sgd", "algorithm.lr=0.1", "algorithm.kp_decay=10.0",
                    "probe.every=1", "trainer.max_steps=3")
    assert train(cfg)["status"] == "finished"
    run = one_run_dir(tmp_path / "runs")
    rows = read_csv(run / "probe.csv")
    wb = [[float(v) for k, v in r.items() if k.startswith("align/wb/")] for r in rows]
    assert len(wb) == 3 and len(wb[0]) == 3
    assert all(a > 45 for a in wb[0]) and all(a < 1e-2 for r in wb[1:] for a in r), wb
    state = load_state(run)
    for key in [k for k in state if k.endswith(".feedback")]:
        assert torch.allclose(state[key], state[key.replace(".feedback", ".weight")], atol=1e-6)
