"""Pseudo-convolution (perturbative layer) and pResNet-18 of the rlra paper.

Pseudo-convolution — Juefei-Xu, Boddeti & Savvides, *Perturbative neural networks*, CVPR 2018,
as the rlra paper (Ororbia, Mali, Kifer & Giles, *Large-scale gradient-free deep learning with
recursive local representation alignment*, 2020, arXiv:2002.03911, §3.3 "Replacing Convolution with
Fixed Perturbation") writes it:

    z_ℓ^c = Σ_{m=1}^{M} w_ℓ^m φ_r(z_{ℓ-1}^m + n_{ℓ-1}^m),   φ_r(v) = max(0, v)

with M fixed noise maps n^m ~ N(0, σ²) ("pre-generated", never learned) and one learned scalar
weight w^{c,m} per output map c and noise map m, i.e. a 1×1 convolution over the M perturbed,
rectified maps. Under rec-LRA, with error units e_ℓ next to z_ℓ^c, the paper's update is

    Δw_ℓ^m = Σ_i Σ_j (e_ℓ * (φ_r(z_{ℓ-1}^m + n_{ℓ-1}^m))ᵀ)[i, j]

summed over the spatial positions (i, j) — and, for a mini-batch, over its samples: this is
exactly ∂⟨e_ℓ, z_ℓ⟩/∂w, the gradient of a 1×1 convolution with ``e_ℓ`` as its output gradient
(:meth:`PseudoConv2d.local_update`).

Which input map does noise map m perturb? The formula pairs map m of the input with noise map m,
so with ``fanout = 1`` (the default, and PNN's own released setting: "each input channel is
perturbed with a single noise mask") M equals the number of input channels. ``fanout = k``
perturbs every input channel with k masks (PNN's "fan-out"), M = k·C_in; map m reads channel
m // k. The layer has no spatial kernel and no stride: noise maps have the input's H×W.

pResNet-18 (rlra Table 3, Tables 2/4/5 "ResNet" rows with pconv): timm's ResNet-18 (BasicBlock,
[2, 2, 2, 2]) whose sixteen 3×3 block convolutions are pseudo-convolutions. Choices the paper
leaves open, recorded here and in configs/model/presnet18.yaml:

* ``masks`` (64 / 160 / 256 in the paper: "ResNet-18 with 64 perturbation masks ... (pResNet) and
  64 filters for vanilla ResNet (cResNet)"; 160 for CIFAR-10, 256 for ImageNet, appendix) is the
  number of noise masks of the first stage's pseudo-convs. With fanout 1 a pseudo-conv has one
  mask per input map, so ``masks`` is the first-stage width, exactly as cResNet's "64 filters" is
  ResNet-18's base width; later stages double it as ResNet-18 does (M, 2M, 4M, 8M), unless
  ``widths`` gives the four stage widths (e.g. ``[160, 160, 160, 160]`` for the literal reading
  "160 masks per layer").
* The stem stays a real 3×3 convolution (PNN's released ResNets keep a spatial first layer, its
  ``first_filter_size``: a fanout-1 pseudo-conv on 3 colour channels would see 3 maps only).
* Strided blocks: the pseudo-conv has no stride, so the block's stride moves to a ceil-mode
  ``AvgPool2d`` in timm's anti-aliasing slot ``aa`` (after ``act1``), as PNN pools inside its
  perturbative blocks; the 1×1 strided shortcut projection is timm's.
* Noise level σ = ``level`` = 0.1 (appendix: "additive noise set to a level of 0.1").

Because pResNet *is* a timm ResNet with swapped modules, every module name, feedback point and
the residual wiring are those of ``timm:resnet18`` (``net.layer2.0.conv1`` is a pseudo-conv,
``net.layer2.0.aa`` its pool, ``net.layer2.0.act1`` a point...), so a rule that handles the timm
ResNet handles pResNet. cResNet (the conv baseline of Table 3) is ``timm:resnet18`` with
``cifar_stem: true``: the paper's only description of it is "64 filters", ResNet-18's own base
width; its residual block (appendix Figure 6) is an image not available in the text.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from bench.models.base import MODELS, ZooModel
from bench.options import ClassVar, ConfigError, Literal, ModelOptions, opt
from bench.models.structure import Structure
from bench.models.timm_models import disable_inplace, resnet_points, resnet_structure

INITS = ("kaiming", "gaussian", "xavier")


class PseudoConv2d(nn.Module):
    """z^c = Σ_m w^{c,m} φ_r(x^{m//fanout} + n^m) (+ b^c): fixed Gaussian noise maps, ReLU, 1×1 conv.

    Pieces a local rule needs (rlra Δw^m, §3.3):

    * ``noise`` — buffer (M, H, W), the fixed maps n^m ~ N(0, level²); never a parameter, so no
      optimizer and no gradient ever touches it (it is saved in ``state_dict``);
    * :meth:`perturbed` ``(x) -> (B, M, H, W)`` — the perturbed, rectified maps
      φ_r(x^m + n^m) that feed the combination (the "presynaptic activity" of w);
    * ``combine`` — the ``nn.Conv2d(M, out_channels, 1)`` holding the combination weights;
      :attr:`weight` is its weight viewed as the (out_channels × M) matrix w^{c,m};
    * :meth:`local_update` ``(e, p) -> Δw`` — the paper's Δw^m = Σ_{b,i,j} e[b,c,i,j]·p[b,m,i,j],
      shaped like ``combine.weight`` so it can be written to ``.grad``.

    ``forward(x) = combine(perturbed(x))``.
    """

    def __init__(self, in_channels: int, out_channels: int, size: Sequence[int] | int, fanout: int = 1,
                 level: float = 0.1, bias: bool = True):
        super().__init__()
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if fanout < 1:
            raise ValueError(f"pseudo-conv fanout must be ≥ 1, got {fanout}")
        if level < 0:
            raise ValueError(f"pseudo-conv noise level must be ≥ 0, got {level}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.fanout, self.level = int(fanout), float(level)
        self.masks = self.in_channels * self.fanout
        self.register_buffer("noise", self.level * torch.randn(self.masks, h, w))
        self.combine = nn.Conv2d(self.masks, self.out_channels, kernel_size=1, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        """w^{c,m} as an (out_channels × M) view of ``combine.weight``."""
        return self.combine.weight.view(self.out_channels, self.masks)

    def perturbed(self, x: torch.Tensor) -> torch.Tensor:
        """φ_r(x^{m//fanout} + n^m) for m = 1…M: shape (B, M, H, W)."""
        if tuple(x.shape[1:]) != (self.in_channels, *self.noise.shape[1:]):
            raise ValueError(f"pseudo-conv expects inputs of shape (B, {self.in_channels}, "
                             f"{self.noise.shape[1]}, {self.noise.shape[2]}) (its noise maps are fixed), "
                             f"got {tuple(x.shape)}")
        if self.fanout > 1:
            x = x.repeat_interleave(self.fanout, dim=1)
        return F.relu(x + self.noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.perturbed(x))

    @staticmethod
    def local_update(error: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        """rlra §3.3: Δw^{c,m} = Σ_{b,i,j} e[b,c,i,j] φ_r(z^m + n^m)[b,i,j], as (C_out, M, 1, 1).

        ``error`` is e_ℓ (B, C_out, H, W), ``perturbed`` is :meth:`perturbed`'s output. The sum
        over the batch matches what ``.grad`` of ⟨e, z⟩ holds; divide by B for a batch mean.
        """
        return torch.einsum("bchw,bmhw->cm", error, perturbed)[:, :, None, None]

    def extra_repr(self) -> str:
        h, w = self.noise.shape[1:]
        return (f"{self.in_channels}, {self.out_channels}, size=({h}, {w}), masks={self.masks}, "
                f"fanout={self.fanout}, level={self.level}, bias={self.combine.bias is not None}")


def _down(size: int) -> int:
    """Output size of timm's stride-2 ImageNet stem pieces (7×7/2 pad 3 conv, 3×3/2 pad 1 max-pool)."""
    return (size - 1) // 2 + 1


def init_network(module: nn.Module, init: str, sigma: float) -> None:
    """Re-initialise every conv/linear weight (the pseudo-convs' combinations included):
    ``gaussian`` N(0, σ²) (σ = 1 is the rlra appendix's "unit Gaussian" for the ResNets),
    ``xavier`` Glorot normal; ``kaiming`` keeps timm's ResNet init (He normal, fan-out)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid choices: {', '.join(INITS)}")
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if init == "kaiming":
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                continue
            if init == "gaussian":
                nn.init.normal_(m.weight, 0.0, sigma)
            else:
                nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class PResNet18Options(ModelOptions):
    names: ClassVar[tuple[str, ...]] = ("presnet18",)

    masks: int = opt(64, "noise masks of each first-stage pseudo-conv (= the stage width); paper: 64 / 160 / 256", ge=1)
    widths: list[int] | None = opt(None, "the 4 stage widths; null = masks·[1, 2, 4, 8]", ge=1)
    fanout: int = opt(1, "noise masks per input map (M = fanout · input maps)", ge=1)
    level: float = opt(0.1, "σ of the fixed noise maps n ~ N(0, σ²) (appendix: 0.1)", ge=0)
    cifar_stem: bool = opt(True, "3×3 stride-1 stem, no max-pool (false: the ImageNet 7×7/2 stem + max-pool)")
    pool: Literal["avg", "max"] = opt("avg", "the strided blocks' 2×2 downsampling after act1")
    init: Literal["kaiming", "gaussian", "xavier"] = opt("kaiming", "kaiming (timm's He fan-out) | gaussian (σ) | xavier")
    sigma: float = opt(1.0, "gaussian init std", gt=0)
    drop_rate: float = opt(0.0, "dropout before the classifier", ge=0, lt=1)

    def check(self, cfg) -> None:
        if self.widths is not None and len(self.widths) != 4:
            raise ConfigError(f"model.widths={self.widths!r} is not valid; expected the 4 stage widths or null")

@MODELS.register("presnet18")
class PResNet18(ZooModel):
    """pResNet-18: timm ResNet-18 with pseudo-convolutions (see the module docstring).

    Options: ``masks`` (64 | 160 | 256 in the paper; first-stage masks = width), ``widths`` (the
    four stage widths; default masks·[1, 2, 4, 8]), ``fanout`` (masks per input map), ``level``
    (noise σ), ``cifar_stem`` (3×3 stride-1 stem, no max-pool; default true), ``pool`` (avg | max,
    the strided blocks' downsampling), ``init``/``sigma``, ``drop_rate`` (before the classifier).

    Feedback points are timm:resnet18's: micro ``net.act1`` and every block's ``act1``/``act2``
    (17), macro the 8 blocks.
    """

    def __init__(self, input_shape, num_classes, masks: int = 64, widths: Sequence[int] | None = None,
                 fanout: int = 1, level: float = 0.1, cifar_stem: bool = True, pool: str = "avg",
                 init: str = "kaiming", sigma: float = 1.0, drop_rate: float = 0.0):
        super().__init__()
        widths = [int(w) for w in widths] if widths is not None else [int(masks) * k for k in (1, 2, 4, 8)]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"model.widths must be 4 positive stage widths, got {widths}")
        if pool not in ("avg", "max"):
            raise ValueError(f"unknown pool {pool!r}; valid choices: avg, max")
        in_chans, height, width = (int(s) for s in input_shape)
        # Built on the meta device: timm would otherwise allocate and He-initialise the sixteen
        # 3×3 convs (9× the pseudo-convs' weights: 180 M floats at 256 masks) only to drop them.
        net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans,
                     channels=tuple(widths), stem_width=widths[0], drop_rate=drop_rate, device="meta")
        if cifar_stem:
            net.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, stride=1, padding=1, bias=False, device="meta")
            net.maxpool = nn.Identity()
        else:
            height, width = _down(_down(height)), _down(_down(width))
            if widths[0] != net.conv1.out_channels:
                net.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=7, stride=2, padding=3, bias=False,
                                      device="meta")
        if widths[0] != net.bn1.num_features:
            # timm's plain stem is 64 wide whatever ``channels`` says; widen it (and the first block,
            # which would otherwise project 64 → M) so every first-stage pseudo-conv has M masks.
            net.bn1 = nn.BatchNorm2d(widths[0], device="meta")
            net.layer1[0] = BasicBlock(widths[0], widths[0], device="meta")
        shapes = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in stage:
                shapes.append((block.conv1.in_channels, block.conv1.out_channels, block.conv1.stride[0]))
                block.conv1 = block.conv2 = nn.Identity()
        net.to_empty(device="cpu")
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                m.reset_parameters()
        net.init_weights(zero_init_last=True)  # timm's own init (He fan-out convs, last BN of a block at 0)
        pool_cls = nn.AvgPool2d if pool == "avg" else nn.MaxPool2d
        blocks_in_order = [b for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for b in stage]
        for block, (cin, cout, stride) in zip(blocks_in_order, shapes):
            block.conv1 = PseudoConv2d(cin, cout, (height, width), fanout=fanout, level=level, bias=False)
            if stride != 1:
                # ceil mode: the same size as the strided 1×1 shortcut, ⌈H/2⌉, for odd H too
                block.aa = pool_cls(stride, stride, ceil_mode=True)
                height, width = math.ceil(height / stride), math.ceil(width / stride)
            block.conv2 = PseudoConv2d(cout, cout, (height, width), fanout=fanout, level=level, bias=False)
        self.net = net
        init_network(self.net, init, sigma)
        disable_inplace(self.net)
        self._points = resnet_points(self.net)  # the same layout and names as timm:resnet18

    def pseudo_convs(self) -> list[str]:
        """Dotted names of the 16 pseudo-convolutions, in forward order."""
        return [n for n, m in self.named_modules() if isinstance(m, PseudoConv2d)]

    def forward(self, x):
        return self.net(x)

    def structure(self) -> Structure:
        """timm:resnet18's (the pseudo-convs are the blocks' conv1/conv2 layers)."""
        return resnet_structure(self.net, self._points)


__all__ = ["PseudoConv2d", "PResNet18", "init_network"]
