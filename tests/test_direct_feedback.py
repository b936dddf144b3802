"""Direct-projection family (bench/algorithms/direct_feedback.py: DFA, sign-DFA, DRTP):
hand-computed updates, memory, slicing, bottleneck, the cut at every feedback point."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from bench.algorithms import RULES
from bench.algorithms.direct_feedback import DirectFeedbackAlignment
from bench.config import ConfigError, compose
from bench.feedback.direct import DirectFeedback, feedback_memory
from bench.models import create_model
from bench.models.base import ZooModel
from conftest import fixed


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


@pytest.mark.parametrize("rule", ["dfa", "sdfa", "drtp"])
def test_summed_error_is_launays_per_sample_projection_and_leaves_the_output_layer_alone(rule):
    """error_reduction=sum (Launay et al.'s code): hidden updates use the per-sample signal summed
    over the batch, by hand; the output layer keeps the mean loss's gradient."""
    module = build(rule, "algorithm.error_reduction=sum")
    x, y = torch.randn(4, 6), torch.tensor([0, 2, 1, 2])
    surrogate, logits, loss = module.objective(x, y)
    surrogate.backward()
    e = torch.softmax(logits.detach(), -1) - F.one_hot(y, 3)
    signal = {"dfa": e, "sdfa": torch.sign(e), "drtp": -F.one_hot(y, 3).float()}[rule]
    for (g_w, g_b), layer in zip(hidden_update_by_hand(module, x, signal), [module.model.net[1], module.model.net[3]]):
        torch.testing.assert_close(layer.weight.grad, g_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.bias.grad, g_b, rtol=1e-5, atol=1e-6)
    out = module.model.net[5]
    h2 = torch.tanh(module.model.net[3](torch.tanh(module.model.net[1](x))))
    torch.testing.assert_close(out.weight.grad, e.T @ h2 / 4, rtol=1e-5, atol=1e-7)


def test_summed_error_is_refused_at_the_hidden_injection():
    with pytest.raises(ConfigError, match="error_reduction=sum is not valid with algorithm.error_at=hidden"):
        compose(overrides=["algorithm.name=dfa", "algorithm.error_reduction=sum", "algorithm.error_at=hidden",
                           "model.name=transformer", "data.name=synthetic"])


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


# ----------------------------------------------------------------------------- DFA by hand on the zoo MLP

def dfa_module(small_cfg, *overrides):
    cfg = small_cfg("algorithm.name=dfa", "data.shape=[6]", "data.num_classes=3", "model.depth=2",
                    "model.width=5", *overrides)
    torch.manual_seed(0)
    model = create_model(cfg.model, (6,), 3)
    module = DirectFeedbackAlignment(cfg, model, 3, (6,))
    return module


def dfa_batch():
    x = fixed(4, 6, scale=1.0, offset=0.3)
    y = torch.tensor([0, 2, 1, 2])
    return x, y


def test_dfa_update_matches_hand_computation(small_cfg):
    module = dfa_module(small_cfg)
    net = module.model.net
    linears = [net[1], net[3], net[5]]  # Flatten, Linear, Tanh, Linear, Tanh, Linear
    assert module.tap.names == ["net.2", "net.4"]
    x, y = dfa_batch()
    surrogate, logits, loss = module.objective(x, y)
    surrogate.backward()

    with torch.no_grad():
        W = [l.weight.detach().clone() for l in linears]
        b = [l.bias.detach().clone() for l in linears]
        h0 = x
        h1 = torch.tanh(h0 @ W[0].T + b[0])
        h2 = torch.tanh(h1 @ W[1].T + b[1])
        out = h2 @ W[2].T + b[2]
        e = (torch.softmax(out, 1) - F.one_hot(y, 3).float()) / x.shape[0]
        B1, B2 = module.feedback.matrix_for(0), module.feedback.matrix_for(1)
        da1 = (e @ B1.T) * (1 - h1 ** 2)   # (B_1 e) ⊙ f′(a_1)
        da2 = (e @ B2.T) * (1 - h2 ** 2)
        expected = [(da1.T @ h0, da1.sum(0)), (da2.T @ h1, da2.sum(0)), (e.T @ h2, e.sum(0))]
    assert torch.allclose(logits, out, atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(out, y), atol=1e-6)
    for i, (layer, (gw, gb)) in enumerate(zip(linears, expected)):
        assert torch.allclose(layer.weight.grad, gw, atol=1e-6), f"layer {i}"
        assert torch.allclose(layer.bias.grad, gb, atol=1e-6), f"layer {i}"
    # the hidden updates are not backprop's
    bp_da2 = (e @ W[2]) * (1 - h2 ** 2)
    assert not torch.allclose(linears[1].weight.grad, bp_da2.T @ h1, atol=1e-4)


def test_dfa_unified_matrix_memory_and_slice_normalisation(small_cfg):
    module = dfa_module(small_cfg)
    mem = module.feedback.memory()
    assert mem == {"stored": 5 * 3, "naive": (5 + 5) * 3, "unified": 5 * 3}

    sizes, e = [7, 3, 5], 4
    fb = DirectFeedback(sizes, e, unified=True, normalize=True, seed=3)
    l_max = max(sizes)
    assert fb.matrix.shape == (l_max, e)
    assert fb.memory() == {"stored": l_max * e, "naive": sum(sizes) * e, "unified": l_max * e}
    assert sum(b.numel() for b in fb.buffers()) == l_max * e
    U = fb.matrix
    err = fixed(2, e, scale=1.0)
    for i, l in enumerate(sizes):
        B_i = fb.matrix_for(i)
        # Launay Eq. 7–8: B = U/√(l_max·e), B_i = √(l_max/l_i)·B[:l_i]
        expected = U[:l] * math.sqrt(l_max / l) / math.sqrt(l_max * e)
        assert torch.allclose(B_i, expected, rtol=1e-6, atol=0)
        assert torch.allclose(B_i, U[:l] / math.sqrt(l * e), rtol=1e-6, atol=0)
        signal, scale = fb.project(err)[i]
        assert torch.allclose(scale * signal, err @ B_i.T, atol=1e-6)
    # the raw matrix is N(0, 1) (Eq. 7): with 28 draws its std is within a loose band of 1
    assert 0.5 < float(U.std()) < 1.6

    naive = DirectFeedback(sizes, e, unified=False, normalize=True, seed=3)
    assert naive.memory()["stored"] == sum(sizes) * e
    raw = DirectFeedback(sizes, e, unified=True, normalize=False, seed=3)
    assert torch.equal(raw.matrix_for(0), raw.matrix[:7])


def test_dfa_no_gradient_crosses_a_feedback_point(small_cfg):
    module = dfa_module(small_cfg)
    net = module.model.net
    seen_inputs = []
    handle = net[3].register_forward_pre_hook(lambda m, args: seen_inputs.append(args[0]))
    x, y = dfa_batch()
    x = x.clone().requires_grad_(True)
    surrogate, logits, _ = module.objective(x, y)
    handle.remove()
    h1, h2 = module.tap.outputs
    arriving = {}
    h1.register_hook(lambda g: arriving.__setitem__("h1", g))
    h2.register_hook(lambda g: arriving.__setitem__("h2", g))
    surrogate.backward()

    # The next layer reads a detached copy: the graph is cut at the point.
    assert len(seen_inputs) == 1 and not seen_inputs[0].requires_grad
    with torch.no_grad():
        e = (torch.softmax(logits, 1) - F.one_hot(y, 3).float()) / x.shape[0]
        s1, s2 = e @ module.feedback.matrix_for(0).T, e @ module.feedback.matrix_for(1).T
    # Exactly the projected signal arrives at each point; nothing comes from downstream.
    assert torch.allclose(arriving["h1"], s1, atol=1e-7)
    assert torch.allclose(arriving["h2"], s2, atol=1e-7)
    # The first layer's update (and x.grad) is a function of W_1, x and s_1 alone: no term from
    # W_2 or W_3 reaches it.
    g_first = net[1].weight.grad.clone()
    with torch.no_grad():
        a1 = x.detach() @ net[1].weight.T + net[1].bias
        da1 = s1 * (1 - torch.tanh(a1) ** 2)
    assert torch.allclose(g_first, da1.T @ x.detach(), atol=1e-6)
    assert torch.allclose(x.grad, da1 @ net[1].weight.detach(), atol=1e-6)

    # Under true_gradient() the cut is gone and h1 receives backprop's signal instead.
    with module.true_gradient():
        module.tap.clear()
        with module.tap.settings(capture=True):
            out = module.model(x.detach())
        h1_bp = module.tap.outputs[0]
        g_bp = torch.autograd.grad(F.cross_entropy(out, y), h1_bp)[0]
        module.tap.clear()
    assert not torch.allclose(g_bp, s1, atol=1e-4)
