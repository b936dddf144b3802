"""Direct-projection family (dfa paper, DRTP): hand-computed updates, memory, slicing, bottleneck."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from bench.algorithms import RULES
from bench.config import compose
from bench.feedback.direct import DirectFeedback, feedback_memory
from bench.models import create_model
from bench.models.base import ZooModel


def build(rule: str, *overrides: str, model: nn.Module | None = None, shape=(6,), classes=3):
    cfg = compose(overrides=[f"algorithm.name={rule}", "data.name=synthetic", f"data.shape=[{shape[0]}]",
                             f"data.num_classes={classes}", "model.depth=2", "model.width=5", *overrides])
    torch.manual_seed(0)
    model = model or create_model(cfg.model, shape, classes)
    return RULES.get(rule)(cfg, model, classes, shape)


def hidden_update_by_hand(module, x, signal):
    """((B_i s) ⊙ tanh′(a_i)) h_{i-1}ᵀ for the two hidden layers of the 2×5 tanh MLP."""
    layers = [module.model.net[1], module.model.net[3]]
    h, grads = x, []
    for i, layer in enumerate(layers):
        a = h @ layer.weight.T + layer.bias
        delta = (signal @ module.feedback.matrix_for(i).T) * (1 - torch.tanh(a) ** 2)
        grads.append((delta.T @ h, delta.sum(0)))
        h = torch.tanh(a)
    return grads


@pytest.mark.parametrize("rule", ["dfa", "sdfa", "drtp"])
def test_direct_rules_update_equals_projection_times_local_derivative(rule):
    module = build(rule)
    x, y = torch.randn(4, 6), torch.tensor([0, 2, 1, 2])
    surrogate, logits, loss = module.objective(x, y)
    surrogate.backward()
    e = (torch.softmax(logits.detach(), -1) - F.one_hot(y, 3)) / 4
    signal = {"dfa": e, "sdfa": torch.sign(e) / 4, "drtp": -F.one_hot(y, 3).float() / 4}[rule]
    for (g_w, g_b), layer in zip(hidden_update_by_hand(module, x, signal), [module.model.net[1], module.model.net[3]]):
        torch.testing.assert_close(layer.weight.grad, g_w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias.grad, g_b, rtol=1e-5, atol=1e-7)
    out = module.model.net[5]  # the output layer: its true local gradient
    h2 = torch.tanh(module.model.net[3](torch.tanh(module.model.net[1](x))))
    torch.testing.assert_close(out.weight.grad, e.T @ h2, rtol=1e-5, atol=1e-7)


class TwoBlocks(ZooModel):
    """x → [Linear→tanh→Linear→tanh] → [Linear→tanh→Linear→tanh] → Linear; macro points = blocks."""

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh())
        self.block2 = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)
        self._points = {"micro": ["block1.1", "block1.3", "block2.1", "block2.3"], "macro": ["block1", "block2"]}

    def forward(self, x):
        return self.head(self.block2(self.block1(x)))


def test_macro_points_train_each_block_by_local_backprop_from_its_signal():
    torch.manual_seed(1)
    module = build("dfa", "algorithm.granularity=macro", model=TwoBlocks())
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    surrogate, logits, _ = module.objective(x, y)
    surrogate.backward()
    e = (torch.softmax(logits.detach(), -1) - F.one_hot(y, 3)) / 5
    block_in = x
    for i, block in enumerate([module.model.block1, module.model.block2]):
        twin = [p.detach().clone().requires_grad_() for p in block.parameters()]
        with module.tap.settings(cut=False, capture=False):  # the plain block, without the rule's hooks
            h = torch.func.functional_call(block, dict(zip([n for n, _ in block.named_parameters()], twin)), (block_in,))
        torch.autograd.backward(h, e @ module.feedback.matrix_for(i).T)  # local BP from B_i e
        for p, ref in zip(block.parameters(), twin):
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-7)
        block_in = h.detach()


def test_no_gradient_crosses_a_feedback_point():
    module = build("dfa")
    seen = []
    layer1, layer2 = module.model.net[1], module.model.net[3]
    seen_input = []
    layer2.register_full_backward_pre_hook(lambda m, g: seen.append(g[0].detach().clone()))
    layer2.register_full_backward_hook(lambda m, grad_in, grad_out: seen_input.append(grad_in[0]))
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    surrogate, logits, _ = module.objective(x, y)
    surrogate.backward()
    # what reaches layer 2's output is exactly its own injection (B_2 e) ⊙ tanh′(a_2), nothing from above
    e = (torch.softmax(logits.detach(), -1) - F.one_hot(y, 3)) / 4
    a2 = layer2(torch.tanh(layer1(x))).detach()
    (grad_into_layer2,) = seen
    torch.testing.assert_close(grad_into_layer2, (e @ module.feedback.matrix_for(1).T) * (1 - torch.tanh(a2) ** 2))
    # and nothing goes further down: the gradient layer 2 would send to its input does not exist
    assert seen_input == [None]


def test_unified_slices_have_the_promised_variance():
    sizes, e = [4000, 1000], 100
    fb = DirectFeedback(sizes, e, unified=True, normalize=True, seed=0)
    for i, l in enumerate(sizes):
        var = float(fb.matrix_for(i).double().var())
        assert abs(var * l * e - 1.0) < 0.05, (l, var * l * e)  # Launay Eq. 7–8: Var = 1/(l_i·e)
    assert fb.memory()["stored"] == max(sizes) * e


def test_feedback_memory_of_vgg16_matches_the_closed_form():
    """dfa Table 1: VGG-16 at 224², e = 1000; the paper quotes 55 GB naive and 13 GB unified."""
    model = create_model(OmegaConf.create({"name": "timm:vgg16"}), (3, 224, 224), 1000)
    report = feedback_memory(model, (3, 224, 224), 1000)
    sizes, side = [], 224
    for c in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if c == "M":
            side //= 2
        else:
            sizes.append(c * side * side)
    sizes += [4096, 4096]  # the two hidden fully connected layers
    assert sorted(report["points"].values()) == sorted(sizes)
    assert report["naive_floats"] == sum(sizes) * 1000 and report["unified_floats"] == max(sizes) * 1000
    assert round(report["naive_bytes"] / 1e9) == 54 and round(report["unified_bytes"] / 1e9) == 13


def test_bottleneck_masked_entries_never_change():
    module = build("dfa", "algorithm.bottleneck_layer=net.3", "algorithm.bottleneck_neurons=2",
                   "algorithm.optimizer=adam", "algorithm.lr=0.05")
    layer = module.model.net[3]
    keep = module.bottleneck_keep
    assert int(keep.sum()) == 2
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = torch.optim.Adam(module.model.parameters(), lr=0.05)
    for step in range(5):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        opt.zero_grad()
        surrogate, _, _ = module.objective(x, y)
        surrogate.backward()
        module.after_backward()
        opt.step()
    assert torch.equal(layer.weight[~keep], w0[~keep]) and torch.equal(layer.bias[~keep], b0[~keep])
    assert (layer.weight[keep] - w0[keep]).abs().max() > 1e-3


def test_bottleneck_layer_must_exist():
    with pytest.raises(ValueError, match="bottleneck_layer 'net.9'.*valid choices: net.1, net.3, net.5"):
        build("dfa", "algorithm.bottleneck_layer=net.9", "algorithm.bottleneck_neurons=2")


def test_computed_memory_table_records_equal_the_accounting():
    from bench.results.computed import feedback_memory_table

    table = OmegaConf.create({
        "metric": {"fields": {"naive_gb": "naive", "unified_gb": "unified", "points": "points"}},
        "columns": {"micro": {}},
        "rows": {"mlp": {"model": {"name": "mlp", "depth": 3, "width": 800}, "input_shape": [1, 28, 28],
                         "error_size": 10, "paper": {"micro": {"unified_gb": 1.0}}}}})
    records = {r["field"]: r for r in feedback_memory_table(table)}
    assert records["naive_gb"]["measured_mean"] == 3 * 800 * 10 * 4 / 1e9
    assert records["unified_gb"]["measured_mean"] == 800 * 10 * 4 / 1e9
    assert records["points"]["measured_mean"] == 3
    assert records["unified_gb"]["delta"] == 800 * 10 * 4 / 1e9 - 1.0 and records["naive_gb"]["paper"] is None
