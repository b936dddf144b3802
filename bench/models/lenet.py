"""LeNet-4 (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based learning applied to document
recognition", Proc. IEEE 86(11), §III.C.7), the shallow CNN of GrAPE Table 1 (grape-1).

LeCun et al.: "LeNet-4 … contains 4 first-level feature maps, followed by eight subsampling maps
connected in pairs to each first-layer feature maps, then 16 feature maps, followed by 16
subsampling maps, followed by a fully connected layer with 120 units, followed by the output
layer (10 units)", on 28×28 digits centred in a 32×32 field. Here, at an H×W input:

=====  ====================================  ============================  ==================
layer  LeNet-4                                module                        output at 28×28×1
=====  ====================================  ============================  ==================
C1     5×5 conv, 4 maps (input padded to 32)  features.0.conv (pad 2)       4×28×28, tanh (micro)
S2     2×2 subsampling                        features.0.pool (average)     4×14×14 (macro)
C3     5×5 conv, 16 maps                      features.1.conv               16×10×10, tanh (micro)
S4     2×2 subsampling                        features.1.pool (average)     16×5×5 (macro)
F5     120 units                              hidden.0.fc / act             120, tanh (micro, macro)
out    10 units                               classifier                    output layer
=====  ====================================  ============================  ==================

Simplifications, recorded: S2's "eight subsampling maps connected in pairs" and C3's partial
connection table are replaced by plain 2×2 average pooling and a fully connected C3 (as GrAPE,
which builds on BioTorch, gives no connection table either); the subsampling layers have no
trainable coefficient; tanh throughout. The first conv is padded by (32 − H)/2 (2 for 28×28, 0 for
32×32 CIFAR), so every input is seen as LeCun's 32×32 field.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from bench.models.activations import make_activation
from bench.models.base import MODELS, ZooModel
from bench.models.cnn import init_layer
from bench.options import ACTIVATIONS, WEIGHT_INITS, ClassVar, Literal, ModelOptions, opt


class LeNet4Options(ModelOptions):
    names: ClassVar[tuple[str, ...]] = ("lenet4",)

    activation: Literal[ACTIVATIONS] = opt("tanh", "nonlinearity φ (LeCun et al. 1998: a scaled tanh)")
    pool: Literal["avg", "max"] = opt("avg", "subsampling: avg (LeNet's) | max")
    init: Literal[WEIGHT_INITS] = opt("default", "weight init (as the MLP's)")
    sigma: float = opt(0.05, "gaussian init std", gt=0)


@MODELS.register("lenet4")
class LeNet4(ZooModel):
    """LeNet-4; layer table and simplifications in the module docstring."""

    def __init__(self, input_shape, num_classes, activation="tanh", pool="avg", init="default", sigma=0.05):
        super().__init__()
        c, h = int(input_shape[0]), int(input_shape[1])
        pad = max(0, (32 - h) // 2)
        pooling = nn.AvgPool2d if pool == "avg" else nn.MaxPool2d
        blocks = []
        for i, (c_in, c_out, p) in enumerate(((c, 4, pad), (4, 16, 0))):
            layers = OrderedDict(conv=nn.Conv2d(c_in, c_out, 5, padding=p), act=make_activation(activation, 0.01),
                                 pool=pooling(2))
            init_layer(layers["conv"], init, sigma)
            blocks.append(nn.Sequential(layers))
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        with torch.no_grad():
            width = self.features(torch.zeros(1, *input_shape)).numel()
        fc = OrderedDict(fc=nn.Linear(width, 120), act=make_activation(activation, 0.01))
        init_layer(fc["fc"], init, sigma)
        self.hidden = nn.Sequential(nn.Sequential(fc))
        self.classifier = nn.Linear(120, num_classes)
        init_layer(self.classifier, init, sigma)
        self._points = {"micro": ["features.0.act", "features.1.act", "hidden.0.act"],
                        "macro": ["features.0.pool", "features.1.pool", "hidden.0.act"]}

    def forward(self, x):
        return self.classifier(self.hidden(self.flatten(self.features(x))))
