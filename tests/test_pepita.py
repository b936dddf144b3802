"""PEPITA (bench/algorithms/pepita.py): the update by hand on a small MLP for both passes and the
output layer, F's distribution, the same dropout mask in both passes, Srinivasan et al.'s options,
and the one-line refusal of non-MLP models. DDP equivalence and one step on every zoo model are in
tests/test_forward_gradient.py (they share the DDP workers with GrAPE)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.algorithms import RULES
from bench.config import ConfigError, compose
from bench.models import create_model


def build(*overrides: str, depth=2, width=5, shape=(6,), classes=3):
    cfg = compose(overrides=["algorithm.name=pepita", "data.name=synthetic", f"data.shape=[{shape[0]}]",
                             f"data.num_classes={classes}", f"model.depth={depth}", f"model.width={width}", *overrides])
    torch.manual_seed(0)
    model = create_model(cfg.model, shape, classes)
    return RULES.get("pepita")(cfg, model, classes, shape)


@pytest.mark.parametrize("output_error", ["modulated", "first"])
def test_update_equals_the_hand_computation_for_both_passes_and_the_output_layer(output_error):
    """A 3-Linear tanh MLP (two hidden layers): first pass on x, second on x − F e, and
    ΔW_1 = (h_1 − h_1^err) x^errᵀ, ΔW_2 = (h_2 − h_2^err) h_1^errᵀ, ΔW_3 = e^(err) h_2^errᵀ, all / batch."""
    module = build(f"algorithm.output_error={output_error}")
    w1, w2, w3 = (module.model.net[i] for i in (1, 3, 5))
    x, y = torch.randn(4, 6), torch.tensor([0, 2, 1, 2])
    surrogate, logits, loss = module.objective(x, y)
    surrogate.backward()

    def forward(inp):
        h1 = torch.tanh(inp @ w1.weight.T + w1.bias)
        h2 = torch.tanh(h1 @ w2.weight.T + w2.bias)
        return h1, h2, h2 @ w3.weight.T + w3.bias

    with torch.no_grad():
        h1, h2, out = forward(x)
        onehot = F.one_hot(y, 3).float()
        e = torch.softmax(out, -1) - onehot
        x_err = x - e @ module.input_feedback.T
        h1e, h2e, out_e = forward(x_err)
        e_err = torch.softmax(out_e, -1) - onehot
    err = e_err if output_error == "modulated" else e
    expected = [((h1 - h1e).T @ x_err / 4, (h1 - h1e).mean(0)), ((h2 - h2e).T @ h1e / 4, (h2 - h2e).mean(0)),
                (err.T @ h2e / 4, err.mean(0))]
    for layer, (dw, db) in zip((w1, w2, w3), expected):
        torch.testing.assert_close(layer.weight.grad, dw, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias.grad, db, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logits, out)  # the logged loss is the first pass's
    assert float((e_err - e).abs().max()) > 1e-4  # the two error choices really differ here


def test_input_feedback_is_uniform_at_the_original_scale():
    module = build(shape=(784,), depth=1, width=8, classes=10)
    f = module.input_feedback
    bound = 0.05 * math.sqrt(6 / 784)
    assert f.shape == (784, 10)
    assert float(f.abs().max()) <= bound and float(f.abs().max()) > 0.99 * bound
    assert abs(float(f.std()) - bound / math.sqrt(3)) < 0.03 * bound / math.sqrt(3)  # U(−a, a) has std a/√3


@pytest.mark.parametrize("dropout", ["model.dropout=0.5", "model.input_dropout=0.5"])
def test_both_passes_share_the_dropout_mask(dropout):
    """With F = 0 the second pass sees x again; the hidden updates vanish exactly iff the dropout
    masks (p = 0.5) are the same in both passes. Input dropout sits before the first Linear, so
    the second pass then runs the whole net (no reuse of the first pass's pre-activation)."""
    module = build(dropout, depth=2, width=32)
    assert (module._resume_at is None) == dropout.startswith("model.input_dropout")
    module.input_feedback.zero_()
    module.train()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    _, _, updates = module.updates(x, y)
    for dw, db in updates[:2]:
        assert float(dw.abs().max()) == 0.0 and float(db.abs().max()) == 0.0
    assert float(updates[2][0].abs().max()) > 0  # the output layer still learns from its error


def test_srinivasan_options_train_and_mirror_moves_the_feedback():
    module = build("algorithm.weight_mirror=true", "algorithm.normalize_activity=true")
    f0 = module.input_feedback_matrix().clone()
    opt = torch.optim.SGD(module.model.parameters(), lr=0.01)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    module._last_batch = 8
    for _ in range(3):
        opt.zero_grad()
        surrogate, _, loss = module.objective(x, y)
        surrogate.backward()
        opt.step()
        module.after_step()
    assert torch.isfinite(loss)
    assert f0.shape == (6, 3) and float((module.input_feedback_matrix() - f0).abs().max()) > 1e-6
    h = []
    module.acts[0].register_forward_hook(lambda m, i, o: h.append(o))
    module.model(x)
    assert abs(float(h[0].norm()) - 1.0) < 1e-5  # X / ‖X‖ over the batch, at evaluation too


@pytest.mark.parametrize("model", ["cnn", "lenet4", "alexnet"])
def test_conv_models_are_refused_in_one_line(model):
    with pytest.raises(ConfigError) as err:
        compose(overrides=["algorithm.name=pepita", f"model.name={model}"])
    assert "\n" not in str(err.value) and "pepita" in str(err.value) and "mlp" in str(err.value)


def test_updates_accumulate_into_an_existing_grad_and_reuse_one_buffer_per_parameter():
    """PEPITA writes its updates in place (bench/feedback/deliver.py, GradSlots): added to a
    ``.grad`` that exists, as AccumulateGrad adds; else into a buffer kept from step to step. Both
    equal the freshly allocated updates of ``updates()``."""
    module = build(depth=2, width=16)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    params = module.updated_parameters()
    _, _, fresh = module.updates(x, y)
    expected = [g for dw, db in fresh for g in (dw, db)]
    module.objective(x, y)
    first = [p.grad.clone() for p in params]
    pointers = [p.grad.data_ptr() for p in params]
    for got, want in zip(first, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    module.objective(x, y)  # no zero_grad: accumulate
    for p, g in zip(params, first):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-6, atol=0)
    for p in params:
        p.grad = None
    module.objective(x, y)
    assert [p.grad.data_ptr() for p in params] == pointers  # the same buffers, no new allocation
    for p, g in zip(params, first):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
