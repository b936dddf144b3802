"""The CIFAR-10 and ImageNet networks of Moskovitz et al. 2018 (sfa), Supplementary Tables 2–3.

The MNIST net of Table 2 is ``sfa_mnist`` in :mod:`bench.models.cnn`. Convolutions are padded
k//2 ("same" at stride 1), which the tables leave open; with it the all-convolutional models end
at exactly the global-average-pooling sizes the tables give (8×8 at 32×32, 4×4 at 299×299).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from bench.models.base import MODELS, ZooModel
from bench.models.cnn import CNN, init_layer
from bench.models.structure import Block, Stage, Step, Structure, named_steps
from bench.options import WEIGHT_INITS, ClassVar, Literal, ModelOptions, opt


class SfaLeNetOptions(ModelOptions):
    names: ClassVar[tuple[str, ...]] = ("sfa_cifar1", "sfa_imagenet1")

    init: Literal[WEIGHT_INITS] = opt("default", "weight init: default (torch) | gaussian (σ) | xavier | kaiming | lecun (sfa §5.1)")
    sigma: float = opt(0.05, "gaussian init std", gt=0)


class SfaAllConvOptions(SfaLeNetOptions):
    names: ClassVar[tuple[str, ...]] = ("sfa_cifar2", "sfa_imagenet2")

    input_dropout: float = opt(0.2, "dropout on the input (sfa §7.1)", ge=0, lt=1)
    dropout: float = opt(0.5, "dropout after the downsampling convs (sfa §7.1)", ge=0, lt=1)

@MODELS.register("sfa_cifar1")
class SfaCifar1(CNN):
    """sfa CIFAR-10 Model 1 (Table 2, LeNet-style), trained on 24×24×3 random crops:

    =====  ==========================  ====================  =================
    layer  Table 2                     module                output (24×24 in)
    =====  ==========================  ====================  =================
    1      5×5 conv. 64 ReLU           features.0.conv/act   64×24×24 (micro)
    2      2×2 max-pool stride 2       features.0.pool       64×12×12 (macro)
    3      5×5 conv. 64 ReLU           features.1.conv/act   64×12×12 (micro)
    4      2×2 max-pool stride 2       features.1.pool       64×6×6 (macro)
    5      384 dense ReLU              hidden.0.fc/act       384 (micro, macro)
    6      192 dense ReLU              hidden.1.fc/act       192 (micro, macro)
    7      10-way softmax              classifier            10 (output layer)
    =====  ==========================  ====================  =================

    Option ``init`` (as the MLP/CNN: default | gaussian | xavier | kaiming | lecun), ``sigma``.
    """

    def __init__(self, input_shape, num_classes, init="default", sigma=0.05):
        super().__init__(input_shape, num_classes, channels=(64, 64), kernel=5, activation="relu",
                         pool="max", pool_size=2, hidden=(384, 192), init=init, sigma=sigma)


@MODELS.register("sfa_imagenet1")
class SfaImagenet1(CNN):
    """sfa ImageNet Model 1 (Table 3), 299×299×3 input:

    =====  ==============================  ====================  ===================
    layer  Table 3                         module                output (299×299 in)
    =====  ==============================  ====================  ===================
    1      9×9 conv. 192 ReLU stride 2     features.0.conv/act   192×150×150 (micro)
    2      2×2 max-pool stride 2           features.0.pool       192×75×75 (macro)
    3      5×5 conv. 192 ReLU stride 2     features.1.conv/act   192×38×38 (micro)
    4      2×2 max-pool stride 2           features.1.pool       192×19×19 (macro)
    5      512 dense ReLU                  hidden.0.fc/act       512 (micro, macro)
    6      512 dense ReLU                  hidden.1.fc/act       512 (micro, macro)
    7      1000-way softmax                classifier            1000 (output layer)
    =====  ==============================  ====================  ===================
    """

    def __init__(self, input_shape, num_classes, init="default", sigma=0.05):
        super().__init__(input_shape, num_classes, channels=(192, 192), kernel=[9, 5], stride=[2, 2],
                         activation="relu", pool="max", pool_size=2, hidden=(512, 512), init=init, sigma=sigma)


# (out channels, kernel, stride) per conv of the all-convolutional nets (Springenberg et al. 2014);
# the last conv has num_classes channels.
ALLCONV_CIFAR = [(96, 3, 1), (96, 3, 1), (96, 3, 2), (192, 3, 1), (192, 3, 1), (192, 3, 2), (192, 3, 1), (192, 1, 1)]
ALLCONV_IMAGENET = [(192, 9, 4), (192, 3, 2), (192, 3, 3), (256, 5, 2), (256, 3, 1), (256, 3, 2), (512, 3, 1), (512, 1, 1)]


class SfaAllConv(ZooModel):
    """All-convolutional net: dropout(input) → [conv → ReLU (→ dropout after each stride-2/3
    "downsampling" conv)] × 8 → 1×1 conv to the classes → ReLU → global average pool → logits
    (softmax in the loss), as sfa Tables 2–3 list it (the ReLU before the pooling included).

    Feedback points: micro = every hidden conv's ReLU ``features.i.act`` (8); macro = the
    downsampling convs' outputs and the last hidden conv. The class conv is the output layer.
    """

    def __init__(self, input_shape, num_classes, spec, input_dropout=0.2, dropout=0.5, init="default", sigma=0.05):
        super().__init__()
        in_ch = int(input_shape[0])
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout else nn.Identity()
        blocks, micro, macro = [], [], []
        for i, (c, k, s) in enumerate(spec):
            layers: "OrderedDict[str, nn.Module]" = OrderedDict()
            layers["conv"] = nn.Conv2d(in_ch, c, k, stride=s, padding=k // 2)
            init_layer(layers["conv"], init, sigma)
            layers["act"] = nn.ReLU()
            micro.append(f"features.{i}.act")
            if s > 1 or i == len(spec) - 1:
                macro.append(f"features.{i}.act")
            if s > 1 and dropout:
                layers["drop"] = nn.Dropout(dropout)
            blocks.append(nn.Sequential(layers))
            in_ch = c
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(in_ch, num_classes, 1)
        init_layer(self.classifier, init, sigma)
        self.out_act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._points = {"micro": micro, "macro": macro}

    def forward(self, x):
        out = self.out_act(self.classifier(self.features(self.input_dropout(x))))
        return torch.flatten(self.pool(out), 1)

    def structure(self) -> Structure:
        """pre: input dropout; stage ``features``: [conv → ReLU → (dropout)] blocks; head: the class
        conv, its ReLU, the global average pool and the flatten."""
        role = "dropout" if isinstance(self.input_dropout, nn.Dropout) else "other"
        blocks = [Block(f"features.{i}", named_steps(f"features.{i}", b)) for i, b in enumerate(self.features)]
        head = Block("classifier", [Step("classifier", "layer", self.classifier), Step("out_act", "act", self.out_act),
                                    Step("pool", "pool", self.pool),
                                    Step("pool", "flatten", lambda x: torch.flatten(x, 1))])
        return Structure(pre=[Step("input_dropout", role, self.input_dropout)], stages=[Stage("features", blocks)],
                         head=head, points=dict(self._points))


@MODELS.register("sfa_cifar2")
class SfaCifar2(SfaAllConv):
    """sfa CIFAR-10 Model 2 (Table 2), all-convolutional, 32×32×3 input; dropout 0.2 on the input
    and 0.5 after the downsampling layers 3 and 6 (sfa §7.1):

    =====  ===============================  =====================  ==========
    layer  Table 2                          module                 output
    =====  ===============================  =====================  ==========
    1      3×3 conv. 96 ReLU                features.0             96×32×32
    2      3×3 conv. 96 ReLU                features.1             96×32×32
    3      3×3 conv. 96 ReLU stride 2       features.2 (+drop)     96×16×16
    4      3×3 conv. 192 ReLU               features.3             192×16×16
    5      3×3 conv. 192 ReLU               features.4             192×16×16
    6      3×3 conv. 192 ReLU stride 2      features.5 (+drop)     192×8×8
    7      3×3 conv. 192 ReLU               features.6             192×8×8
    8      1×1 conv. 192 ReLU               features.7             192×8×8
    9      1×1 conv. 10 ReLU                classifier, out_act    10×8×8
    10     global average pooling (8×8)     pool                   10
    11     10-way softmax                   (in the loss)
    =====  ===============================  =====================  ==========
    """

    def __init__(self, input_shape, num_classes, input_dropout=0.2, dropout=0.5, init="default", sigma=0.05):
        super().__init__(input_shape, num_classes, ALLCONV_CIFAR, input_dropout, dropout, init, sigma)


@MODELS.register("sfa_imagenet2")
class SfaImagenet2(SfaAllConv):
    """sfa ImageNet Model 2 (Table 3), the all-convolutional net scaled to 299×299×3:

    =====  ===============================  =====================  ===========
    layer  Table 3                          module                 output
    =====  ===============================  =====================  ===========
    1      9×9 conv. 192 ReLU stride 4      features.0             192×75×75
    2      3×3 conv. 192 ReLU stride 2      features.1 (+drop)     192×38×38
    3      3×3 conv. 192 ReLU stride 3      features.2 (+drop)     192×13×13
    4      5×5 conv. 256 ReLU stride 2      features.3 (+drop)     256×7×7
    5      3×3 conv. 256 ReLU stride 1      features.4             256×7×7
    6      3×3 conv. 256 ReLU stride 2      features.5 (+drop)     256×4×4
    7      3×3 conv. 512 ReLU stride 1      features.6             512×4×4
    8      1×1 conv. 512 ReLU stride 1      features.7             512×4×4
    9      1×1 conv. 1000 ReLU stride 1     classifier, out_act    1000×4×4
    10     global average pooling (4×4)     pool                   1000
    11     1000-way softmax                 (in the loss)
    =====  ===============================  =====================  ===========

    The paper gives no dropout for this net; ``dropout`` (default 0) follows every strided conv
    when set, ``input_dropout`` (default 0) the input, as in CIFAR Model 2.
    """

    def __init__(self, input_shape, num_classes, input_dropout=0.0, dropout=0.0, init="default", sigma=0.05):
        super().__init__(input_shape, num_classes, ALLCONV_IMAGENET, input_dropout, dropout, init, sigma)
