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
    """dfa Table 1 as dfa-1 computes it: VGG-16 at 224², e = 1000 (the paper quotes 55 GB naive and
    13 GB unified), against a closed form summed over the layer shapes by hand."""
    from bench.config import load_table
    from bench.results.computed import feedback_memory_table

    table = load_table("dfa-1")
    row = "VGG-16 (ImageNet 224², e=1000)"
    spec = table.rows[row]
    assert spec.model.name == "timm:vgg16" and list(spec.input_shape) == [3, 224, 224] and spec.error_size == 1000
    table.rows = {row: spec}  # the table's own config, one row: one dry forward of VGG-16 at 224²
    records = {r["field"]: r["measured_mean"] for r in feedback_memory_table(table)}
    sizes, side = [], 224
    for c in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if c == "M":
            side //= 2
        else:
            sizes.append(c * side * side)
    sizes += [4096, 4096]  # the two hidden fully connected layers
    assert records["points"] == len(sizes) == 15
    assert records["naive_gb"] == sum(sizes) * 1000 * 4 / 1e9  # Σ l_i·e floats, 4 bytes each
    assert records["unified_gb"] == max(sizes) * 1000 * 4 / 1e9 == 64 * 224 * 224 * 4000 / 1e9  # l_max·e
    assert round(records["naive_gb"]) == 54 and round(records["unified_gb"]) == 13


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


def test_micro_points_on_two_blocks_give_the_hand_computed_update():
    """Micro: every tanh of the 2-block toy is a point; each Linear gets ((B_i e) ⊙ tanh′(a_i)) h_{i-1}ᵀ."""
    torch.manual_seed(2)
    module = build("dfa", model=TwoBlocks())
    assert module.tap.names == ["block1.1", "block1.3", "block2.1", "block2.3"]
    x, y = torch.randn(5, 6), torch.tensor([2, 1, 0, 0, 1])
    surrogate, logits, _ = module.objective(x, y)
    surrogate.backward()
    e = (torch.softmax(logits.detach(), -1) - F.one_hot(y, 3)) / 5
    layers = [module.model.block1[0], module.model.block1[2], module.model.block2[0], module.model.block2[2]]
    h = x
    for i, layer in enumerate(layers):
        a = h @ layer.weight.detach().T + layer.bias.detach()
        delta = (e @ module.feedback.matrix_for(i).T) * (1 - torch.tanh(a) ** 2)
        torch.testing.assert_close(layer.weight.grad, delta.T @ h, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias.grad, delta.sum(0), rtol=1e-5, atol=1e-7)
        h = torch.tanh(a)
    torch.testing.assert_close(module.model.head.weight.grad, e.T @ h, rtol=1e-5, atol=1e-7)


def test_macro_update_on_two_blocks_by_hand():
    """Macro: block i's output gets B_i e; inside the block it is backpropagated by hand."""
    torch.manual_seed(3)
    module = build("dfa", "algorithm.granularity=macro", model=TwoBlocks())
    assert module.tap.names == ["block1", "block2"] and module.feedback.sizes == [4, 4]
    x, y = torch.randn(5, 6), torch.tensor([0, 2, 1, 1, 0])
    surrogate, logits, _ = module.objective(x, y)
    surrogate.backward()
    e = (torch.softmax(logits.detach(), -1) - F.one_hot(y, 3)) / 5
    h = x
    for i, block in enumerate([module.model.block1, module.model.block2]):
        first, second = block[0], block[2]
        a1 = h @ first.weight.detach().T + first.bias.detach()
        h1 = torch.tanh(a1)
        a2 = h1 @ second.weight.detach().T + second.bias.detach()
        delta2 = (e @ module.feedback.matrix_for(i).T) * (1 - torch.tanh(a2) ** 2)
        delta1 = (delta2 @ second.weight.detach()) * (1 - h1 ** 2)
        torch.testing.assert_close(second.weight.grad, delta2.T @ h1, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(first.weight.grad, delta1.T @ h, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(first.bias.grad, delta1.sum(0), rtol=1e-5, atol=1e-7)
        h = torch.tanh(a2)


@pytest.mark.parametrize("granularity,unified", [("micro", True), ("micro", False), ("macro", True)])
def test_rule_allocates_exactly_the_computed_feedback_memory(granularity, unified):
    """Unified: l_max·e floats (dfa Eq. 7–8), independent: Σ l_i·e, with conv points over full C×H×W."""
    shape = (3, 16, 16)
    model = create_model(OmegaConf.create({"name": "cnn", "channels": [4, 6], "kernel": 3}), shape, 10)
    module = build("dfa", f"algorithm.granularity={granularity}", f"algorithm.unified={str(unified).lower()}",
                   model=model, shape=shape, classes=10)
    # by hand: conv 3×3 pad 1 keeps 16², each max-pool halves; the hidden points are after the acts
    sizes = {"micro": [4 * 16 * 16, 6 * 8 * 8], "macro": [4 * 8 * 8, 6 * 4 * 4]}[granularity]
    assert module.feedback.sizes == sizes
    floats = sum(b.numel() for b in module.feedback.buffers())
    assert floats == (max(sizes) if unified else sum(sizes)) * 10
    assert sum(b.numel() * b.element_size() for b in module.feedback.buffers()) == 4 * floats
    closed = feedback_memory(model, shape, 10, granularity)
    assert 4 * floats == closed["unified_bytes" if unified else "naive_bytes"]


def test_transformer_feedback_points_and_one_dfa_step():
    """Launay et al. 2020 (DFA scales…, §3/App. D): micro = after attention+norm, after the FFN
    activation and at the block output; macro = the block outputs. One DFA step on token ids."""
    from bench.models.transformer import TransformerLM

    T, vocab, d = 8, 11, 16
    micro = ["blocks.0.ln_2", "blocks.0.mlp.act", "blocks.0", "blocks.1.ln_2", "blocks.1.mlp.act", "blocks.1"]
    for granularity, names, sizes in [("micro", micro, [d, 4 * d, d] * 2), ("macro", ["blocks.0", "blocks.1"], [d, d])]:
        torch.manual_seed(4)
        model = TransformerLM((T,), vocab, n_layer=2, n_head=2, n_embd=d)
        module = build("dfa", f"algorithm.granularity={granularity}", model=model, shape=(T,), classes=vocab)
        assert module.tap.names == names and module.feedback.sizes == sizes
        x = torch.randint(0, vocab, (3, T))
        y = torch.roll(x, -1, dims=1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        surrogate, logits, loss = module.objective(x, y)
        surrogate.backward()
        e = (torch.softmax(logits.detach(), -1) - F.one_hot(y, vocab)).reshape(-1, vocab) / (3 * T)
        blocks = [model.blocks[0], model.blocks[1]]
        if granularity == "micro":
            # the FFN's first layer sees the (cut) ln_2 output and its own point's signal only:
            # ΔW_fc = ((B_act e) ⊙ GELU′(a)) · ln_2(x)ᵀ, summed over tokens
            ln2_out = module.tap.outputs[3].detach().reshape(-1, d)
            fc = blocks[1].mlp.c_fc
            a = (ln2_out @ fc.weight.detach().T + fc.bias.detach()).requires_grad_()
            (gelu_prime,) = torch.autograd.grad(F.gelu(a).sum(), a)
            delta = (e @ module.feedback.matrix_for(4).T) * gelu_prime
            torch.testing.assert_close(fc.weight.grad, delta.T @ ln2_out, rtol=1e-4, atol=1e-7)
            # and the FFN's output projection only sees the block-output signal B_block e
            act = module.tap.outputs[4].detach().reshape(-1, 4 * d)
            proj = blocks[1].mlp.c_proj
            torch.testing.assert_close(proj.weight.grad, (e @ module.feedback.matrix_for(5).T).T @ act,
                                       rtol=1e-4, atol=1e-7)
        else:
            # macro: block 1 trains by local BP of ⟨block(h_0), B_1 e⟩ from its (cut) input
            twin = {n: p.detach().clone().requires_grad_() for n, p in blocks[1].named_parameters()}
            with module.tap.settings(cut=False, capture=False):
                out = torch.func.functional_call(blocks[1], twin, (module.tap.outputs[0].detach(),))
            torch.autograd.backward(out.reshape(-1, d), e @ module.feedback.matrix_for(1).T)
            for n, p in blocks[1].named_parameters():
                torch.testing.assert_close(p.grad, twin[n].grad, rtol=1e-4, atol=1e-8)
        # the output head gets its true local gradient; every parameter gets a finite update
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
        assert sorted(moved) == sorted(before), set(before) - set(moved)
        assert torch.isfinite(module.objective(x, y)[2])
