"""DenseFA (bench/algorithms/dense_feedback.py): fixed feedback from every downstream layer,
against a hand computation; refusals of branching and oversized models. ``build`` is the sfa
family's (tests/test_sign_feedback.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.feedback.replaced import FeedbackLayer
from conftest import fixed
from test_sign_feedback import build

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets: one torch thread (conftest)


def test_dense_fa_update_equals_hand_computation_with_skips_from_every_downstream_layer(small_cfg):
    # Flatten, Linear(3→4) net.1, Tanh net.2, Linear(4→4) net.3, Tanh net.4, Linear(4→4) net.5, Tanh net.6,
    # Linear(4→2) net.7. Skips: net.5 → h1 (net.2); net.7 → h1, h2. Adjacent paths use FA's B.
    module = build(small_cfg, "dense_fa", shape=(3,), classes=2, depth=3, width=4)
    net = module.model.net
    l1, l2, l3, l4 = net[1], net[3], net[5], net[7]
    assert all(isinstance(l, FeedbackLayer) for l in (l1, l2, l3, l4))
    assert [s.sizes for s in module.skips] == [[4], [4, 4]] and [s.error_size for s in module.skips] == [4, 2]
    C31, C41, C42 = module.skip_matrix("net.5", 0), module.skip_matrix("net.7", 0), module.skip_matrix("net.7", 1)
    # Launay's normalisation with the source size as e: U/√(l_i·l_k), U the stored N(0, 1) draw
    assert torch.allclose(C31, module.skips[0].matrix[:4] / math.sqrt(4 * 4))
    assert torch.allclose(C42, module.skips[1].matrix[:4] / math.sqrt(4 * 2)) and C42.shape == (4, 2)
    with torch.no_grad():
        for i, l in enumerate((l1, l2, l3, l4)):
            l.weight.copy_(fixed(*l.weight.shape, offset=0.3 + i)), l.bias.copy_(fixed(l.weight.shape[0], offset=2.0 + i))
            l.feedback.copy_(fixed(*l.weight.shape, scale=0.8, offset=7.0 + i))
    W = [l.weight.detach().clone() for l in (l1, l2, l3, l4)]
    B = [l.feedback.detach().clone() for l in (l1, l2, l3, l4)]
    x = torch.tensor([[0.2, -0.4, 1.0], [1.5, 0.3, -0.7]])
    y = torch.tensor([1, 0])
    surrogate, _, loss = module.objective(x, y)
    surrogate.backward()
    with torch.no_grad():
        h1 = torch.tanh(x @ W[0].T + l1.bias)
        h2 = torch.tanh(h1 @ W[1].T + l2.bias)
        h3 = torch.tanh(h2 @ W[2].T + l3.bias)
        e = (torch.softmax(h3 @ W[3].T + l4.bias, 1) - F.one_hot(y, 2).float()) / 2
        da3 = (e @ B[3]) * (1 - h3 ** 2)
        da2 = (da3 @ B[2] + e @ C42.T) * (1 - h2 ** 2)
        da1 = (da2 @ B[1] + da3 @ C31.T + e @ C41.T) * (1 - h1 ** 2)
        fa_da1 = (((e @ B[3]) * (1 - h3 ** 2) @ B[2]) * (1 - h2 ** 2) @ B[1]) * (1 - h1 ** 2)
    for layer, delta, inp in ((l4, e, h3), (l3, da3, h2), (l2, da2, h1), (l1, da1, x)):
        assert torch.allclose(layer.weight.grad, delta.T @ inp, atol=1e-6)
        assert torch.allclose(layer.bias.grad, delta.sum(0), atol=1e-6)
    assert not torch.allclose(l1.weight.grad, fa_da1.T @ x, atol=1e-4)  # the skips matter
    # true_gradient switches every skip and B off: plain backprop on the same weights
    for p in module.model.parameters():
        p.grad = None
    with module.true_gradient():
        surrogate, _, _ = module.objective(x, y)
        surrogate.backward()
    with torch.no_grad():
        bp3 = (e @ W[3]) * (1 - h3 ** 2)
        bp1 = (((bp3 @ W[2]) * (1 - h2 ** 2)) @ W[1]) * (1 - h1 ** 2)
    assert torch.allclose(l1.weight.grad, bp1.T @ x, atol=1e-6)


def test_dense_fa_refuses_branching_and_oversized_models(small_cfg):
    from bench.config import ConfigError

    with pytest.raises(ConfigError, match="needs a chain of layers.*branches.*downsample"):
        build(small_cfg, "dense_fa", "model.cifar_stem=true", shape=(3, 32, 32), classes=10, model="timm:resnet18")
    with pytest.raises(ConfigError, match=r"need \d+ MB > algorithm.max_feedback_mb=1"):
        build(small_cfg, "dense_fa", "algorithm.max_feedback_mb=1", shape=(1, 28, 28), classes=10, model="sfa_mnist")
