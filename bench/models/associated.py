"""Folded architectures of Associated Learning, and their backprop twins.

Kao & Chen, *Associated Learning: Decomposing End-to-end Backpropagation Based on Autoencoders and
Target Propagation*, Neural Computation 2021, arXiv:1906.05560 (§4, §5.1), and the authors' public
TensorFlow code (github.com/SamYWK/Associated_Learning, ``*/models.py``).

A folded network has K components. Component i holds

* f_i, the associated function (ELU layers of the forward path): s_i = f_i(s_{i−1}), s_0 = x;
* b_i, the bridge: pool (lower components of a conv net only) → flatten → Linear(·, bridge) →
  sigmoid → Linear(bridge, n) → sigmoid (the authors' ``al_loss``: Dense(5n) → Dense(n));
* g_i, the encoder: t_i = sigmoid(Linear(t_{i−1})), t_0 = the one-hot label;
* h_i, the decoder: h_i(t_i) = sigmoid(Linear(t_i)) ≈ t_{i−1} (h_1 outputs the C class scores).

``forward`` is the inference function (Eq. 8): ŷ = h_1 ∘ … ∘ h_K ∘ b_K ∘ f_K ∘ … ∘ f_1 (x).
Effective parameters are the f's, the h's and b_K; the g's and b_1 … b_{K−1} are affiliated
(:meth:`FoldedNet.effective_names`, :meth:`FoldedNet.affiliated_names`).

Each architecture is registered twice: ``al_<arch>`` (the folded net the ``al`` rule trains) and
``al_<arch>_bp``, its backprop twin: exactly the layers of the inference path (f's, top bridge,
h's, same shapes, hence the same effective parameter count), with the twin's hidden activation
(ELU) instead of the sigmoids and the last layer left linear (logits for cross-entropy). §5.1
gives BP's baselines extra layers so that both have identical parameter counts; the twin is that
network by construction.

Feedback points (micro and macro) are the components' outputs s_1 … s_K (and, for the twin,
the top bridge and hidden decoder outputs as well, so other rules see every hidden layer).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.activations import make_activation
from bench.models.base import MODELS, ZooModel
from bench.models.structure import Block, OpaqueBlock, Stage, Step, Structure, role_of, typed_steps
from bench.options import ACTIVATIONS, ClassVar, Literal, ModelOptions, opt


def he_normal_(module: nn.Module) -> None:
    """He-normal weights, zero biases (§5.1; the authors' ``he_normal`` initializer)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class FoldedNet(ZooModel):
    """K components (f_i, b_i, g_i, h_i); see the module docstring. Built by the architecture
    classes below from a list of f modules and the shape of each s_i.

    ``twin=True`` builds the backprop twin: only f's, the top bridge and the h's, with
    ``twin_activation`` in the bridge and hidden decoders and a linear last layer.
    """

    def __init__(self, fs: list[nn.Module], s_shapes: list[tuple[int, ...]], num_classes: int, width: int,
                 bridge: int, bridge_pool: int = 4, twin: bool = False, twin_activation: str = "elu"):
        super().__init__()
        K = len(fs)
        self.K, self.num_classes, self.twin = K, int(num_classes), bool(twin)
        self.f = nn.ModuleList(fs)
        act = (lambda: make_activation(twin_activation)) if twin else nn.Sigmoid
        bridges = []
        for i, shape in enumerate(s_shapes):
            if twin and i < K - 1:
                continue
            pre: list[nn.Module] = []
            if len(shape) == 3 and i < K - 1 and shape[1] > bridge_pool:
                # lower (affiliated) bridges of a conv net see the map pooled to bridge_pool²
                pre.append(nn.AdaptiveAvgPool2d(bridge_pool))
                shape = (shape[0], bridge_pool, bridge_pool)
            bridges.append(nn.Sequential(*pre, nn.Flatten(), nn.Linear(math.prod(shape), bridge), act(),
                                         nn.Linear(bridge, width), act()))
        self.b = nn.ModuleList(bridges)  # twin: only b_K, at index 0
        if not twin:
            self.g = nn.ModuleList([nn.Sequential(nn.Linear(num_classes if i == 0 else width, width), nn.Sigmoid())
                                    for i in range(K)])
        hs = []
        for i in range(K):
            out = num_classes if i == 0 else width
            last = twin and i == 0
            hs.append(nn.Sequential(nn.Linear(width, out), *([] if last else [act()])))
        self.h = nn.ModuleList(hs)
        for part in (self.b, self.h, *([] if twin else [self.g])):
            he_normal_(part)
        points = [f"f.{i}" for i in range(K)]
        if twin:
            points += ["b.0"] + [f"h.{i}" for i in range(K - 1, 0, -1)]
        self._points = {"micro": points, "macro": points}

    # ------------------------------------------------------------------ inference (Eq. 8)
    def top(self, s: torch.Tensor) -> torch.Tensor:
        """b_K(s_K)."""
        return self.b[-1](s)

    def decode(self, t: torch.Tensor) -> torch.Tensor:
        """h_1 ∘ … ∘ h_K (t)."""
        for i in range(self.K - 1, -1, -1):
            t = self.h[i](t)
        return t

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """s_K = f_K ∘ … ∘ f_1 (x)."""
        for f in self.f:
            x = f(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.top(self.encode(x)))

    def structure(self) -> Structure:
        """The inference path (Eq. 8): stage ``f`` (the encoders f_1…f_K, each run as its module,
        its leaf layers listed), stage ``b`` (the top bridge b_K), stage ``h`` (decoders h_K…h_2);
        head h_1. The lower bridges and the g's train only: they are ``aside``."""
        kinds = (nn.Linear, nn.Conv2d)

        def opaque(name: str, module: nn.Module) -> OpaqueBlock:
            leaves = [Step(f"{name}.{n}", role_of(m, kinds), m) for n, m in module.named_modules()
                      if n and not any(True for _ in m.children())]
            return OpaqueBlock(name, leaves, module=module)

        top = len(self.b) - 1
        decoders = [Block(f"h.{i}", typed_steps(f"h.{i}", self.h[i], kinds)) for i in range(self.K - 1, -1, -1)]
        stages = [Stage("f", [opaque(f"f.{i}", f) for i, f in enumerate(self.f)]),
                  Stage("b", [opaque(f"b.{top}", self.b[top])]), Stage("h", decoders[:-1])]
        aside = [opaque(f"b.{i}", b) for i, b in enumerate(self.b) if i != top]
        aside += [opaque(f"g.{i}", g) for i, g in enumerate(getattr(self, "g", ()))]
        return Structure(pre=[], stages=stages, head=decoders[-1], points=dict(self._points), aside=aside)

    # ------------------------------------------------------------------ one component (§4.4)
    def component_losses(self, i: int, s_prev: torch.Tensor, t_prev: torch.Tensor):
        """Component i (0-based) on detached inputs: (s_i, t_i, associated loss, autoencoder loss).

        associated = MSE(b_i(s_i), t_i.detach())   — trains f_i and b_i (Eq. 3)
        autoencoder = MSE(h_i(t_i), t_{i−1})       — trains g_i and h_i (Eq. 6)
        MSE is the mean over batch and units (the authors' ``tf.losses.mean_squared_error``).
        Nothing reaches another component: both inputs enter detached.
        """
        s = self.f[i](s_prev.detach())
        t_in = t_prev.detach()
        t = self.g[i](t_in)
        assoc = F.mse_loss(self.b[i](s), t.detach())
        ae = F.mse_loss(self.h[i](t), t_in)
        return s, t, assoc, ae

    def component_modules(self, i: int) -> dict[str, nn.Module]:
        return {"f": self.f[i], "b": self.b[i], "g": self.g[i], "h": self.h[i]}

    def effective_names(self) -> list[str]:
        """Parameters of Eq. 8: the f's, the h's and the last bridge (§4.5)."""
        top = f"b.{len(self.b) - 1}."
        return [n for n, _ in self.named_parameters() if n.startswith(("f.", "h.", top))]

    def affiliated_names(self) -> list[str]:
        eff = set(self.effective_names())
        return [n for n, _ in self.named_parameters() if n not in eff]


def _shapes(fs: list[nn.Module], input_shape) -> list[tuple[int, ...]]:
    shapes, z = [], torch.zeros(2, *input_shape)
    with torch.no_grad():
        for f in fs:
            z = f(z)
            shapes.append(tuple(z.shape[1:]))
    return shapes


def _build(cls, fs, input_shape, num_classes, width, bridge, bridge_pool, twin, twin_activation):
    for f in fs:
        he_normal_(f)
    FoldedNet.__init__(cls, fs, _shapes(fs, input_shape), num_classes, width, bridge, bridge_pool, twin, twin_activation)


# --------------------------------------------------------------------------- the MLP (§5.2)

class ALMLPOptions(ModelOptions):
    """Paper §5.2: two components, s_i and t_i of 1024 units, top bridge 5120 (the authors' MNIST
    code; their CIFAR code uses 3000 units)."""

    names: ClassVar[tuple[str, ...]] = ("al_mlp", "al_mlp_bp")

    components: int = opt(2, "K: components (one ELU layer f_i each)", ge=1)
    width: int = opt(1024, "n: units of every s_i and t_i", ge=1)
    bridge: int = opt(5120, "hidden units of every bridge (authors: 5n)", ge=1)
    bridge_pool: int = opt(4, "conv nets: lower bridges see the map average-pooled to this side", ge=1)
    twin_activation: Literal[ACTIVATIONS] = opt("elu", "BP twin: activation of its top bridge and hidden decoders")


@MODELS.register("al_mlp")
class ALMLP(FoldedNet):
    """Folded MLP. Layers (K = 2): f_1 = Linear(784, 1024)+ELU, f_2 = Linear(1024, 1024)+ELU;
    b_2 = Linear(1024, 5120)+σ → Linear(5120, 1024)+σ; h_2 = Linear(1024, 1024)+σ;
    h_1 = Linear(1024, 10)+σ. Pairing: f_i ↔ h_i in component i, i.e. the 6-layer net
    1024-1024-5120-1024-1024-10 folds at the 5120 layer (the top bridge)."""

    twin = False

    def __init__(self, input_shape, num_classes, components=2, width=1024, bridge=5120, bridge_pool=4,
                 twin_activation="elu"):
        in_dim = math.prod(input_shape)
        fs = [nn.Sequential(*([nn.Flatten()] if i == 0 else []), nn.Linear(in_dim if i == 0 else width, width), nn.ELU())
              for i in range(components)]
        _build(self, fs, input_shape, num_classes, width, bridge, bridge_pool, type(self).twin, twin_activation)


@MODELS.register("al_mlp_bp")
class ALMLPTwin(ALMLP):
    """BP twin of ``al_mlp``: Flatten → [Linear+ELU]×K → Linear(n, 5120)+ELU → Linear(5120, n)+ELU →
    [Linear(n, n)+ELU]×(K−1) → Linear(n, C) (logits). Same parameter count as al_mlp's Eq. 8 path."""

    twin = True


# --------------------------------------------------------------------------- the 13-layer Vanilla CNN

class ALCNNOptions(ModelOptions):
    """Paper §5.2: 4 conv 3×3×32, 4 conv 3×3×64, FC 1280, 4 FC 256; stride 2 on the 4th and 8th
    convolutions (the authors' code)."""

    names: ClassVar[tuple[str, ...]] = ("al_cnn", "al_cnn_bp")

    width: int = opt(256, "n: units of every t_i (and the s_i targets of the bridges)", ge=1)
    bridge: int = opt(1280, "hidden units of every bridge (authors: 5n)", ge=1)
    channels: list[int] = opt([32, 32, 32, 32, 64, 64, 64, 64], "the 8 convolutions' channels", ge=1)
    groups: list[int] = opt([1, 1, 1, 1, 1, 3], "convolutions per component, bottom up (paper: 1,1,1,1,1,3)", ge=1)
    bridge_pool: int = opt(4, "lower bridges see the map average-pooled to this side (authors: flattened)", ge=1)
    twin_activation: Literal[ACTIVATIONS] = opt("elu", "BP twin: activation of its top bridge and hidden decoders")

    def check(self, cfg) -> None:
        from bench.options import ConfigError

        if sum(self.groups) != len(self.channels):
            raise ConfigError(f"model.groups={list(self.groups)} must add up to the {len(self.channels)} convolutions "
                              f"of model.channels")


@MODELS.register("al_cnn")
class ALCNN(FoldedNet):
    """Folded 13-layer Vanilla CNN (§5.2). Layers: conv 1–4 (3×3×32, the 4th stride 2), conv 5–8
    (3×3×64, the 8th stride 2), each + ELU. Pairing (paper): layer i and layer 14 − i form
    component i for i = 1 … 5, layers 6–8 form component 6. Here (``groups`` = 1,1,1,1,1,3):
    f_1 … f_5 = conv 1 … 5, f_6 = conv 6–8; b_6 = Linear(·, 1280)+σ → Linear(1280, 256)+σ is the
    paper's FC 1280 and first FC 256; h_6 … h_2 = Linear(256, 256)+σ are the FC-256 layers paired
    with f_6 … f_2, and h_1 = Linear(256, 10)+σ the output layer paired with conv 1.
    """

    twin = False

    def __init__(self, input_shape, num_classes, width=256, bridge=1280, channels=(32, 32, 32, 32, 64, 64, 64, 64),
                 groups=(1, 1, 1, 1, 1, 3), bridge_pool=4, twin_activation="elu"):
        convs, c_in = [], input_shape[0]
        for j, c in enumerate(channels):
            stride = 2 if j in (3, 7) else 1
            convs.append(nn.Sequential(nn.Conv2d(c_in, c, 3, stride=stride, padding=1), nn.ELU()))
            c_in = c
        fs, j = [], 0
        for n in groups:
            fs.append(nn.Sequential(*convs[j:j + n]))
            j += n
        _build(self, fs, input_shape, num_classes, width, bridge, bridge_pool, type(self).twin, twin_activation)


@MODELS.register("al_cnn_bp")
class ALCNNTwin(ALCNN):
    """BP twin of ``al_cnn``: the 8 convolutions, FC 1280, FC 256, (K−1)×FC 256, FC 10, ELU."""

    twin = True


# --------------------------------------------------------------------------- ResNet-20 / 32 (CIFAR)

class BasicBlock(nn.Module):
    """conv-BN-φ, conv-BN, + shortcut (1×1 conv when the shape changes), φ (authors' ``resBlock``)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.act1, self.act = nn.ELU(), nn.ELU()
        self.short = nn.Conv2d(c_in, c_out, 1, stride) if (stride != 1 or c_in != c_out) else nn.Identity()

    def forward(self, x):
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act(out + self.short(x))


class ALResNetOptions(ModelOptions):
    """The authors' ResNet_AL: 4 components = the stem and the three stages; n = 300, bridge 5n."""

    names: ClassVar[tuple[str, ...]] = ("al_resnet20", "al_resnet20_bp", "al_resnet32", "al_resnet32_bp")

    width: int = opt(300, "n: units of every t_i", ge=1)
    bridge: int = opt(1500, "hidden units of every bridge (authors: 5n)", ge=1)
    bridge_pool: int = opt(4, "lower bridges see the map average-pooled to this side (authors: flattened)", ge=1)
    twin_activation: Literal[ACTIVATIONS] = opt("elu", "BP twin: activation of its top bridge and hidden decoders")


class ALResNet(FoldedNet):
    """Folded CIFAR ResNet (He et al. 2016): stem conv 3×3×16+BN+ELU = f_1; stage 1 (16 channels),
    stage 2 (32, stride 2), stage 3 (64, stride 2) of ``blocks`` basic blocks = f_2, f_3, f_4. The
    top bridge flattens the 64×8×8 map (authors' code; BP's global pooling is not in the AL path)."""

    blocks = 3
    twin = False

    def __init__(self, input_shape, num_classes, width=300, bridge=1500, bridge_pool=4, twin_activation="elu"):
        stem = nn.Sequential(nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ELU())
        fs, c = [stem], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(c, c_out, stride)] + [BasicBlock(c_out, c_out, 1) for _ in range(self.blocks - 1)]
            fs.append(nn.Sequential(*blocks))
            c = c_out
        _build(self, fs, input_shape, num_classes, width, bridge, bridge_pool, type(self).twin, twin_activation)


@MODELS.register("al_resnet20")
class ALResNet20(ALResNet):
    """ResNet-20: 3 blocks per stage (1 + 3·3·2 = 19 conv layers + the AL head)."""
    blocks = 3


@MODELS.register("al_resnet20_bp")
class ALResNet20Twin(ALResNet20):
    twin = True


@MODELS.register("al_resnet32")
class ALResNet32(ALResNet):
    """ResNet-32: 5 blocks per stage."""
    blocks = 5


@MODELS.register("al_resnet32_bp")
class ALResNet32Twin(ALResNet32):
    twin = True


# --------------------------------------------------------------------------- VGG (authors' VGG_AL)

class ALVGGOptions(ModelOptions):
    """The authors' VGG_AL: conv-BN-ELU 128, 256, pool | 256, 512, pool | 512, pool, 512, pool |
    dense 1024, 1024; 4 components; n = 300, bridge 5n."""

    names: ClassVar[tuple[str, ...]] = ("al_vgg", "al_vgg_bp")

    width: int = opt(300, "n: units of every t_i", ge=1)
    bridge: int = opt(1500, "hidden units of every bridge (authors: 5n)", ge=1)
    dense: int = opt(1024, "units of the top component's two dense layers", ge=1)
    bridge_pool: int = opt(4, "lower bridges see the map average-pooled to this side (authors: flattened)", ge=1)
    twin_activation: Literal[ACTIVATIONS] = opt("elu", "BP twin: activation of its top bridge and hidden decoders")


def _cbe(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ELU()]


@MODELS.register("al_vgg")
class ALVGG(FoldedNet):
    """Components: f_1 = conv 128, conv 256, max-pool; f_2 = conv 256, conv 512, max-pool;
    f_3 = conv 512, pool, conv 512, pool; f_4 = flatten, dense 1024 + ELU, dense 1024 + ELU."""

    twin = False

    def __init__(self, input_shape, num_classes, width=300, bridge=1500, dense=1024, bridge_pool=4, twin_activation="elu"):
        c = input_shape[0]
        f1 = nn.Sequential(*_cbe(c, 128), *_cbe(128, 256), nn.MaxPool2d(2))
        f2 = nn.Sequential(*_cbe(256, 256), *_cbe(256, 512), nn.MaxPool2d(2))
        f3 = nn.Sequential(*_cbe(512, 512), nn.MaxPool2d(2), *_cbe(512, 512), nn.MaxPool2d(2))
        side = input_shape[1] // 16
        f4 = nn.Sequential(nn.Flatten(), nn.Linear(512 * side * side, dense), nn.ELU(), nn.Linear(dense, dense), nn.ELU())
        _build(self, [f1, f2, f3, f4], input_shape, num_classes, width, bridge, bridge_pool, type(self).twin, twin_activation)


@MODELS.register("al_vgg_bp")
class ALVGGTwin(ALVGG):
    twin = True
