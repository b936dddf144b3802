"""Feedback alignment (bench/algorithms/feedback_alignment.py) against hand computations on tiny
nets with fixed weights; the alignment probe against an independent backprop twin for every rule
that sends the error through feedback (discovered from the registry); timm conversions.

Hand computations use plain torch ops on tensors that do not require grad, never autograd, so
they are independent of the code under test.
"""
from __future__ import annotations

import statistics
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from bench.algorithms import RULES
from bench.callbacks.probe import AlignmentProbe
from bench.config import ConfigError, compose
from bench.feedback.replaced import FeedbackLayer, convert_to_feedback
from bench.models import create_model
from bench.results.io import read_csv
from bench.run.train import train
from conftest import SMALL, angle, fixed, load_state, one_run_dir
from test_direct_feedback import dfa_batch


# ----------------------------------------------------------------------------- 1. FA, by hand

def test_fa_linear_matches_hand_computation():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(fixed(4, 3)), net[0].bias.copy_(fixed(4, offset=1.0))
        net[2].weight.copy_(fixed(2, 4, offset=2.0)), net[2].bias.copy_(fixed(2, offset=3.0))
    w1_param = net[0].weight
    report = convert_to_feedback(net, seed=0)
    assert report == ["0", "2"]
    assert net[0].weight is w1_param  # the converted layer shares the Parameter (optimizers see it)
    assert isinstance(net[0], FeedbackLayer) and isinstance(net[2], FeedbackLayer)
    assert "0.feedback" not in dict(net.named_parameters()) and "0.feedback" in dict(net.named_buffers())

    B2 = torch.tensor([[0.5, -1.0, 2.0, 0.25], [-0.75, 0.3, 1.5, -2.0]])  # W2's shape (2×4)
    B1 = fixed(4, 3, scale=0.9, offset=5.0)
    net[2].feedback.copy_(B2)
    net[0].feedback.copy_(B1)

    x = torch.tensor([[0.2, -0.4, 1.0], [1.5, 0.3, -0.7]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a1 = net[0](x)
    h = net[1](a1)
    h.retain_grad()
    out = net[2](h)
    (0.5 * ((out - t) ** 2).sum()).backward()

    with torch.no_grad():  # hand computation on plain tensors
        X = x.detach()
        W1, b1, W2, b2 = (p.detach().clone() for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
        H = torch.tanh(X @ W1.T + b1)
        delta = (H @ W2.T + b2) - t                     # ∂L/∂out for L = ½‖out − t‖²
        dh = delta @ B2                                 # B·δ per sample (B stored in W's shape)
        da1 = dh * (1 - H ** 2)
    assert torch.allclose(h.grad, dh, atol=1e-6)
    assert not torch.allclose(dh, delta @ W2, atol=1e-3)  # B really replaced Wᵀ
    assert torch.allclose(net[2].weight.grad, delta.T @ H, atol=1e-6)
    assert torch.allclose(net[2].bias.grad, delta.sum(0), atol=1e-6)
    assert torch.allclose(net[0].weight.grad, da1.T @ X, atol=1e-6)
    assert torch.allclose(net[0].bias.grad, da1.sum(0), atol=1e-6)
    assert torch.allclose(x.grad, da1 @ B1, atol=1e-6)

    # true_gradient-style switch: use_feedback=False is plain backprop (Wᵀ)
    for layer in (net[0], net[2]):
        layer.use_feedback = False
    h2 = net[1](net[0](X))
    gh = torch.autograd.grad(0.5 * ((net[2](h2) - t) ** 2).sum(), h2)[0]
    assert torch.allclose(gh, delta @ W2, atol=1e-6)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, "same")])
def test_fa_conv2d_input_gradient_is_transposed_conv_with_B(stride, padding):
    net = nn.Sequential(nn.Conv2d(2, 3, 3, stride=stride, padding=padding))
    with torch.no_grad():
        net[0].weight.copy_(fixed(3, 2, 3, 3)), net[0].bias.copy_(fixed(3, offset=1.0))
    assert convert_to_feedback(net) == ["0"]
    B = fixed(3, 2, 3, 3, scale=0.7, offset=4.0)
    net[0].feedback.copy_(B)
    W = net[0].weight.detach().clone()
    pad = 1 if padding == "same" else padding

    x = fixed(2, 2, 6, 5, scale=1.0, offset=0.5).requires_grad_(True)
    out = net(x)
    g = fixed(*out.shape, scale=1.0, offset=7.0)  # δ = ∂L/∂out for L = ⟨out, g⟩
    out.backward(g)

    expected_x = torch.nn.grad.conv2d_input(x.shape, B, g, stride=stride, padding=pad)
    expected_w = torch.nn.grad.conv2d_weight(x.detach(), W.shape, g, stride=stride, padding=pad)
    assert torch.allclose(x.grad, expected_x, atol=1e-5)
    assert torch.allclose(net[0].weight.grad, expected_w, atol=1e-5)
    assert torch.allclose(net[0].bias.grad, g.sum((0, 2, 3)), atol=1e-5)
    bp_x = torch.nn.grad.conv2d_input(x.shape, W, g, stride=stride, padding=pad)
    assert (x.grad - bp_x).abs().max() > 1e-2  # B, not W, carried the error

    # B = W: FA is exactly backprop
    net[0].feedback.copy_(W)
    x.grad = None
    net[0].weight.grad = None
    net(x).backward(g)
    ref = nn.Conv2d(2, 3, 3, stride=stride, padding=padding)
    with torch.no_grad():
        ref.weight.copy_(W), ref.bias.copy_(net[0].bias)
    x_ref = x.detach().clone().requires_grad_(True)
    ref(x_ref).backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(net[0].weight.grad, ref.weight.grad)


# ----------------------------------------------------------------------------- 4. alignment probe

def probe_rows(run_dir):
    rows = read_csv(run_dir / "probe.csv")
    return [{k: float(v) for k, v in r.items() if v != ""} for r in rows]


def test_probe_fa_wb_angle_matches_weights_and_feedback(small_cfg, tmp_path):
    # lr = 0: the weights in last.ckpt are exactly those the probe measured at step 0.
    cfg = small_cfg("algorithm.name=fa", "algorithm.optimizer=sgd", "algorithm.lr=0.0",
                    "probe.every=1", "trainer.max_steps=1")
    train(cfg)
    run = one_run_dir(tmp_path / "runs")
    (row,) = probe_rows(run)
    state = load_state(run)
    layers = ["net.1", "net.3", "net.5"]
    for layer in layers:
        W, B = state[f"model.{layer}.weight"], state[f"model.{layer}.feedback"]
        assert W.shape == B.shape
        assert row[f"align/wb/{layer}"] == pytest.approx(angle(W, B), abs=1e-6)
        assert 45 < row[f"align/wb/{layer}"] < 135  # independent random matrices: near 90°
    assert row["align/update/net.5"] < 1e-3              # the output layer's update is exact under FA
    assert row["align/update/net.1"] > 1.0
    assert row["align/signal/net.4"] > 1.0               # δh reaches the last hidden layer through B


PROBE_MLP = ["algorithm.name={}", "data.shape=[6]", "data.num_classes=3", "model.depth=2", "model.width=5",
             "probe.signals=true"]


def probe_module(rule, *overrides):
    """A rule on the 6→5→5→3 MLP (the refusal propagates)."""
    cfg = compose(overrides=[*SMALL, *(o.format(rule) for o in PROBE_MLP), *overrides])
    torch.manual_seed(0)
    model = create_model(cfg.model, (6,), 3)
    return RULES.get(rule)(cfg, model, 3, (6,))


def sends_the_error_through_feedback(rule) -> bool:
    """Whether a rule, built on the MLP, replaces Wᵀ in the backward: a feedback tensor per layer
    (the FA family) or cut feedback points that receive a projection (the direct family)."""
    try:
        module = probe_module(rule)
    except (ConfigError, ValueError):
        return False
    return bool(module.feedback_weight_pairs()) or bool(module.tap is not None and module.tap.cut)


FEEDBACK_RULES = [r for r in RULES.names() if sends_the_error_through_feedback(r)]


def test_feedback_rules_are_discovered_from_the_registry():
    assert {"fa", "dfa", "kp", "usf_sn"} <= set(FEEDBACK_RULES) and "bp" not in FEEDBACK_RULES


def measured_probe(small_cfg, rule):
    """Build a rule on the 6→5→5→3 MLP, do what training_step does up to the probe, call the probe."""
    module = probe_module(rule)
    x, y = dfa_batch()
    surrogate, logits, loss = module.probed_objective(x, y)
    surrogate.backward()
    rule_grads = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    rule_signals = [h.grad.clone() for h in module.tap.outputs]
    values = AlignmentProbe().measure(SimpleNamespace(world_size=1), module)
    return module, x, y, rule_grads, rule_signals, values


@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_probe_measure_against_independent_backprop(small_cfg, rule):
    module, x, y, rule_grads, rule_signals, values = measured_probe(small_cfg, rule)
    net = module.model.net
    pairs = module.feedback_weight_pairs()
    # an independent backprop twin (copying weights is fine in a test)
    twin = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        for i, j in ((0, 1), (2, 3), (4, 5)):
            twin[i].weight.copy_(net[j].weight), twin[i].bias.copy_(net[j].bias)
    h1 = twin[1](twin[0](x))
    h2 = twin[3](twin[2](h1))
    h1.retain_grad(), h2.retain_grad()
    F.cross_entropy(twin[4](h2), y).backward()
    for i, j in ((0, 1), (2, 3), (4, 5)):
        g_rule, g_bp = rule_grads[f"net.{j}.weight"], twin[i].weight.grad
        assert values[f"align/update/net.{j}"] == pytest.approx(angle(g_rule, g_bp), abs=1e-4)
        assert values[f"align/ratio/net.{j}"] == pytest.approx(float(g_rule.norm() / g_bp.norm()), rel=1e-5)
        if pairs:
            W, B = pairs[f"net.{j}"]
            assert values[f"align/wb/net.{j}"] == pytest.approx(angle(W, B), abs=1e-6)
    if not pairs:
        assert not any(k.startswith("align/wb/") for k in values)
    # Launay Eq. 6: per-sample angle between the rule's δh_i and backprop's ∂L/∂h_i, mean and std
    for point, s_rule, s_bp in zip(["net.2", "net.4"], rule_signals, [h1.grad, h2.grad]):
        per_sample = [angle(a, b) for a, b in zip(s_rule, s_bp)]
        assert values[f"align/signal/{point}"] == pytest.approx(statistics.fmean(per_sample), abs=1e-4)
        assert values[f"align/signal_std/{point}"] == pytest.approx(statistics.stdev(per_sample), abs=1e-4)
    assert values["align/signal/net.4"] > 1.0  # B, not W, carries the error to the last hidden layer
    assert values["align/update/net.5"] < 1e-3  # the output layer's update is exact
    assert values["align/ratio/net.5"] == pytest.approx(1.0, abs=1e-5)
    assert values["align/update/net.1"] > 1.0
    # the probe must leave the rule's .grad untouched and the rule switched back on
    for n, p in module.model.named_parameters():
        assert torch.equal(p.grad, rule_grads[n])
    if pairs:
        assert all(layer.use_feedback for layer in module.layers.values())
    else:
        assert module.tap.cut


# ----------------------------------------------------------------------------- 5. timm conversions

def linear_conv_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# timm's vgg16 at 32×32 still carries its 7×7×512→4096 conv "fc1" (134M parameters in all); three
# forward/backward passes through it cost ~16 s on 2 busy cores. vgg11 would not help (same head),
# so the full vgg16 is converted and its report checked, and the gradient checks and the step run
# on vgg16 with mlp_ratio=1/64: the same 13 convs + 3 head layers, a 64-wide fc1 (16.6M params).
TIMM_CASES = [("resnet18", {}, "conv1", "fc"), ("vgg16", {"mlp_ratio": 1 / 64}, "features.0", "head.fc")]


def test_fa_conversion_report_of_full_timm_vgg16():
    model = timm.create_model("vgg16", pretrained=False, num_classes=10)
    names = linear_conv_names(model)
    assert len(names) == 16 and sum(p.numel() for p in model.parameters()) > 130_000_000
    report = convert_to_feedback(model, seed=1)
    assert sorted(report) == sorted(names) and len(report) == len(names)
    assert linear_conv_names(model) == names
    for n in names:
        layer = model.get_submodule(n)
        assert isinstance(layer, FeedbackLayer) and layer.feedback.shape == layer.weight.shape
    assert not any(n.endswith("feedback") for n, _ in model.named_parameters())


@pytest.mark.parametrize("arch,kwargs,first,last", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_fa_converts_timm_model_and_trains_one_step(arch, kwargs, first, last):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10, drop_rate=0.0, **kwargs)
    names = linear_conv_names(model)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([3, 7])

    def grads():
        xr = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(xr), y)
        last_w = model.get_submodule(last).weight
        gx, gw = torch.autograd.grad(loss, [xr, last_w])
        return loss, gx, gw

    model.train()
    _, bp_x, bp_fc = grads()
    report = convert_to_feedback(model, seed=1)
    assert sorted(report) == sorted(names) and len(report) == len(names)
    assert all(isinstance(model.get_submodule(n), FeedbackLayer) for n in names)
    assert linear_conv_names(model) == names  # same layers, same order, now FA layers
    loss, fa_x, fa_fc = grads()
    assert torch.isfinite(loss)
    # the last layer's update is exact under FA; the error reaching the input is not backprop's
    assert torch.allclose(fa_fc, bp_fc, rtol=1e-4, atol=1e-6)
    assert angle(fa_x, bp_x) > 1.0

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for n in (f"{first}.weight", f"{last}.weight"):
        p = dict(model.named_parameters())[n]
        assert (p.detach() - before[n]).abs().max() > 1e-6, n
    assert all(torch.isfinite(p).all() for p in model.parameters())


