"""Locally-connected layer and the locally-connected network of Bartunov et al. 2018 (rlra-2's CNN).

rlra appendix: "The architectures of our trained CNN models were set to be identical to those of
[5] (Bartunov, Santoro, Richards, Marris, Hinton & Lillicrap, *Assessing the scalability of
biologically-motivated deep learning algorithms and architectures*, NeurIPS 2018), hence meaning
we trained using the locally-connected structure originally proposed in that study as a more
biologically-plausible replacement of standard convolution. The update rule for locally-connected
receptive field structures are the same as that used for fully-connected weights."

A locally-connected (LC) layer is a convolution with *untied* weights: output position l has its
own weight matrix W_l (C_out × C_in·k·k) and bias b_l, applied to its own receptive field
(patch) p_l:

    z[b, :, l] = W_l p_l(x_b) + b_l,            ΔW_l = e_l p_lᵀ  (a dense layer per position)

Implemented as ``F.unfold`` (all patches at once) and one batched matmul over positions
(``torch.bmm``), never a Python loop over positions.

``lcnet``: Bartunov et al.'s CIFAR-10 locally-connected network. The rec-LRA paper (arXiv:2002.03911)
does not restate it; from Bartunov et al.'s appendix table of architectures it is three LC layers
``(5×5, 64, stride 2), (5×5, 128, stride 2), (3×3, 256, stride 1)`` then a linear softmax
classifier. Choices recorded here and in configs/model/lcnet.yaml, all overridable: "same"-style
padding k//2 (32 → 16 → 8 → 8 maps, 33.4 M parameters at 10 classes), tanh units (Bartunov's TP
networks' nonlinearity; rlra's CNN rows do not say), and the rlra appendix's regularisers as two
switches, ``batchnorm`` (BatchNorm2d after every LC layer) and ``layernorm`` (LayerNorm over each
LC layer's whole C×H×W output), both applied before the nonlinearity when on.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.activations import make_activation
from bench.models.base import MODELS, ZooModel
from bench.models.cnn import _per_layer
from bench.models.structure import Structure, sequential_structure
from bench.models.mlp import init_linear
from bench.options import ACTIVATIONS, WEIGHT_INITS, ClassVar, Literal, ModelOptions, opt


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class LocallyConnected2d(nn.Module):
    """Convolution-shaped layer with untied weights (one filter bank per output position).

    ``weight``: (L, C_out, C_in·kh·kw) with L = H_out·W_out positions in row-major order;
    ``bias``: (C_out, H_out, W_out) or None. ``in_size`` fixes the input's H×W (the weights
    are per position). The patch layout is ``F.unfold``'s: channel-major, then kernel rows, then
    kernel columns, the same flattening as ``nn.Conv2d.weight[o].reshape(-1)``.

    Pieces a local rule needs: :meth:`patches` ``(x) -> (B, K, L)`` (every receptive field,
    K = C_in·kh·kw) and :meth:`local_update` ``(e, patches) -> ΔW`` with ΔW_l = Σ_b e_l p_lᵀ,
    shaped like ``weight``. Its feedback-alignment twin is
    ``bench.feedback.replaced.FALocallyConnected2d`` (feedback code imports the zoo, never the reverse).
    """

    def __init__(self, in_channels: int, out_channels: int, in_size, kernel_size, stride=1, padding=0,
                 bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.in_size, self.kernel_size = _pair(in_size), _pair(kernel_size)
        self.stride, self.padding = _pair(stride), _pair(padding)
        self.out_size = tuple(
            (n + 2 * p - k) // s + 1 for n, p, k, s in zip(self.in_size, self.padding, self.kernel_size, self.stride))
        if min(self.out_size) < 1:
            raise ValueError(f"locally-connected layer: kernel {self.kernel_size} does not fit the "
                             f"{self.in_size} input with padding {self.padding}")
        positions = self.out_size[0] * self.out_size[1]
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.weight = nn.Parameter(torch.empty(positions, self.out_channels, fan_in))
        self.bias = nn.Parameter(torch.empty(self.out_channels, *self.out_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default: U(±1/√fan_in) for weights and biases alike (same fan-in per position)
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Every receptive field: (B, C_in·kh·kw, L)."""
        if tuple(x.shape[1:]) != (self.in_channels, *self.in_size):
            raise ValueError(f"locally-connected layer expects inputs of shape (B, {self.in_channels}, "
                             f"{self.in_size[0]}, {self.in_size[1]}), got {tuple(x.shape)}")
        return F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (L, C_out, K) @ (L, K, B): one matmul per position, batched. The weight is the big operand
        # and already contiguous in this order; einsum("bkl,lok->bol") copies it every call (20× slower).
        out = torch.bmm(self.weight, self.patches(x).permute(2, 1, 0).contiguous())
        out = out.permute(2, 1, 0).reshape(x.shape[0], self.out_channels, *self.out_size)
        return out if self.bias is None else out + self.bias

    @staticmethod
    def local_update(error: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """ΔW_l = Σ_b e_l p_lᵀ (B-summed, as ``.grad`` of ⟨e, z⟩), shaped (L, C_out, K).

        ``error``: (B, C_out, H_out, W_out); ``patches``: :meth:`patches`'s output.
        """
        return torch.bmm(error.flatten(2).permute(2, 1, 0), patches.permute(2, 0, 1))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, in_size={self.in_size}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, out_size={self.out_size}, bias={self.bias is not None}")


def init_lc(layer: LocallyConnected2d, init: str, sigma: float) -> None:
    """The zoo's ``init`` names (``init_linear``) on an LC layer: fan-in C_in·k·k per position."""
    if init == "default":
        return
    if init == "gaussian":
        nn.init.normal_(layer.weight, 0.0, sigma)
    elif init == "xavier":  # Glorot normal with the per-position fan-in and fan-out
        fan_in, fan_out = layer.weight.shape[-1], layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1]
        nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / (fan_in + fan_out)))
    elif init == "kaiming":
        nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / layer.weight.shape[-1]))
    elif init == "lecun":
        nn.init.normal_(layer.weight, 0.0, 1.0 / math.sqrt(layer.weight.shape[-1]))
    else:
        raise ValueError(f"unknown init {init!r}; valid choices: default, gaussian, xavier, kaiming, lecun")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class LCNetOptions(ModelOptions):
    names: ClassVar[tuple[str, ...]] = ("lcnet",)

    channels: list[int] = opt([64, 128, 256], "LC widths (Bartunov et al. appendix: 5×5/64/2, 5×5/128/2, 3×3/256/1)", ge=1)
    kernel: int | list[int] = opt([5, 5, 3], "kernel per layer (padding k//2)", ge=1)
    stride: int | list[int] = opt([2, 2, 1], "stride per layer (32×32 → 16 → 8 → 8)", ge=1)
    activation: Literal[ACTIVATIONS] = opt("tanh", "nonlinearity φ")
    slope: float = opt(0.01, "leaky_relu negative slope")
    batchnorm: bool = opt(False, "BatchNorm2d after every LC layer, before φ")
    layernorm: bool = opt(False, "LayerNorm over each LC output's C×H×W, before φ")
    dropout: float = opt(0.0, "dropout after every LC block", ge=0, lt=1)
    init: Literal[WEIGHT_INITS] = opt("default", "default (conv-like U(±1/√fan_in)) | gaussian | xavier | kaiming | lecun")
    sigma: float = opt(0.05, "gaussian init std (rlra: 'unit Gaussian' = 1.0)", gt=0)

@MODELS.register("lcnet")
class LCNet(ZooModel):
    """Bartunov et al. 2018's locally-connected CIFAR-10 network (see the module docstring).

    ``[LC → (BN) → (LN) → φ → (dropout)] × len(channels)``, flatten, then a Linear classifier.
    Options: ``channels``, ``kernel``, ``stride`` (int or one per layer; padding k//2),
    ``activation``/``slope``, ``batchnorm``, ``layernorm``, ``dropout``, ``init``/``sigma``.

    Feedback points (micro and macro alike): every LC layer's nonlinearity ``features.i.act``.
    """

    def __init__(self, input_shape, num_classes, channels: Sequence[int] = (64, 128, 256), kernel=(5, 5, 3),
                 stride=(2, 2, 1), activation="tanh", slope=0.01, batchnorm=False, layernorm=False, dropout=0.0,
                 init="default", sigma=0.05):
        super().__init__()
        channels = [int(c) for c in channels]
        kernels = _per_layer(kernel, len(channels), "kernel")
        strides = _per_layer(stride, len(channels), "stride")
        in_ch, size = int(input_shape[0]), (int(input_shape[1]), int(input_shape[2]))
        blocks, points = [], []
        for i, (c, k, s) in enumerate(zip(channels, kernels, strides)):
            layers: "OrderedDict[str, nn.Module]" = OrderedDict()
            layers["lc"] = LocallyConnected2d(in_ch, c, size, k, stride=s, padding=k // 2)
            init_lc(layers["lc"], init, sigma)
            size = layers["lc"].out_size
            if batchnorm:
                layers["bn"] = nn.BatchNorm2d(c)
            if layernorm:
                layers["ln"] = nn.LayerNorm([c, *size])
            layers["act"] = make_activation(activation, slope)
            points.append(f"features.{i}.act")
            if dropout:
                layers["drop"] = nn.Dropout(dropout)
            blocks.append(nn.Sequential(layers))
            in_ch = c
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_ch * size[0] * size[1], num_classes)
        init_linear(self.classifier, init, sigma)
        self._points = {"micro": points, "macro": list(points)}

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))

    def structure(self) -> Structure:
        """Stage ``features``: [LC → (BN) → (LN) → φ → (dropout)] blocks, then flatten; head: the
        classifier."""
        return sequential_structure(self)


__all__ = ["LocallyConnected2d", "LCNet", "init_lc"]
