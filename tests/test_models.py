"""Model zoo: shapes, feedback points, converted layers and parameter counts.

Every registered model is tested through ``MODELS.names()``: a new model gets these tests by
registering itself. Give it a small configuration in ``SMALL`` (a model without one is built
with no options on a 3×32×32 input and 10 classes).
"""
from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch import nn

from bench.models import MODELS, create_model, point_sizes
from bench.models.base import count_params


def convertible(model: nn.Module) -> list[str]:
    """The layers a replaced-backward rule converts: convert_to_feedback's report on a copy, in
    module order."""
    from bench.feedback.replaced import convert_to_feedback

    order = [n for n, _ in model.named_modules()]
    return sorted(convert_to_feedback(copy.deepcopy(model)), key=order.index)

# name -> list of (variant id, input_shape, num_classes, options); small enough for 2 CPU cores.
SMALL: dict[str, list[tuple[str, tuple[int, ...], int, dict]]] = {
    "mlp": [("bn-dropout", (1, 4, 4), 3, dict(depth=2, width=5, batchnorm=True, dropout=0.1))],
    "cnn": [
        ("default", (3, 16, 16), 10, {}),
        ("bn-nopool-hidden", (1, 8, 8), 4,
         dict(channels=[4, 6], kernel=[3, 5], stride=[1, 2], batchnorm=True, pool="none", conv_dropout=0.1,
              hidden=[7], dropout=0.2, activation="leaky_relu", init="lecun")),
    ],
    "sfa_mnist": [("mnist", (1, 28, 28), 10, {})],
    "alexnet": [
        ("cifar", (3, 32, 32), 100, dict(cifar=True, fc_width=64)),
        ("torchvision-gray", (1, 64, 64), 10, {}),  # 63×63 is torchvision AlexNet's minimum input
    ],
    "timm:resnet18": [
        ("cifar-stem", (3, 32, 32), 10, dict(cifar_stem=True)),
        ("imagenet-stem", (3, 64, 64), 10, {}),
    ],
    "timm:vgg16": [
        ("cifar", (3, 32, 32), 100, dict(cifar_stem=True, head_width=32)),
        ("cifar-bn-gray", (1, 32, 32), 10, dict(cifar_stem=True, head_width=16, batchnorm=True)),
    ],
    "transformer": [("tiny", (8,), 11, dict(n_layer=2, n_head=2, n_embd=16))],
}

# points per model and granularity, by hand
N_POINTS = {
    "mlp": {"micro": 2, "macro": 2},
    "cnn": {"micro": 3, "macro": 3},
    "sfa_mnist": {"micro": 3, "macro": 3},
    "alexnet": {"micro": 7, "macro": 4},  # 5 conv + 2 fc ReLUs; 3 conv stages + fc block
    "timm:resnet18": {"micro": 17, "macro": 8},  # stem + 2 per block; 8 BasicBlocks
    "timm:vgg16": {"micro": 15, "macro": 6},  # 13 conv + 2 fc ReLUs; 5 stages + fc block
    "transformer": {"micro": 6, "macro": 2},  # 3 per block
}

# number of Linear/Conv2d layers, by hand
N_CONVERTIBLE = {
    "mlp": 3,
    "cnn": 4,  # 3 conv + classifier
    "sfa_mnist": 4,  # conv, conv, dense, classifier
    "alexnet": 8,  # 5 conv + 3 fc
    "timm:resnet18": 21,  # stem + 16 block convs + 3 downsample 1×1 convs + fc
    "timm:vgg16": 16,  # the "16" of VGG-16: 13 conv + 3 fc
    "transformer": 9,  # (c_attn, attn.c_proj, c_fc, mlp.c_proj) × 2 + lm_head
}


def cases():
    out = []
    for name in MODELS.names():
        for variant, shape, ncls, opts in SMALL.get(name, [("default", (3, 32, 32), 10, {})]):
            out.append(pytest.param(name, shape, ncls, opts, id=f"{name}-{variant}"))
    return out


@functools.lru_cache(maxsize=None)
def _build(name, shape, ncls, opts_items):
    torch.manual_seed(0)
    return MODELS.get(name)(input_shape=shape, num_classes=ncls, **dict(opts_items))


def build(name, shape, ncls, opts):
    model = _build(name, shape, ncls, tuple(sorted((k, _freeze(v)) for k, v in opts.items())))
    model.eval()
    return model


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


def batch(name, shape, ncls, b=2):
    g = torch.Generator().manual_seed(1)
    if name == "transformer":
        return torch.randint(0, ncls, (b, *shape), generator=g)
    return torch.randn((b, *shape), generator=g)


def run_with_hooks(model, x, names):
    """Forward once; return (names in call order, outputs by name)."""
    modules = dict(model.named_modules())
    calls, outputs = [], {}

    def hook(name):
        def fn(module, inputs, output):
            calls.append(name)
            outputs[name] = output

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    return y, calls, outputs


CASES = cases()


def test_zoo_models_are_registered():
    assert set(SMALL) <= set(MODELS.names())


@pytest.mark.parametrize("name,shape,ncls,opts", CASES)
def test_output_shape(name, shape, ncls, opts):
    model = build(name, shape, ncls, opts)
    y = model(batch(name, shape, ncls, b=3))
    expected = (3, shape[0], ncls) if name == "transformer" else (3, ncls)
    assert tuple(y.shape) == expected
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("granularity", ["micro", "macro"])
@pytest.mark.parametrize("name,shape,ncls,opts", CASES)
def test_points_called_once_in_forward_order(name, shape, ncls, opts, granularity):
    model = build(name, shape, ncls, opts)
    points = model.feedback_points(granularity)
    if name in N_POINTS:
        assert len(points) == N_POINTS[name][granularity]
    assert len(set(points)) == len(points)
    modules = dict(model.named_modules())
    assert all(p in modules for p in points), [p for p in points if p not in modules]
    _, calls, _ = run_with_hooks(model, batch(name, shape, ncls), points)
    assert calls == points  # each exactly once, in forward order


@pytest.mark.parametrize("name,shape,ncls,opts", CASES)
def test_output_layer_is_not_a_point(name, shape, ncls, opts):
    model = build(name, shape, ncls, opts)
    layers = convertible(model)
    _, calls, _ = run_with_hooks(model, batch(name, shape, ncls), layers)
    output_layer = calls[-1]  # the last Linear/Conv called produces the logits
    for g in ("micro", "macro"):
        for p in model.feedback_points(g):
            assert output_layer != p and not output_layer.startswith(p + ".")


@pytest.mark.parametrize("name,shape,ncls,opts", CASES)
def test_no_inplace_at_points(name, shape, ncls, opts):
    model = build(name, shape, ncls, opts)
    points = model.feedback_points("micro") + model.feedback_points("macro")
    modules = dict(model.named_modules())
    assert [p for p in points if getattr(modules[p], "inplace", False)] == []
    # No op after a point writes into its output: the tensor version is unchanged after forward.
    versions = {}
    handles = [
        modules[p].register_forward_hook(lambda m, i, o, p=p: versions.__setitem__(p, (o, o._version)))
        for p in set(points)
    ]
    try:
        model(batch(name, shape, ncls))
    finally:
        for h in handles:
            h.remove()
    assert {p: o._version - v for p, (o, v) in versions.items() if o._version != v} == {}


@pytest.mark.parametrize("granularity", ["micro", "macro"])
@pytest.mark.parametrize("name,shape,ncls,opts", CASES)
def test_replacing_point_outputs_with_detached_copies_keeps_the_forward(name, shape, ncls, opts, granularity):
    """What direct-projection rules do: the hook returns a detached copy; logits must not change."""
    model = build(name, shape, ncls, opts)
    x = batch(name, shape, ncls)
    with torch.no_grad():
        ref = model(x)
    modules = dict(model.named_modules())
    handles = [modules[p].register_forward_hook(lambda m, i, o: o.detach().clone())
               for p in model.feedback_points(granularity)]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name,shape,ncls,opts", CASES)
def test_converted_layers_are_the_linear_conv_and_lc_layers(name, shape, ncls, opts):
    model = build(name, shape, ncls, opts)
    from bench.models.locally_connected import LocallyConnected2d

    expected = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d, LocallyConnected2d)]
    assert convertible(model) == expected
    if name in N_CONVERTIBLE:
        assert len(expected) == N_CONVERTIBLE[name]


def test_converted_layers_named_by_hand():
    assert convertible(build("sfa_mnist", (1, 28, 28), 10, {})) == [
        "features.0.conv", "features.1.conv", "hidden.0.fc", "classifier"]
    assert convertible(build("transformer", (8,), 11, dict(n_layer=2, n_head=2, n_embd=16))) == [
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ] + ["lm_head"]


def test_point_sizes_mlp_by_hand():
    # Flatten, [Linear, BN, act, Dropout] × 2, Linear: the activations are net.3 and net.7.
    model = build("mlp", (1, 4, 4), 3, dict(depth=2, width=5, batchnorm=True, dropout=0.1))
    assert point_sizes(model, (1, 4, 4), "micro") == {"net.3": 5, "net.7": 5}
    assert point_sizes(model, (1, 4, 4), "macro") == {"net.3": 5, "net.7": 5}


def test_sfa_mnist_by_hand():
    """sfa Table 2, MNIST column, with "same" 5×5 convs at 28×28."""
    model = build("sfa_mnist", (1, 28, 28), 10, {})
    assert point_sizes(model, (1, 28, 28), "micro") == {
        "features.0.act": 32 * 28 * 28, "features.1.act": 64 * 14 * 14, "hidden.0.act": 1024}
    assert point_sizes(model, (1, 28, 28), "macro") == {
        "features.0.pool": 32 * 14 * 14, "features.1.pool": 64 * 7 * 7, "hidden.0.act": 1024}
    by_hand = (32 * 1 * 25 + 32) + (64 * 32 * 25 + 64) + (64 * 7 * 7 * 1024 + 1024) + (1024 * 10 + 10)
    assert count_params(model) == by_hand == 3_274_634
    assert model.hidden[0].drop.p == 0.5  # dropout after the dense layer (sfa §7.1)
    assert isinstance(model.hidden[0].act, nn.ReLU) and isinstance(model.features[1].pool, nn.MaxPool2d)


def test_transformer_point_sizes_and_causality():
    model = build("transformer", (8,), 11, dict(n_layer=2, n_head=2, n_embd=16))
    assert point_sizes(model, (8,), "micro") == {
        # per token: one row of e per position of the sequence
        "blocks.0.ln_2": 16, "blocks.0.mlp.act": 64, "blocks.0": 16,
        "blocks.1.ln_2": 16, "blocks.1.mlp.act": 64, "blocks.1": 16}
    x = batch("transformer", (8,), 11)
    x2 = x.clone()
    x2[:, 5] = (x2[:, 5] + 1) % 11
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    torch.testing.assert_close(y[:, :5], y2[:, :5], rtol=0, atol=0)  # the past ignores the future
    assert (y[:, 5:] - y2[:, 5:]).abs().amax() > 1e-4
    assert model.input_dtype == torch.long
    # shorter sequences than block_size are fine
    assert tuple(model(x[:, :3]).shape) == (2, 3, 11)


def test_resnet18_cifar_stem_parameter_count():
    model = MODELS.get("timm:resnet18")(input_shape=(3, 32, 32), num_classes=10, cifar_stem=True)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=10)
    # only conv1 differs: 7×7×3×64 -> 3×3×3×64 (both bias-free); the max-pool has no parameters
    assert count_params(model) == count_params(reference) - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64
    # independently: the usual CIFAR ResNet-18 (kuangliu/pytorch-cifar) has 11,173,962
    conv = lambda cin, cout, k: cin * cout * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(3, 64, 3) + bn(64)
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for b in range(2):
            total += conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
            if b == 0 and (stride != 1 or cin != cout):
                total += conv(cin, cout, 1) + bn(cout)
            cin = cout
    total += 512 * 10 + 10
    assert count_params(model) == total == 11_173_962
    assert model.net.conv1.kernel_size == (3, 3) and model.net.conv1.stride == (1, 1)
    assert isinstance(model.net.maxpool, nn.Identity)


def test_vgg16_cifar_head_parameter_count():
    model = MODELS.get("timm:vgg16")(input_shape=(3, 32, 32), num_classes=10, cifar_stem=True)
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(cin * cout * 9 + cout for cin, cout in zip([3] + widths[:-1], widths))
    assert convs == 14_714_688  # the well-known VGG-16 conv-stack size
    head = 2 * (512 * 512 + 512) + 512 * 10 + 10
    assert count_params(model) == convs + head == 15_245_130


def test_alexnet_cifar_parameter_count():
    model = MODELS.get("alexnet")(input_shape=(3, 32, 32), num_classes=10, cifar=True)
    convs = (3 * 64 * 9 + 64) + (64 * 192 * 9 + 192) + (192 * 384 * 9 + 384) + (384 * 256 * 9 + 256) \
        + (256 * 256 * 9 + 256)
    fcs = (256 * 2 * 2 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
    assert count_params(model) == convs + fcs == 23_272_266


def test_create_model_from_omegaconf():
    cfg = OmegaConf.create({"name": "cnn", "channels": [4, 8], "kernel": 3, "hidden": [6], "dropout": 0.5})
    model = create_model(cfg, (3, 12, 12), 5)
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [4, 8]
    assert tuple(model(torch.zeros(2, 3, 12, 12)).shape) == (2, 5)
    assert point_sizes(model, (3, 12, 12), "macro") == {"features.0.pool": 4 * 6 * 6, "features.1.pool": 8 * 3 * 3,
                                                         "hidden.0.act": 6}


def test_cnn_rejects_bad_options():
    with pytest.raises(ValueError, match="pool"):
        MODELS.get("cnn")(input_shape=(3, 8, 8), num_classes=2, pool="median")
    with pytest.raises(ValueError, match="kernel"):
        MODELS.get("cnn")(input_shape=(3, 8, 8), num_classes=2, channels=[4, 4], kernel=[3])


@pytest.mark.slow
@pytest.mark.parametrize("name,shape,opts", [
    ("timm:vgg16", (3, 32, 32), {}),  # timm's own 7×7 ConvMlp head, upsampling the 1×1 features
    ("alexnet", (3, 224, 224), {}),  # torchvision AlexNet at its ImageNet size
])
def test_imagenet_size_variants(name, shape, opts):
    model = MODELS.get(name)(input_shape=shape, num_classes=10, **opts).eval()
    x = torch.randn(2, *shape)
    for g in ("micro", "macro"):
        points = model.feedback_points(g)
        assert len(points) == N_POINTS[name][g]
        y, calls, _ = run_with_hooks(model, x, points)
        assert calls == points and tuple(y.shape) == (2, 10)
    assert len(convertible(model)) == N_CONVERTIBLE[name]
