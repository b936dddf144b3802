"""Plain convolutional networks of the papers: a configurable ``cnn`` and the sfa MNIST net.

``cnn`` is ``[conv → (BN) → φ → (pool) → (dropout)] × len(channels)``, flatten,
``[Linear → (BN) → φ → (dropout)] × len(hidden)``, then a Linear classifier. It covers:

* dfa-4 (Launay et al. 2019, Table 4): "a CNN with 3 convolutional layers and a one layer
  classifier", tanh, He init, with/without BN and dropout. The paper gives no widths, kernels or
  pooling; the defaults here (a LeNet-style 32-64-64 stack of 5×5 "same" convs, each followed
  by a 2×2 max-pool) are our choice, and the dfa-4 table config should record it.
* sfa CIFAR-10 Model 1 (Moskovitz et al. 2018, Table 2):
  ``channels=[64, 64], kernel=5, activation=relu, hidden=[384, 192]`` on 24×24 crops.
* ``sfa_mnist`` below (its MNIST column), registered separately so its tables name it directly.

Feedback points (names of modules whose output is the point):
  * micro: every nonlinearity, ``features.i.act`` then ``hidden.j.act``;
  * macro: every conv block's output before dropout (``features.i.pool``, or ``features.i.act``
    without pooling), then every hidden dense layer's ``hidden.j.act``.
The classifier is the output layer and never a point.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from bench.models.activations import make_activation
from bench.models.base import MODELS, ZooModel
from bench.models.structure import Structure, sequential_structure
from bench.models.mlp import init_linear
from bench.options import ACTIVATIONS, WEIGHT_INITS, ClassVar, ConfigError, Literal, ModelOptions, opt


POOLS = ("max", "avg", "none")


def init_layer(layer: nn.Module, init: str, sigma: float) -> None:
    """Same init names and meaning as the MLP's ``init_linear`` (so one ``init`` key means the same
    thing across the zoo), extended to convs, whose fan-in is ``in_channels·k·k``."""
    if init == "lecun" and isinstance(layer, nn.Conv2d):
        nn.init.normal_(layer.weight, 0.0, 1.0 / math.sqrt(layer.weight[0].numel()))
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    else:
        init_linear(layer, init, sigma)  # its nn.init calls work on conv weights too


def _per_layer(value, n: int, key: str) -> list[int]:
    """An int applies to every conv layer; a list gives one value per layer."""
    if isinstance(value, int):
        return [value] * n
    values = [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"model.{key} has {len(values)} entries but there are {n} conv layers")
    return values


class CNNOptions(ModelOptions):
    names: ClassVar[tuple[str, ...]] = ("cnn",)

    channels: list[int] = opt([32, 64, 64], "conv widths, one conv block each", ge=1)
    kernel: int | list[int] = opt(5, "conv kernel size, or one per conv (padding k//2)", ge=1)
    stride: int | list[int] = opt(1, "conv stride, or one per conv", ge=1)
    activation: Literal[ACTIVATIONS] = opt("tanh", "nonlinearity φ")
    slope: float = opt(0.01, "leaky_relu negative slope")
    batchnorm: bool = opt(False, "BatchNorm2d before every conv nonlinearity")
    pool: Literal["max", "avg", "none"] = opt("max", "pooling after every conv block")
    pool_size: int = opt(2, "pooling window and stride", ge=1)
    conv_dropout: float = opt(0.0, "dropout after every conv block", ge=0, lt=1)
    hidden: list[int] = opt([], "dense widths before the classifier", ge=1)
    dropout: float = opt(0.0, "dropout after every hidden dense layer", ge=0, lt=1)
    init: Literal[WEIGHT_INITS] = opt("default", "weight init (as the MLP's)")
    sigma: float = opt(0.05, "gaussian init std", gt=0)

    def check(self, cfg) -> None:
        for key in ("kernel", "stride"):
            value = getattr(self, key)
            if isinstance(value, list) and len(value) != len(self.channels):
                raise ConfigError(f"model.{key}={value!r} is not valid; expected one int or one per conv "
                                  f"({len(self.channels)} values)")

@MODELS.register("cnn")
class CNN(ZooModel):
    """Configurable CNN (see the module docstring for the papers' uses).

    Options: ``channels`` (conv widths), ``kernel`` and ``stride`` (int or one per conv; padding
    k//2, i.e. "same" for odd k at stride 1), ``activation``/``slope`` (``make_activation``),
    ``batchnorm``, ``pool`` (max|avg|none after every conv, ``pool_size``×``pool_size`` stride
    ``pool_size``), ``conv_dropout`` (after every conv block), ``hidden`` (dense widths before the
    classifier), ``dropout`` (after every hidden dense layer), ``init``/``sigma`` (as the MLP).
    """

    def __init__(self, input_shape, num_classes, channels: Sequence[int] = (32, 64, 64), kernel=5, stride=1,
                 activation="tanh", slope=0.01, batchnorm=False, pool="max", pool_size=2, conv_dropout=0.0,
                 hidden: Sequence[int] = (), dropout=0.0, init="default", sigma=0.05):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; valid choices: {', '.join(POOLS)}")
        channels = [int(c) for c in channels]
        kernels = _per_layer(kernel, len(channels), "kernel")
        strides = _per_layer(stride, len(channels), "stride")
        in_ch = int(input_shape[0])
        blocks, micro, macro = [], [], []
        for i, (c, k, s) in enumerate(zip(channels, kernels, strides)):
            layers: "OrderedDict[str, nn.Module]" = OrderedDict()
            layers["conv"] = nn.Conv2d(in_ch, c, k, stride=s, padding=k // 2)
            init_layer(layers["conv"], init, sigma)
            if batchnorm:
                layers["bn"] = nn.BatchNorm2d(c)
            layers["act"] = make_activation(activation, slope)
            micro.append(f"features.{i}.act")
            if pool != "none":
                layers["pool"] = (nn.MaxPool2d if pool == "max" else nn.AvgPool2d)(pool_size)
            macro.append(f"features.{i}.{'pool' if pool != 'none' else 'act'}")
            if conv_dropout:
                layers["drop"] = nn.Dropout(conv_dropout)
            blocks.append(nn.Sequential(layers))
            in_ch = c
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        was_training = self.features.training
        self.features.eval()
        with torch.no_grad():  # flattened size for this input shape
            width = self.features(torch.zeros(1, *input_shape)).numel()
        self.features.train(was_training)
        dense = []
        for j, h in enumerate(int(h) for h in hidden):
            layers = OrderedDict()
            layers["fc"] = nn.Linear(width, h)
            init_layer(layers["fc"], init, sigma)
            if batchnorm:
                layers["bn"] = nn.BatchNorm1d(h)
            layers["act"] = make_activation(activation, slope)
            micro.append(f"hidden.{j}.act")
            macro.append(f"hidden.{j}.act")
            if dropout:
                layers["drop"] = nn.Dropout(dropout)
            dense.append(nn.Sequential(layers))
            width = h
        self.hidden = nn.Sequential(*dense)
        self.classifier = nn.Linear(width, num_classes)
        init_layer(self.classifier, init, sigma)
        self._points = {"micro": micro, "macro": macro}

    def forward(self, x):
        return self.classifier(self.hidden(self.flatten(self.features(x))))

    def structure(self) -> Structure:
        """Stage ``features``: [conv → (BN) → φ → (pool) → (dropout)] blocks, then flatten; stage
        ``hidden``: [Linear → (BN) → φ → (dropout)] blocks; head: the classifier."""
        return sequential_structure(self)


class SfaMnistOptions(ModelOptions):
    names: ClassVar[tuple[str, ...]] = ("sfa_mnist",)

    dropout: float = opt(0.5, "dropout before the classifier (sfa §7.1)", ge=0, lt=1)
    # sfa-2's stand-in runs this net with Model 2's variance-preserving forward init (sfa §5.4)
    init: Literal[WEIGHT_INITS] = opt("default", "weight init: default (torch) | gaussian (σ) | xavier | kaiming | lecun (sfa §5.1)")
    sigma: float = opt(0.05, "gaussian init std", gt=0)

@MODELS.register("sfa_mnist")
class SfaMnist(CNN):
    """The MNIST network of Moskovitz et al. 2018 (sfa), Supplementary Section 7.2, Table 2, used in
    sfa-1 (Table 1, MNIST column). At 28×28×1 (convs padded "same", which the table leaves open;
    with it the dense layer sees 7×7×64, as in the TensorFlow MNIST tutorial net it matches):

    =====  =================================  ====================  ====================
    layer  Table 2                            module                output
    =====  =================================  ====================  ====================
    1      5×5 conv. 32 ReLU                  features.0.conv/act   32×28×28 (micro)
    2      2×2 max-pool stride 2              features.0.pool       32×14×14 (macro)
    3      5×5 conv. 64 ReLU                  features.1.conv/act   64×14×14 (micro)
    4      2×2 max-pool stride 2              features.1.pool       64×7×7 (macro)
    5      1024 dense ReLU                    hidden.0.fc/act       1024 (micro, macro)
    --     dropout p=0.5 (sfa §7.1, layer 5)  hidden.0.drop
    6      10-way softmax                     classifier            10 (output layer)
    =====  =================================  ====================  ====================

    Options: ``dropout`` (0.5, sfa §7.1); ``init``, ``sigma`` (as the CNN's). The input shape comes
    from the data (any H×W works).
    """

    def __init__(self, input_shape, num_classes, dropout=0.5, init="default", sigma=0.05):
        super().__init__(input_shape, num_classes, channels=(32, 64), kernel=5, activation="relu",
                         pool="max", pool_size=2, hidden=(1024,), dropout=dropout, init=init, sigma=sigma)
