"""Every layer-converting rule on every layer type ``convert_to_feedback`` converts (issue 16 §2,
issue 15 §6): generated from the registries, so a new converting rule or a new entry in
``bench.feedback.replaced.CONVERTERS`` is tested without anyone listing the pair.

* converting rules: every rule in ``RULES`` of the replaced-backward family (a
  ``FeedbackAlignment`` subclass); a guard test checks that no other rule converts layers;
* layer types: the keys of ``CONVERTERS``; each is exercised on the first small zoo model whose
  structure view has at least two hidden layers of that type (so δ crosses one twin's B).

One training step each must run, change every converted layer's weights, keep B finite, and give
the first layer of the type under test a weight update that is *not* backprop's (the error
reached it through the feedback B of the layers above, not through their W).
"""
from __future__ import annotations

import pytest
import torch

from bench.algorithms import RULES
from bench.algorithms.feedback_alignment import FeedbackAlignment
from bench.config import compose
from bench.feedback.replaced import CONVERTERS, FeedbackLayer
from bench.models import create_model
from bench.models.locally_connected import LocallyConnected2d

# Small zoo models to find each layer type in: (model overrides, input shape).
CANDIDATES = [
    (["model.name=mlp", "model.depth=2", "model.width=6"], (1, 4, 4)),
    (["model.name=cnn", "model.channels=[3,4]", "model.kernel=3", "model.pool=none"], (2, 6, 6)),
    (["model.name=lcnet", "model.channels=[3,4]", "model.kernel=3", "model.stride=1"], (2, 6, 6)),
]
CLASSES = 3
CONVERTING = sorted(n for n in RULES.names() if issubclass(RULES.get(n), FeedbackAlignment))
EXTRA = {"wm": ["algorithm.mirror_batch=2", "algorithm.mirror_size=1"]}


def config(rule: str, overrides, shape, *extra):
    return compose(overrides=["data.name=synthetic", "probe.every=0", f"algorithm.name={rule}",
                              f"data.shape=[{','.join(map(str, shape))}]", f"data.num_classes={CLASSES}",
                              *overrides, *EXTRA.get(rule, []), *extra])


def hidden_layers_of(kind: type, model) -> list[str]:
    blocks = [b for st in model.structure().stages for b in st.blocks]
    return [s.name for b in blocks for s in b.steps if s.role == "layer" and isinstance(s.fn, kind)]


def model_for(kind: type):
    """(overrides, shape, names of the hidden layers of ``kind``) of the first candidate with two."""
    for overrides, shape in CANDIDATES:
        cfg = config("bp", overrides, shape)
        names = hidden_layers_of(kind, create_model(cfg.model, shape, CLASSES))
        if len(names) >= 2:
            return overrides, shape, names
    raise AssertionError(f"no small zoo model in CANDIDATES has two hidden {kind.__name__} layers: add one")


# Tiny nets (ResNet-18 at batch 2): one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_registries_yield_the_known_pairs():
    """The generators are not empty: the rules and layer types known today are among them."""
    assert {"fa", "kp", "wm", "usf_init", "usf_sn", "ss", "dense_fa"} <= set(CONVERTING)
    assert {torch.nn.Linear, torch.nn.Conv2d} <= set(CONVERTERS) and len(CONVERTERS) >= 3


@pytest.mark.parametrize("kind", list(CONVERTERS), ids=lambda k: k.__name__)
@pytest.mark.parametrize("rule", CONVERTING)
def test_rule_converts_layer_type_and_trains_one_step(rule, kind):
    overrides, shape, names = model_for(kind)
    cfg = config(rule, overrides, shape)
    torch.manual_seed(0)
    module = RULES.get(rule)(cfg, create_model(cfg.model, shape, CLASSES), CLASSES, shape)
    modules = dict(module.model.named_modules())
    assert all(isinstance(modules[n], FeedbackLayer) and isinstance(modules[n], kind) for n in names)
    assert set(names) <= set(module.converted)
    module.total_steps = 1
    opt = torch.optim.SGD(module.model.parameters(), lr=0.1)
    layers = {n: modules[n] for n in module.converted}
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    torch.manual_seed(1)
    x, y = torch.rand(4, *shape) * 2 - 1, torch.tensor([0, 1, 2, 1])
    with module.true_gradient():  # backprop's update of the first layer of this type, for comparison
        bp = torch.autograd.grad(module.loss_fn(module.model(x), y), layers[names[0]].weight)[0]
    opt.zero_grad(set_to_none=True)  # one step, hook for hook as AlgorithmModule.training_step
    surrogate, _, loss = module.objective(x, y)
    surrogate.backward()
    rule_grad = layers[names[0]].weight.grad.detach().clone()
    module.on_after_backward()
    module.on_before_optimizer_step(opt)
    opt.step()
    module.after_step()
    assert torch.isfinite(loss)
    moved = {n: float((m.weight.detach() - before[n]).abs().max()) for n, m in layers.items()}
    assert all(v > 0 for v in moved.values()), moved
    assert all(torch.isfinite(m.feedback).all() for m in layers.values())
    assert rule_grad.shape == bp.shape and float(rule_grad.abs().max()) > 0
    assert not torch.allclose(rule_grad, bp, rtol=1e-3, atol=1e-6), "the error did not cross the feedback B"


def test_weight_mirrors_on_locally_connected_layers_learn_w():
    """Issue 15 §6: wm's mirror phase on an LC layer (it raised AttributeError 'dilation'). With
    α = 1 one phase sets B_l = W_l x_l x_lᵀ / n per position; with n large that is W_l within
    sampling error, far closer than the random B it started from."""
    overrides, shape, names = model_for(LocallyConnected2d)
    cfg = config("wm", overrides, shape, "algorithm.mirror_batch=4000", "algorithm.mirror_rate=1.0")
    torch.manual_seed(0)
    module = RULES.get("wm")(cfg, create_model(cfg.model, shape, CLASSES), CLASSES, shape)
    layer = dict(module.model.named_modules())[names[0]]
    W = layer.weight.detach()
    start = float((layer.feedback - W).norm() / W.norm())
    module.mirror()
    end = float((layer.feedback - W).norm() / W.norm())
    # relative error of Ŵ = W·(XXᵀ/n): about √(K/n) = √(18/4000) ≈ 0.07
    assert start > 1.0 and end < 0.15, (start, end)


def test_no_other_rule_converts_layers():
    """The family test above finds converting rules by class; every other rule leaves the model's
    layers alone (so a converting rule outside the family cannot escape the generated tests)."""
    overrides, shape = CANDIDATES[0]
    for rule in sorted(set(RULES.names()) - set(CONVERTING)):
        try:
            cfg = config(rule, overrides, shape)
            module = RULES.get(rule)(cfg, create_model(cfg.model, shape, CLASSES), CLASSES, shape)
        except ValueError:  # a rule that refuses this model converts nothing on it either
            continue
        assert not any(isinstance(m, FeedbackLayer) for m in module.model.modules()), rule
