"""The sfa family (uSF Init/SN, sign symmetry, Const, E/I, Batch Manhattan, BP+Noise,
BP+Alignment) and learned feedback (Kolen–Pollack, weight mirrors), against hand computations.

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
from conftest import angle, fixed, load_state, one_run_dir

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These nets are tiny (ResNet-18 at batch 2): on a shared 2-core machine two intra-op threads
    # made a ResNet-18 step ~10× slower (6 s vs 0.6 s) than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# ----------------------------------------------------------------------------- KP, weight mirrors

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


def test_bp_noise_through_lightning_probe_sees_the_noisy_update(small_cfg, tmp_path):
    cfg = small_cfg("algorithm.name=bp_noise", "probe.every=1", "trainer.max_steps=2", "model.width=32")
    assert train(cfg)["status"] == "finished"
    rows = read_csv(one_run_dir(tmp_path / "runs") / "probe.csv")
    angles = [float(v) for r in rows for k, v in r.items() if k.startswith("align/update/net.3")]
    assert len(angles) == 2 and all(30 < a < 60 for a in angles), angles  # 32×32 = 1024 entries


# ----------------------------------------------------------------------------- DenseFA

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
