"""Fully connected networks of the papers (rlra Table 1: 5×256; dfa Table 2: 3×800)."""
from __future__ import annotations

import math

from torch import nn

from bench.models.activations import make_activation
from bench.models.base import MODELS, ZooModel
from bench.models.structure import Stage, Structure, split_blocks, typed_steps
from bench.options import ACTIVATIONS, WEIGHT_INITS, ClassVar, Literal, ModelOptions, opt


def init_linear(layer: nn.Linear, init: str, sigma: float) -> None:
    """``gaussian``: the papers' plain N(0, σ²) (rlra tunes σ in [0.025, 0.1]);
    ``xavier``: Glorot; ``kaiming``: He, N(0, 2/n_in) (the dfa paper's "He initialization");
    ``lecun``: N(0, 1/n_in) (sfa §5.1's forward variance 1/n_in); ``default``: torch's."""
    if init == "gaussian":
        nn.init.normal_(layer.weight, 0.0, sigma)
    elif init == "xavier":
        nn.init.xavier_normal_(layer.weight)
    elif init == "kaiming":
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    elif init == "lecun":  # variance 1/n_in
        nn.init.normal_(layer.weight, 0.0, 1.0 / math.sqrt(layer.in_features))
    elif init != "default":
        raise ValueError(f"unknown init {init!r}; valid choices: default, gaussian, xavier, kaiming, lecun")
    if init != "default" and layer.bias is not None:
        nn.init.zeros_(layer.bias)


class MLPOptions(ModelOptions):
    names: ClassVar[tuple[str, ...]] = ("mlp",)

    depth: int = opt(3, "hidden layers", ge=1)
    width: int = opt(800, "units per hidden layer", ge=1)
    activation: Literal[ACTIVATIONS] = opt("tanh", "hidden nonlinearity φ")
    slope: float = opt(0.01, "leaky_relu negative slope (any value; dfa-2 uses -0.5)")
    init: Literal[WEIGHT_INITS] = opt("default", "weight init: default (torch) | gaussian (σ) | xavier | kaiming | lecun (variance 1/n_in)")
    sigma: float = opt(0.05, "gaussian init std", gt=0)
    batchnorm: bool = opt(False, "BatchNorm1d before every hidden nonlinearity")
    dropout: float = opt(0.0, "dropout after every hidden layer", ge=0, lt=1)
    input_dropout: float = opt(0.0, "dropout on the input", ge=0, lt=1)

@MODELS.register("mlp")
class MLP(ZooModel):
    """x → [Linear → (BN) → φ → (dropout)] × depth → Linear → logits.

    Feedback points (micro and macro alike) are the post-activation outputs of the hidden layers.
    """

    def __init__(self, input_shape, num_classes, depth=3, width=800, activation="tanh", slope=0.01,
                 init="default", sigma=0.05, batchnorm=False, dropout=0.0, input_dropout=0.0):
        super().__init__()
        in_dim = math.prod(input_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout:
            layers.append(nn.Dropout(input_dropout))
        points = []
        for i in range(depth):
            lin = nn.Linear(in_dim if i == 0 else width, width)
            init_linear(lin, init, sigma)
            layers.append(lin)
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(make_activation(activation, slope))
            points.append(str(len(layers) - 1))
            if dropout:
                layers.append(nn.Dropout(dropout))
        out = nn.Linear(width if depth else in_dim, num_classes)
        init_linear(out, init, sigma)
        layers.append(out)
        self.net = nn.Sequential(*layers)
        self._points = {"micro": [f"net.{p}" for p in points], "macro": [f"net.{p}" for p in points]}

    def forward(self, x):
        return self.net(x)

    def structure(self) -> Structure:
        """pre = [Flatten, (input dropout)]; one stage ``net`` of [Linear → (BN) → φ → (dropout)]
        blocks; the head is the output Linear."""
        steps = typed_steps("net", self.net, (nn.Linear,))
        first = next(i for i, s in enumerate(steps) if s.role == "layer")
        blocks = split_blocks(steps[first:])
        return Structure(pre=steps[:first], stages=[Stage("net", blocks[:-1])], head=blocks[-1],
                         points=dict(self._points))
