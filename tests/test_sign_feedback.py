"""The sfa family (uSF Init/SN, sign symmetry, Const, E/I, Batch Manhattan, BP+Noise,
BP+Alignment) of bench/algorithms/sign_feedback.py, against hand computations.

Hand computations use plain tensor ops on values that do not require grad. ``step`` mimics
``AlgorithmModule.training_step`` hook for hook (Lightning calls the same hooks in the same
order; ``test_kp_through_lightning`` and ``test_bp_noise_through_lightning`` check that).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.algorithms import RULES
from bench.config import compose
from bench.feedback.replaced import FeedbackLayer
from bench.models import create_model
from bench.results.io import read_csv
from bench.run.train import train
from conftest import angle, fixed, one_run_dir

# Tiny nets (ResNet-18 at batch 2): one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def build(small_cfg, rule, *overrides, shape=(3,), classes=2, depth=1, width=4, model=None):
    data = [f"algorithm.name={rule}", f"data.shape=[{','.join(map(str, shape))}]", f"data.num_classes={classes}"]
    if model is None:  # the small MLP of conftest, resized
        cfg = small_cfg(*data, f"model.depth={depth}", f"model.width={width}", *overrides)
    else:  # another zoo model: its own keys only (the small config's model.depth/width are MLP keys)
        cfg = compose(overrides=["data.name=synthetic", "probe.every=0", *data, f"model.name={model}", *overrides])
    torch.manual_seed(0)
    model = create_model(cfg.model, tuple(shape), classes)
    return RULES.get(rule)(cfg, model, classes, tuple(shape))


def step(module, opt, x, y):
    """One training step, hook for hook as AlgorithmModule.training_step under Lightning."""
    opt.zero_grad(set_to_none=True)
    surrogate, logits, loss = module.objective(x, y)
    surrogate.backward()
    module.on_after_backward()
    module.on_before_optimizer_step(opt)
    opt.step()
    module.after_step()
    return loss.detach()


def weights(module):
    return [p for p in module.model.parameters() if p.ndim >= 2]


# ----------------------------------------------------------------------------- uSF / SS: B by hand

def hand_feedback(rule, W, B0):
    if rule == "usf_init":   # sfa Eq. 4
        return B0.abs() * torch.sign(W)
    if rule == "usf_sn":     # sfa Eq. 5
        s = torch.sign(W)
        return W.norm() * s / s.norm()
    return torch.sign(W)     # sign symmetry


@pytest.mark.parametrize("rule", ["usf_init", "usf_sn", "ss"])
def test_sign_feedback_B_used_in_a_step_equals_hand_computation(small_cfg, rule):
    module = build(small_cfg, rule)
    net = module.model.net  # Flatten, Linear(3→4), Tanh, Linear(4→2)
    l1, l2 = net[1], net[3]
    assert isinstance(l1, FeedbackLayer) and isinstance(l2, FeedbackLayer)
    B0 = {1: fixed(4, 3, scale=0.9, offset=5.0), 2: fixed(2, 4, scale=0.7, offset=2.5)}
    x = torch.tensor([[0.2, -0.4, 1.0], [1.5, 0.3, -0.7]])
    y = torch.tensor([1, 0])
    for round_ in range(2):  # the second round flips some weight signs: B must follow
        with torch.no_grad():
            sign_flip = 1.0 if round_ == 0 else torch.sign(fixed(4, 3, offset=9.0))
            # no weight exactly 0 (there Eq. 4 gives 0 and the rule keeps ±|B_0|, see SignFeedback)
            l1.weight.copy_(fixed(4, 3, offset=0.1) * sign_flip), l1.bias.copy_(fixed(4, offset=1.0))
            l2.weight.copy_(fixed(2, 4, offset=2.0) * (1 - 2 * round_)), l2.bias.copy_(fixed(2, offset=3.0))
            if round_ == 0:
                l1.feedback.copy_(B0[1]), l2.feedback.copy_(B0[2])
        W1, W2 = l1.weight.detach().clone(), l2.weight.detach().clone()
        expected1, expected2 = hand_feedback(rule, W1, B0[1]), hand_feedback(rule, W2, B0[2])
        for p in module.model.parameters():
            p.grad = None
        xr = x.clone().requires_grad_(True)
        surrogate, logits, _ = module.objective(xr, y)
        surrogate.backward()
        assert torch.allclose(l1.feedback, expected1, atol=1e-6, rtol=0), round_
        assert torch.allclose(l2.feedback, expected2, atol=1e-6, rtol=0), round_
        assert torch.equal(torch.sign(l2.feedback), torch.sign(W2))
        if rule == "usf_sn":
            assert abs(float(l2.feedback.norm()) - float(W2.norm())) < 1e-6
            assert torch.allclose(l2.feedback.abs(), torch.full_like(W2, float(W2.norm()) / math.sqrt(8)))
        with torch.no_grad():  # the step used exactly these B: hand backward
            H = torch.tanh(x @ W1.T + l1.bias)
            delta = (torch.softmax(H @ W2.T + l2.bias, 1) - F.one_hot(y, 2).float()) / 2
            da1 = (delta @ expected2) * (1 - H ** 2)
        assert torch.allclose(l1.weight.grad, da1.T @ x, atol=1e-6)
        assert torch.allclose(xr.grad, da1 @ expected1, atol=1e-6)
        assert not torch.allclose(l1.weight.grad, ((delta @ W2) * (1 - H ** 2)).T @ x, atol=1e-4)  # not BP


def test_sign_symmetry_is_the_usf_mechanism():
    assert RULES.get("ss") is RULES.get("usf_init") is RULES.get("usf_sn")


# ----------------------------------------------------------------------------- E/I, Const, Manhattan

def signs(ws):
    return [torch.sign(w.detach()).clone() for w in ws]


@pytest.mark.parametrize("rule,extra", [("usf_init", []), ("usf_init", ["algorithm.const_norm=true"]),
                                        ("bp_const", [])], ids=["usf_init", "usf_init+const", "bp_const"])
def test_ei_never_lets_a_frozen_sign_flip(small_cfg, rule, extra):
    x, y = fixed(32, 6, scale=1.5, offset=0.4), torch.arange(32) % 3

    def run(ei: bool):
        module = build(small_cfg, rule, *extra, f"algorithm.ei={str(ei).lower()}", "algorithm.ei_fraction=0.25",
                       "algorithm.ei_epsilon=1e-4", shape=(6,), classes=3, depth=2, width=16)
        module.total_steps = 12  # frozen after ceil(0.25·12) = 3 steps
        opt = torch.optim.SGD(module.model.parameters(), lr=2.0)  # large: signs flip every step
        history = [signs(weights(module))]
        for _ in range(12):
            step(module, opt, x, y)
            history.append(signs(weights(module)))
        return module, history

    module, history = run(ei=True)
    flips = lambda a, b: sum(int((s != t).sum()) for s, t in zip(a, b))  # noqa: E731
    assert flips(history[0], history[3]) > 0  # signs did move before the freeze
    assert bool(module.ei_frozen)
    frozen = history[3]
    assert all(torch.equal(s, f) for s, f in zip(module.ei_signs(), frozen))
    for t in range(4, 13):
        assert flips(frozen, history[t]) == 0, f"a frozen sign flipped at step {t}"
    smallest = min(float(w.detach().abs().min()) for w in weights(module))
    # clipped at ε; Const may then scale a clipped weight by a factor near 1, never to 0
    assert smallest >= (0.5e-4 if any("const_norm=true" in e for e in extra) or rule == "bp_const" else 1e-4 * (1 - 1e-6)), smallest
    _, free = run(ei=False)  # the same updates without E/I do flip signs after step 3
    assert flips(free[3], free[12]) > 0


@pytest.mark.parametrize("rule,extra", [("bp_const", []), ("usf_init", ["algorithm.const_norm=true"]),
                                        ("usf_sn", ["algorithm.const_norm=true"])])
def test_const_keeps_each_layer_norm_at_its_initial_value(small_cfg, rule, extra):
    module = build(small_cfg, rule, *extra, shape=(6,), classes=3, depth=2, width=16)
    w0 = [float(w.detach().norm()) for w in weights(module)]
    opt = torch.optim.Adam(module.model.parameters(), lr=0.05)
    x, y = fixed(32, 6, scale=1.5, offset=0.4), torch.arange(32) % 3
    start = [w.detach().clone() for w in weights(module)]
    for _ in range(5):
        step(module, opt, x, y)
    for w, n0, s in zip(weights(module), w0, start):
        assert abs(float(w.detach().norm()) - n0) <= 1e-6 * n0
        assert (w.detach() - s).abs().max() > 1e-2  # the weights did train
    # without Const the same run changes the norms by far more than the tolerance
    free = build(small_cfg, rule, *extra, "algorithm.const_norm=false", shape=(6,), classes=3, depth=2, width=16)
    opt = torch.optim.Adam(free.model.parameters(), lr=0.05)
    for _ in range(5):
        step(free, opt, x, y)
    assert max(abs(float(w.detach().norm()) - n0) / n0 for w, n0 in zip(weights(free), w0)) > 1e-2


def test_batch_manhattan_update_is_the_sign_of_the_rule_update(small_cfg):
    x, y = fixed(8, 6, scale=1.5), torch.arange(8) % 3
    grads = {}
    for manhattan in (False, True):
        module = build(small_cfg, "usf_init", f"algorithm.manhattan={str(manhattan).lower()}", shape=(6,), classes=3)
        surrogate, _, _ = module.objective(x, y)
        surrogate.backward()
        module.on_after_backward()
        grads[manhattan] = [p.grad.clone() for p in module.model.parameters()]
    for plain, manhattan in zip(grads[False], grads[True]):
        assert torch.equal(manhattan, torch.sign(plain))
        assert plain.abs().max() < 0.9  # so the test can tell sign(g) from g


# ----------------------------------------------------------------------------- BP + Noise, BP + Alignment

def bp_grads(module, x, y):
    params = list(module.model.parameters())
    return torch.autograd.grad(module.loss_fn(module.model(x), y), params)


def test_bp_noise_variance_matches_the_gradient_variance(small_cfg):
    module = build(small_cfg, "bp_noise", shape=(64,), classes=10, depth=1, width=128)
    torch.manual_seed(1)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    true = bp_grads(module, x, y)
    previous = None
    for _ in range(2):
        for p in module.model.parameters():
            p.grad = None
        surrogate, _, _ = module.objective(x, y)
        surrogate.backward()
        module.on_after_backward()
        noises = []
        for p, g in zip(module.model.parameters(), true):
            if g.numel() < 1000:  # biases: too few entries for a 20 % variance check
                continue
            noise = p.grad - g
            ratio = float(noise.var()) / float(g.var())
            assert 0.8 <= ratio <= 1.2, ratio
            assert abs(float(noise.mean())) < 4 * float(noise.std()) / math.sqrt(noise.numel())
            assert 35 < angle(p.grad, g) < 55  # sfa §5.3: ≈ 45°
            noises.append(noise)
        if previous is not None:  # a fresh draw every step
            assert all(angle(a, b) > 60 for a, b in zip(noises, previous))
        previous = noises


def test_bp_alignment_update_is_ce_gradient_plus_pull_towards_V(small_cfg):
    module = build(small_cfg, "bp_align", "algorithm.align_lambda=0.01", shape=(6,), classes=3)
    x, y = fixed(8, 6, scale=1.5), torch.arange(8) % 3
    true = bp_grads(module, x, y)
    surrogate, _, loss = module.objective(x, y)
    surrogate.backward()
    targets = iter(module.align_targets())
    penalty = 0.0
    for p, g in zip(module.model.parameters(), true):
        if p.ndim >= 2:
            v = next(targets)
            assert v.shape == p.shape and float(v.std()) > 0.01
            assert torch.allclose(p.grad, g + 2 * 0.01 * (p.detach() - v), atol=1e-6)
            penalty += float(((p.detach() - v) ** 2).sum())
        else:
            assert torch.allclose(p.grad, g, atol=1e-7)
    assert abs(float(surrogate.detach()) - float(loss.detach()) - 0.01 * penalty) < 1e-5


# ----------------------------------------------------------------------------- initialisation (sfa §5.1)

def test_initialisation_options_have_their_variances():
    from bench.feedback.init import feedback_tensor
    from bench.models.cnn import init_layer

    gen = torch.Generator().manual_seed(0)
    for shape in [(300, 500), (64, 32, 5, 5)]:  # Linear (out, in) and Conv (out, in, k, k)
        receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
        n_out, n_in = shape[0] * receptive, shape[1] * receptive
        expected = {"kaiming": 1.0 / n_out,                  # feedback variance 1/n_out (sfa §5.1)
                    "xavier": 2.0 / (n_in + n_out),          # Glorot
                    "gaussian": 0.05 ** 2, "uniform": 0.05 ** 2}
        for init, var in expected.items():
            b = feedback_tensor(shape, init, 0.05, gen)
            assert b.shape == shape and abs(float(b.var()) / var - 1) < 0.03, (shape, init, float(b.var()), var)
            assert abs(float(b.mean())) < 4 * math.sqrt(var / b.numel())
        assert float(feedback_tensor(shape, "uniform", 0.05, gen).abs().max()) <= math.sqrt(3) * 0.05
        layer = torch.nn.Linear(shape[1], shape[0]) if len(shape) == 2 else torch.nn.Conv2d(shape[1], shape[0], shape[2])
        forward = {"lecun": 1.0 / n_in,                      # forward variance 1/n_in (sfa §5.1)
                   "xavier": 2.0 / (n_in + n_out), "gaussian": 0.05 ** 2}
        for init, var in forward.items():
            torch.manual_seed(1)
            init_layer(layer, init, 0.05)
            assert abs(float(layer.weight.var()) / var - 1) < 0.03, (shape, init)
            assert float(layer.bias.abs().max()) == 0.0


# ----------------------------------------------------------------------------- through Lightning

def test_bp_noise_through_lightning_probe_sees_the_noisy_update(small_cfg, tmp_path):
    cfg = small_cfg("algorithm.name=bp_noise", "probe.every=1", "trainer.max_steps=2", "model.width=32")
    assert train(cfg)["status"] == "finished"
    rows = read_csv(one_run_dir(tmp_path / "runs") / "probe.csv")
    angles = [float(v) for r in rows for k, v in r.items() if k.startswith("align/update/net.3")]
    assert len(angles) == 2 and all(30 < a < 60 for a in angles), angles  # 32×32 = 1024 entries
