"""timm ResNet-18 and VGG-16, with their feedback points.

Both are built with ``timm.create_model(..., pretrained=False)`` (never any downloaded weights)
and wrapped as ``self.net``, so every point and every convertible layer name starts with
``net.``. Conversions to FA-style layers therefore run on the real timm modules.

Why the ``inplace`` flags are cleared: timm builds ``nn.ReLU(inplace=True)``. Direct-projection
rules replace a point's output with a detached copy through the forward hook's return value; an
in-place activation would overwrite its input (the BN output) and the hooked tensor would alias
it. Clearing every ``inplace`` attribute costs a little memory and makes hooks safe.
"""
from __future__ import annotations

import timm
import torch.nn.functional as F
from timm.layers import ClassifierHead
from timm.models.resnet import BasicBlock
from timm.models.vgg import ConvMlp
from torch import nn

from bench.models.base import MODELS, ZooModel
from bench.models.structure import (Block, OpaqueBlock, ResidualBlock, Stage, Step, Structure, pool_stages,
                                    split_blocks, typed_steps)
from bench.options import ClassVar, Literal, ModelOptions, opt



def disable_inplace(module: nn.Module) -> None:
    """Turn off ``inplace`` on every submodule that has the flag (ReLU, Dropout, ...)."""
    for m in module.modules():
        if getattr(m, "inplace", False):
            m.inplace = False


class TimmResNetOptions(ModelOptions):
    names: ClassVar[tuple[str, ...]] = ("timm:resnet18",)

    cifar_stem: bool = opt(False, "3×3 stride-1 conv1 and no max-pool (the CIFAR ResNet-18)")
    drop_rate: float = opt(0.0, "dropout before the classifier (timm's drop_rate)", ge=0, lt=1)

@MODELS.register("timm:resnet18")
class TimmResNet18(ZooModel):
    """ResNet-18 (He et al. 2016) from timm; rlra-1/rlra-5 use ResNet-18-sized nets on CIFAR/ImageNet.

    Options:
      * ``cifar_stem`` (default False): replace the ImageNet stem (7×7 stride-2 conv + 3×3
        max-pool, a 4× downsampling) by a 3×3 stride-1 conv and no max-pool, the usual CIFAR
        ResNet-18 (e.g. kuangliu/pytorch-cifar, 11,173,962 parameters at 10 classes). At 32×32
        the ImageNet stem leaves 1×1 maps in layer4, which wastes most of the network.
      * ``drop_rate``: dropout before the classifier (timm's ``drop_rate``), default 0.

    Feedback points (timm ``BasicBlock`` uses two distinct activation modules, so each is called
    exactly once per forward):
      * micro: ``net.act1`` (stem), then ``net.layerX.Y.act1`` and ``net.layerX.Y.act2`` for every
        block (17 points);
      * macro: every residual block ``net.layerX.Y`` (8 points). A block's output equals its
        ``act2`` output (after the residual sum).
    The classifier ``net.fc`` is the output layer and never a point.
    """

    def __init__(self, input_shape, num_classes, cifar_stem=False, drop_rate=0.0):
        super().__init__()
        in_chans = int(input_shape[0])
        self.net = timm.create_model(
            "resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate
        )
        if cifar_stem:
            self.net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            # timm initialises ResNet convs with kaiming_normal_(fan_out, relu); keep that here.
            nn.init.kaiming_normal_(self.net.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.net.maxpool = nn.Identity()
        disable_inplace(self.net)
        self._points = resnet_points(self.net)

    def forward(self, x):
        return self.net(x)

    def structure(self) -> Structure:
        return resnet_structure(self.net, self._points)


class TimmVGGOptions(TimmResNetOptions):
    names: ClassVar[tuple[str, ...]] = ("timm:vgg16",)

    head_width: int = opt(512, "cifar_stem: width of the 512-512 dense head", ge=1)
    batchnorm: bool = opt(False, "BatchNorm after every conv (VGG-16-BN)")

@MODELS.register("timm:vgg16")
class TimmVGG16(ZooModel):
    """VGG-16 (Simonyan & Zisserman 2014) from timm; dfa-3 (Launay et al. 2019, Table 3) and
    grape-2 (GrAPE, Table 2, CIFAR-100) train it.

    timm's VGG-16 is 13 3×3 convs in 5 stages (each closed by a 2×2 max-pool), then ``pre_logits``
    = ``ConvMlp`` (a 7×7 conv 512→4096 and a 1×1 conv 4096→4096, both ReLU) and ``head.fc``.

    Options:
      * ``cifar_stem`` (default False). At 32×32 the features end at 512×1×1 and timm's ConvMlp
        *upsamples* that to 7×7 (``adaptive_avg_pool2d``) so its 7×7 kernel fits: it runs, but
        the 7×7 conv holds 102.8 M parameters that only ever see 49 copies of one vector. With
        ``cifar_stem=True`` we instead use the CIFAR VGG-16 head of Zagoruyko's "92.45% on
        CIFAR-10 in Torch" (two 512-wide fully connected layers + classifier). This keeps 16
        weight layers (13 conv + 3 fc), the defining depth of VGG-16. The hidden layers are 1×1
        convs (timm's own ``ConvMlp`` with ``kernel_size=1``), which at 1×1 maps is exactly a
        Linear layer, and the head keeps timm's global pooling for other input sizes. GrAPE does
        not say which head it used on CIFAR-100; this choice is recorded here.
      * ``head_width`` (default 512): hidden width of that CIFAR head (ignored otherwise).
      * ``batchnorm`` (default False): build ``vgg16_bn`` instead (BN after every conv). GrAPE
        reports a positive effect of BN.
      * ``drop_rate`` (default 0): dropout inside pre_logits and before the classifier.

    Feedback points:
      * micro: every ReLU of ``net.features`` (13), then ``net.pre_logits.act1``/``act2`` (2);
      * macro: the 5 max-pools closing each stage (``net.features.{4,9,16,23,30}`` without BN),
        then ``net.pre_logits`` as one block (the fully connected part before the classifier).
    """

    def __init__(self, input_shape, num_classes, cifar_stem=False, head_width=512, batchnorm=False,
                 drop_rate=0.0):
        super().__init__()
        in_chans = int(input_shape[0])
        name = "vgg16_bn" if batchnorm else "vgg16"
        # With the CIFAR head, timm's ConvMlp is thrown away: mlp_ratio=1/4096 builds it with a
        # 1-channel hidden layer so its 119 M parameters are never allocated (saves ~2 s).
        extra = {"mlp_ratio": 1 / 4096} if cifar_stem else {}
        self.net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                     drop_rate=drop_rate, **extra)
        if cifar_stem:
            self.net.pre_logits = ConvMlp(self.net.num_features, head_width, kernel_size=1, drop_rate=drop_rate)
            self.net.head = ClassifierHead(head_width, num_classes, pool_type="avg", drop_rate=drop_rate)
            self.net.head_hidden_size = head_width
        disable_inplace(self.net)
        features = self.net.features
        acts = [f"net.features.{i}" for i, m in enumerate(features) if isinstance(m, nn.ReLU)]
        pools = [f"net.features.{i}" for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
        micro = acts + ["net.pre_logits.act1", "net.pre_logits.act2"]
        self._points = {"micro": micro, "macro": pools + ["net.pre_logits"]}

    def forward(self, x):
        return self.net(x)

    def structure(self) -> Structure:
        """Five conv stages ([conv → (BN) → ReLU] blocks, each stage closed by its max-pool), then
        ``net.pre_logits`` (timm's ConvMlp: fc1 → act1 → drop → fc2 → act2, run as its module, which
        first resizes maps under 7×7) and the head (global pool → dropout → fc → flatten)."""
        net = self.net
        stages = pool_stages("net.features", split_blocks(typed_steps("net.features", net.features, (nn.Conv2d,))))
        mlp = net.pre_logits
        pre_logits = OpaqueBlock("net.pre_logits", [
            Step("net.pre_logits.fc1", "layer", mlp.fc1), Step("net.pre_logits.act1", "act", mlp.act1),
            Step("net.pre_logits.drop", "dropout", mlp.drop), Step("net.pre_logits.fc2", "layer", mlp.fc2),
            Step("net.pre_logits.act2", "act", mlp.act2)], module=mlp)
        head = net.head
        head_block = OpaqueBlock("net.head", [
            Step("net.head.global_pool", "pool", head.global_pool), Step("net.head.drop", "dropout", head.drop),
            Step("net.head.fc", "layer", head.fc), Step("net.head.flatten", "flatten", head.flatten)], module=head)
        return Structure(pre=[], stages=[*stages, Stage("net.pre_logits", [pre_logits])], head=head_block,
                         points=dict(self._points))


__all__ = ["TimmResNet18", "TimmVGG16", "disable_inplace", "resnet_structure"]


def resnet_structure(net: nn.Module, points: dict[str, list[str]]) -> Structure:
    """The structure of a timm ResNet of basic blocks (``ResNet.forward_features``/``forward_head``
    of timm 1.0): a stem block conv1 → bn1 → act1 → maxpool, stages ``net.layer1…4`` of
    :class:`ResidualBlock` s, and the head global_pool → (dropout at ``drop_rate``) → fc."""
    stem = Block("net.conv1", [Step("net.conv1", "layer", net.conv1), Step("net.bn1", "norm", net.bn1),
                               Step("net.act1", "act", net.act1), Step("net.maxpool", "pool", net.maxpool)])
    stages = [Stage("net.stem", [stem])]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks = []
        for i, blk in enumerate(getattr(net, stage)):
            name = f"net.{stage}.{i}"
            if not isinstance(blk, BasicBlock):
                raise ValueError(f"the ResNet structure view covers basic blocks; {name} is {type(blk).__name__}")
            steps = [Step(f"{name}.conv1", "layer", blk.conv1), Step(f"{name}.bn1", "norm", blk.bn1),
                     Step(f"{name}.drop_block", "dropout", blk.drop_block), Step(f"{name}.act1", "act", blk.act1),
                     Step(f"{name}.aa", "other" if isinstance(blk.aa, nn.Identity) else "pool", blk.aa),
                     Step(f"{name}.conv2", "layer", blk.conv2), Step(f"{name}.bn2", "norm", blk.bn2)]
            steps += [Step(f"{name}.{k}", "other", getattr(blk, k)) for k in ("se", "drop_path")
                      if getattr(blk, k) is not None]
            if blk.downsample is not None:
                steps.append(Step(f"{name}.downsample", "shortcut", blk.downsample))
            steps.append(Step(f"{name}.act2", "act", blk.act2))
            blocks.append(ResidualBlock(name, steps, module=blk))
        stages.append(Stage(f"net.{stage}", blocks))
    head = [Step("net.global_pool", "pool", net.global_pool)]
    if net.drop_rate:
        head.append(Step("net", "dropout", lambda x: F.dropout(x, p=float(net.drop_rate), training=net.training)))
    head.append(Step("net.fc", "layer", net.fc))
    return Structure(pre=[], stages=stages, head=Block("net.fc", head), points=dict(points))


def resnet_points(net: nn.Module) -> dict[str, list[str]]:
    """Feedback points of a timm ResNet layout (basic blocks, stages layer1…layer4): micro after the
    stem and after each block's two activations, macro at each block's output."""
    blocks = [f"net.{stage}.{i}" for stage in ("layer1", "layer2", "layer3", "layer4")
              for i in range(len(getattr(net, stage)))]
    micro = ["net.act1"]
    for b in blocks:
        micro += [f"{b}.act1", f"{b}.act2"]
    return {"micro": micro, "macro": blocks}
