"""Associated Learning, sequential (bench/algorithms/associated.py, bench/models/associated.py) and
the class-distance metrics (bench/metrics/class_distance.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.config import compose
from bench.metrics.class_distance import class_distances
from bench.models import MODELS

TOY = ["algorithm.name=al", "model.name=al_mlp", "model.width=6", "model.bridge=10", "data.name=synthetic",
       "data.shape=[5]", "data.num_classes=3", "data.n_train=64", "data.n_test=16", "data.val_size=16",
       "data.batch_size=8", "probe.every=0", "output.progress=none"]


def toy_module(*extra):
    from bench.algorithms import RULES

    cfg = compose(overrides=[*TOY, *extra])
    torch.manual_seed(0)
    model = MODELS.get("al_mlp")(input_shape=(5,), num_classes=3, components=int(cfg.model.components),
                                 width=6, bridge=10)
    return RULES.get("al")(cfg, model, 3, (5,)), model


@pytest.mark.parametrize("K", [2, 3])
def test_component_isolation_gradient_masks(K):
    """Each loss of each component reaches exactly its own parameters: A_i → f_i, b_i; E_i → g_i, h_i."""
    torch.manual_seed(1)
    net = MODELS.get("al_mlp")(input_shape=(5,), num_classes=3, components=K, width=6, bridge=10)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    s, t = x, F.one_hot(y, 3).float()
    losses = []
    for i in range(K):
        s, t, a, e = net.component_losses(i, s, t)
        losses += [(i, "assoc", a), (i, "ae", e)]
    names = dict(net.named_parameters())
    for i, kind, loss in losses:
        grads = torch.autograd.grad(loss, list(names.values()), retain_graph=True, allow_unused=True)
        own = ("f", "b") if kind == "assoc" else ("g", "h")
        for (name, _), g in zip(names.items(), grads):
            part, comp = name.split(".")[0], int(name.split(".")[1])
            mine = comp == i and part in own
            nonzero = g is not None and g.abs().sum().item() > 0
            assert nonzero == mine, f"{kind} loss of component {i}: {name} {'lacks' if mine else 'gets'} a gradient"
    # and the rule's surrogate delivers the sum of these, so every parameter gets its own loss's gradient
    module, model = toy_module(f"model.components={K}")
    module.objective(x, y)[0].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_inference_equals_eq8_by_hand():
    """ŷ = h_1(h_2(b_2(f_2(f_1(x))))) on a 2-component toy, written out with the raw weights."""
    torch.manual_seed(2)
    net = MODELS.get("al_mlp")(input_shape=(4,), num_classes=3, components=2, width=5, bridge=7)
    x = torch.randn(6, 4)
    W = {n: p.detach() for n, p in net.named_parameters()}

    def lin(z, name):
        return z @ W[f"{name}.weight"].T + W[f"{name}.bias"]

    s1 = F.elu(lin(x, "f.0.1"))
    s2 = F.elu(lin(s1, "f.1.0"))
    t2 = torch.sigmoid(lin(torch.sigmoid(lin(s2, "b.1.1")), "b.1.3"))
    t1 = torch.sigmoid(lin(t2, "h.1.0"))
    y_hat = torch.sigmoid(lin(t1, "h.0.0"))
    assert torch.allclose(net(x), y_hat, atol=1e-6)
    # b_1 and the g's are not on the inference path: changing them changes nothing
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.startswith(("g.", "b.0.")):
                p.add_(1.0)
    assert torch.allclose(net(x), y_hat, atol=1e-6)
    eff = set(net.effective_names())
    assert eff == {n for n in W if n.startswith(("f.", "h.", "b.1."))}
    assert set(net.affiliated_names()) == {n for n in W if n.startswith(("g.", "b.0."))}


@pytest.mark.parametrize("arch,shape", [("al_mlp", (1, 28, 28)), ("al_cnn", (1, 28, 28)), ("al_resnet20", (3, 32, 32)),
                                        ("al_resnet32", (3, 32, 32)), ("al_vgg", (3, 32, 32))])
def test_bp_twin_has_the_effective_parameter_count(arch, shape):
    torch.manual_seed(0)
    al = MODELS.get(arch)(input_shape=shape, num_classes=10)
    twin = MODELS.get(arch + "_bp")(input_shape=shape, num_classes=10)
    params = dict(al.named_parameters())
    effective = sum(params[n].numel() for n in al.effective_names())
    assert effective == sum(p.numel() for p in twin.parameters())
    assert sum(params[n].numel() for n in al.affiliated_names()) > 0
    x = torch.zeros(2, *shape)
    assert al(x).shape == twin(x).shape == (2, 10)
    if arch == "al_mlp":  # paper §5.2: 1024-1024-5120-1024-1024-10
        assert effective == (784 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 5120 + 5120) + (5120 * 1024 + 1024) \
            + (1024 * 1024 + 1024) + (1024 * 10 + 10)


def test_one_step_moves_only_by_the_rule_and_lr_groups():
    """Adam with two groups: g/h at 2× the forward lr (the authors' inv_learning_rate)."""
    module, model = toy_module("algorithm.lr=0.01")
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([0.01, 0.02])
    fwd = {id(p) for p in opt.param_groups[0]["params"]}
    assert fwd == {id(p) for n, p in model.named_parameters() if n.startswith(("f.", "b."))}


def test_milestone_gammas_schedule():
    from bench.algorithms.associated import MilestoneFactors

    f = MilestoneFactors([80, 120, 160, 180], [0.1, 0.1, 0.1, 0.5])
    assert [f(e) for e in (0, 79, 80, 120, 160, 180)] == pytest.approx([1, 1, 0.1, 0.01, 0.001, 0.0005])


def test_al_refuses_other_models_in_one_line():
    from bench.options import ConfigError

    with pytest.raises(ConfigError) as err:
        compose(overrides=["algorithm.name=al", "model.name=mlp"])
    assert "\n" not in str(err.value) and "al_mlp" in str(err.value)
    with pytest.raises(ConfigError):
        compose(overrides=["algorithm.name=bp", "trainer.pipeline=pipelined"])


def test_class_distances_by_hand_on_six_points():
    """Class 0: (0,0), (3,0), (0,4); class 1: (10,0), (10,2), (12,0)."""
    z = torch.tensor([[0., 0.], [3., 0.], [0., 4.], [10., 0.], [10., 2.], [12., 0.]])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    intra0 = (3 + 4 + 5) / 3
    intra1 = (2 + 2 + math.sqrt(8)) / 3
    c0, c1 = (1.0, 4 / 3), (32 / 3, 2 / 3)
    inter = math.dist(c0, c1)
    d = class_distances(z, y)
    assert d["intra"] == pytest.approx((intra0 + intra1) / 2, abs=1e-12)
    assert d["inter"] == pytest.approx(inter, abs=1e-12)
    assert d["ratio"] == pytest.approx(inter / ((intra0 + intra1) / 2), abs=1e-12)
