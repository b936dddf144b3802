"""AlexNet (Krizhevsky et al. 2012), as trained on CIFAR-100 in GrAPE Table 2 (grape-2).

GrAPE builds on BioTorch, whose AlexNet is torchvision's, but it does not say how it fed 32×32
CIFAR images to it (torchvision's AlexNet needs at least 63×63: at 32×32 its third max-pool gets a
1×1 map and fails). So two variants exist here:

* ``cifar=False`` (default): ``torchvision.models.alexnet`` exactly ("one weird trick" variant,
  ImageNet size, 224×224 input), with the first conv rebuilt when the input is not RGB.
* ``cifar=True``: a standard small AlexNet for 32×32 inputs. It keeps AlexNet's 5 conv + 3 fc
  layers, the torchvision channel widths and the torchvision module indices (so the feedback
  points have the same names), but uses 3×3 convs; conv1 has stride 2, then three 2×2 max-pools:
  32 → 16 → 8 → 4 → 2, giving 256·2·2 = 1024 features into the fully connected block.
  Layer by layer at 32×32×3:

  ======  ====================================  ==================
  idx     layer                                 output
  ======  ====================================  ==================
  f0      3×3 conv 64, stride 2, pad 1          64×16×16
  f1      ReLU                                  (micro)
  f2      2×2 max-pool                          64×8×8 (macro)
  f3      3×3 conv 192, pad 1                   192×8×8
  f4      ReLU                                  (micro)
  f5      2×2 max-pool                          192×4×4 (macro)
  f6-7    3×3 conv 384, pad 1, ReLU             384×4×4 (micro)
  f8-9    3×3 conv 256, pad 1, ReLU             256×4×4 (micro)
  f10-11  3×3 conv 256, pad 1, ReLU             256×4×4 (micro)
  f12     2×2 max-pool                          256×2×2 (macro)
  c0-2    dropout, fc ``fc_width``, ReLU        (micro)
  c3-5    dropout, fc ``fc_width``, ReLU        (micro, macro)
  c6      fc num_classes                        output layer
  ======  ====================================  ==================

Options: ``cifar`` (False), ``dropout`` (0.5, both variants, as torchvision), ``fc_width``
(4096, the AlexNet width; only used with ``cifar=True``).

Feedback points, both variants (names under ``net.``):
  * micro: every ReLU (5 conv + 2 fc = 7);
  * macro: the three conv stages as AlexNet groups them, closed by their max-pools
    (``features.2``, ``features.5``, ``features.12``), then the fc block (``classifier.5``).
All ReLUs are non-inplace (see ``timm_models`` for why).
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from bench.models.base import MODELS, ZooModel
from bench.models.structure import Stage, Step, Structure, pool_stages, split_blocks, typed_steps
from bench.models.timm_models import disable_inplace
from bench.options import ClassVar, Literal, ModelOptions, opt


class CifarAlexNet(nn.Module):
    """The small AlexNet of the module docstring; module indices mirror torchvision's AlexNet."""

    def __init__(self, input_shape, num_classes, dropout=0.5, fc_width=4096):
        super().__init__()
        c = int(input_shape[0])
        self.features = nn.Sequential(
            nn.Conv2d(c, 64, kernel_size=3, stride=2, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        with torch.no_grad():  # flattened size for any input size ≥ 16×16
            n_flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(n_flat, fc_width), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(fc_width, fc_width), nn.ReLU(),
            nn.Linear(fc_width, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


class AlexNetOptions(ModelOptions):
    names: ClassVar[tuple[str, ...]] = ("alexnet",)

    cifar: bool = opt(False, "the 32×32 CIFAR variant instead of torchvision's 224×224 AlexNet")
    dropout: float = opt(0.5, "dropout in the classifier", ge=0, lt=1)
    fc_width: int = opt(4096, "cifar: width of the dense layers", ge=1)

@MODELS.register("alexnet")
class AlexNet(ZooModel):
    """AlexNet, torchvision (ImageNet) or small CIFAR variant; layer table, options and feedback
    points are in the module docstring (GrAPE Table 2)."""

    def __init__(self, input_shape, num_classes, cifar=False, dropout=0.5, fc_width=4096):
        super().__init__()
        if cifar:
            self.net = CifarAlexNet(input_shape, num_classes, dropout=dropout, fc_width=fc_width)
        else:
            self.net = torchvision.models.alexnet(weights=None, num_classes=num_classes, dropout=dropout)
            if input_shape[0] != 3:  # e.g. grayscale: same conv1 geometry, other input channels
                self.net.features[0] = nn.Conv2d(int(input_shape[0]), 64, kernel_size=11, stride=4, padding=2)
        disable_inplace(self.net)
        relus = [f"net.features.{i}" for i, m in enumerate(self.net.features) if isinstance(m, nn.ReLU)]
        relus += [f"net.classifier.{i}" for i, m in enumerate(self.net.classifier) if isinstance(m, nn.ReLU)]
        pools = [f"net.features.{i}" for i, m in enumerate(self.net.features) if isinstance(m, nn.MaxPool2d)]
        self._points = {"micro": relus, "macro": pools + ["net.classifier.5"]}

    def forward(self, x):
        return self.net(x)

    def structure(self) -> Structure:
        """Conv stages closed by their max-pools, then (average pool and) flatten; stage
        ``net.classifier``: [(dropout) → Linear → ReLU] blocks (the dropout runs before its
        Linear); head: the last Linear."""
        net = self.net
        stages = pool_stages("net.features", split_blocks(typed_steps("net.features", net.features, (nn.Conv2d,))))
        if isinstance(net, CifarAlexNet):
            stages[-1].exit = [Step("net.flatten", "flatten", net.flatten)]
        else:  # torchvision: avgpool, then torch.flatten in its forward
            stages[-1].exit = [Step("net.avgpool", "pool", net.avgpool),
                               Step("net", "flatten", lambda x: torch.flatten(x, 1))]
        dense = split_blocks(typed_steps("net.classifier", net.classifier, (nn.Linear,)))
        return Structure(pre=[], stages=[*stages, Stage("net.classifier", dense[:-1])], head=dense[-1],
                         points=dict(self._points))
