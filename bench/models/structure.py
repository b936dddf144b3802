"""The zoo's structure view: each model says what its stages, blocks and inner layers are.

Rules that run a model piece by piece (rec-LRA's regions, target propagation's layers,
equilibrium propagation's energy) ask ``model.structure()`` instead of walking the modules
themselves, so the knowledge of a model's layout — timm's included — lives next to the model,
in ``bench/models/``, and nowhere else.

A :class:`Structure` is a small tree, input to output:

* ``pre``: steps before the first block (flatten, input dropout, embeddings);
* ``stages``: named groups of :class:`Block` s (a ResNet stage, a CNN's conv part), each with
  optional ``exit`` steps run after its last block (the flatten between conv and dense parts);
* ``head``: the block holding the output layer (the classifier, and the pooling before it);
* ``points``: the model's feedback points, ``{"micro": [...], "macro": [...]}``;
* ``aside``: blocks with weights that the forward does not run (trained by a rule's own losses).

A :class:`Block` is a list of :class:`Step` s, each a named module (or, where the model's forward
applies a function, a named function) with a *role*: ``layer`` (the weight layer: Linear, Conv2d,
LocallyConnected2d, PseudoConv2d, or their feedback-converted twins), ``norm``, ``act``, ``pool``,
``dropout``, ``flatten`` or ``other``. A plain block runs its steps in order. A
:class:`ResidualBlock` (He et al. 2016's basic block) exposes its inner steps —
``inner`` (conv1 → bn1 → drop_block), ``act1``, ``mid`` (the anti-aliasing / downsampling slot),
``outer`` (conv2 → bn2 → se → drop_path, plus the shortcut) and ``act2`` — so a rule can stop
between them; ``tests/test_structure.py`` checks that they compose to the block's own forward.
An ``opaque`` block (a transformer block, timm's ConvMlp) lists its inner layers for reading but
runs as its module.

The view is computed on each call from the model's current submodules, so it names the
converted layers after a feedback rule replaced them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

ROLES = ("layer", "norm", "act", "pool", "dropout", "flatten", "shortcut", "other")


@dataclass
class Step:
    """One piece of a forward pass: ``name`` is its dotted module name in the model (for a
    functional step, the module whose forward applies it), ``fn`` the module or the function."""

    name: str
    role: str
    fn: Callable[[torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown step role {self.role!r}; valid choices: {', '.join(ROLES)}")

    @property
    def module(self) -> nn.Module | None:
        return self.fn if isinstance(self.fn, nn.Module) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def run(steps: list[Step], x: torch.Tensor) -> torch.Tensor:
    for step in steps:
        x = step(x)
    return x


@dataclass
class Block:
    """A block of steps run in order: ``before`` the layer (pooling into a classifier), the
    ``layer``, its ``norms``, the activation ``act``, then ``post`` (pooling, dropout, ...)."""

    name: str
    steps: list[Step]
    kind: str = "plain"

    def _index(self, role: str) -> int | None:
        return next((i for i, s in enumerate(self.steps) if s.role == role), None)

    @property
    def layers(self) -> list[Step]:
        """Every weight layer of the block (one for a plain block)."""
        return [s for s in self.steps if s.role == "layer"]

    @property
    def layer(self) -> nn.Module:
        i = self._index("layer")
        if i is None or len(self.layers) != 1:
            raise ValueError(f"block {self.name!r} ({self.kind}) has {len(self.layers)} weight layers, not one")
        return self.steps[i].fn

    @property
    def layer_name(self) -> str:
        return self.steps[self._index("layer")].name

    @property
    def before(self) -> list[Step]:
        return self.steps[: self._index("layer")]

    @property
    def norms(self) -> list[nn.Module]:
        """Norms between the layer and the activation (all norms when there is no activation)."""
        start, end = self._index("layer") + 1, self._index("act")
        return [s.fn for s in self.steps[start:end] if s.role == "norm"]

    @property
    def _act_step(self) -> Step | None:
        i = self._index("act")
        return None if i is None else self.steps[i]

    @property
    def act(self) -> nn.Module | None:
        step = self._act_step
        return None if step is None else step.fn

    @property
    def act_name(self) -> str | None:
        step = self._act_step
        return None if step is None else step.name

    @property
    def post(self) -> list[Step]:
        """Steps after the activation (after the layer and its norms when there is none)."""
        i = self._index("act")
        if i is None:
            i = max(k for k, s in enumerate(self.steps) if s.role in ("layer", "norm"))
        return self.steps[i + 1:]

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """h: every step before the activation (the layer and its norms)."""
        return run(self.steps[: self._index("act")], x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run(self.steps, x)


@dataclass
class ResidualBlock(Block):
    """He et al.'s basic block as timm builds it (``timm.models.resnet.BasicBlock``):

        h1 = drop_block(bn1(conv1(x)));  z1 = act1(h1);  a = aa(z1)
        h2 = drop_path(se(bn2(conv2(a)))) + shortcut(x);  z2 = act2(h2)

    ``module`` is the block; ``steps`` list its pieces (roles as above, ``shortcut`` for the
    projection) for reading. The inner steps are methods so a rule can stop between them.
    """

    module: nn.Module = None
    kind: str = "basic"

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """h of the block's inner map: drop_block(bn1(conv1(x)))."""
        b = self.module
        return b.drop_block(b.bn1(b.conv1(x)))

    @property
    def act1(self) -> nn.Module:
        return self.module.act1

    @property
    def act2(self) -> nn.Module:
        return self.module.act2

    def mid(self, z1: torch.Tensor) -> torch.Tensor:
        """The anti-aliasing slot between act1 and conv2 (pResNet's downsampling pool)."""
        return self.module.aa(z1)

    @property
    def shortcut(self) -> nn.Module | None:
        """The projection shortcut (1×1 conv + BN), or None for the identity."""
        return self.module.downsample

    def outer(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """h of the block's output: drop_path(se(bn2(conv2(a)))) + shortcut(x), before act2."""
        b = self.module
        h = b.bn2(b.conv2(a))
        if b.se is not None:
            h = b.se(h)
        if b.drop_path is not None:
            h = b.drop_path(h)
        return h + (b.downsample(x) if b.downsample is not None else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.outer(self.mid(self.act1(self.inner(x))), x))


@dataclass
class OpaqueBlock(Block):
    """A block whose forward is its module's (a pre-LN transformer block, timm's ConvMlp); its
    ``steps`` list the inner layers for reading only."""

    module: nn.Module = None
    kind: str = "opaque"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@dataclass
class Stage:
    name: str
    blocks: list[Block]
    exit: list[Step] = field(default_factory=list)  # steps after the last block (flatten)


@dataclass
class Structure:
    pre: list[Step]
    stages: list[Stage]
    head: Block
    points: dict[str, list[str]]
    # trained blocks off the forward path (Associated Learning's lower bridges and g's)
    aside: list[Block] = field(default_factory=list)

    @property
    def blocks(self) -> list[Block]:
        """Every block, input to output, the head last."""
        return [b for s in self.stages for b in s.blocks] + [self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward, piece by piece (equal to ``model(x)``; tested)."""
        x = run(self.pre, x)
        for stage in self.stages:
            for block in stage.blocks:
                x = block.forward(x)
            x = run(stage.exit, x)
        return self.head.forward(x)

    def chain(self) -> tuple[list[Step], list[Block]]:
        """A sequential net as (input steps, blocks): every block plain, a stage's exit steps
        appended to its last block's steps. Raises ValueError for any other layout."""
        blocks: list[Block] = []
        for stage in self.stages:
            for block in stage.blocks:
                if block.kind != "plain":
                    raise ValueError(f"block {block.name!r} is a {block.kind} block, not a plain "
                                     "[layer → (norm) → activation] block")
                blocks.append(Block(block.name, list(block.steps)))
            if stage.exit:
                if not blocks:
                    raise ValueError(f"stage {stage.name!r} has exit steps but no block")
                blocks[-1].steps += stage.exit
        if self.head.kind != "plain":
            raise ValueError(f"the head {self.head.name!r} is a {self.head.kind} block")
        return list(self.pre), blocks + [self.head]


def structure_of(model: nn.Module) -> Structure:
    """``model.structure()``, or a ValueError naming the model when it has no structure view."""
    get = getattr(model, "structure", None)
    if get is None:
        raise ValueError(f"{type(model).__name__} is not a zoo model (it has no structure view)")
    return get()


def named_steps(prefix: str, container: nn.Module, roles: dict[str, str] | None = None) -> list[Step]:
    """Steps of a ``nn.Sequential`` built from an OrderedDict whose keys name the roles
    (``SEQ_ROLES``: ``conv`` is a layer, ``bn`` a norm, ...); an unknown key is an ``other`` step."""
    roles = SEQ_ROLES if roles is None else roles
    return [Step(f"{prefix}.{key}", roles.get(key, "other"), module) for key, module in container.named_children()]


def typed_steps(prefix: str, container: nn.Module, layer_types: tuple[type, ...]) -> list[Step]:
    """Steps of a ``nn.Sequential`` of index-named children, roles read from the module types."""
    return [Step(f"{prefix}.{key}" if prefix else key, role_of(module, layer_types), module)
            for key, module in container.named_children()]


def role_of(module: nn.Module, layer_types: tuple[type, ...]) -> str:
    if isinstance(module, layer_types):
        return "layer"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
        return "norm"
    if isinstance(module, nn.Dropout):
        return "dropout"
    if isinstance(module, nn.Flatten):
        return "flatten"
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return "pool"
    return "act"


def split_blocks(steps: list[Step]) -> list[Block]:
    """Group a flat list of steps into plain blocks, one per weight layer, each named after its
    layer: a block starts at its layer (or at the non-layer steps right before the first one,
    which become that block's ``before``) and takes every step up to the next layer."""
    blocks: list[Block] = []
    pending: list[Step] = []
    for step in steps:
        if step.role == "layer":
            blocks.append(Block(step.name, pending + [step]))
            pending = []
        elif blocks:
            blocks[-1].steps.append(step)
        else:
            pending.append(step)
    if pending or not blocks:
        raise ValueError("a block needs a weight layer")
    return blocks


def sequential_structure(model: nn.Module, pre: list[Step] | None = None) -> Structure:
    """The zoo's ``features`` (+ ``flatten``) (+ ``hidden``) + ``classifier`` layout (cnn, lcnet,
    lenet4): ``features.i`` and ``hidden.j`` are ``nn.Sequential`` s whose keys name the roles
    (:data:`SEQ_ROLES`)."""
    stages = [Stage("features", [Block(f"features.{i}", named_steps(f"features.{i}", b))
                                 for i, b in enumerate(model.features)],
                    exit=[Step("flatten", "flatten", model.flatten)])]
    hidden = getattr(model, "hidden", None)
    if hidden is not None and len(hidden):
        stages.append(Stage("hidden", [Block(f"hidden.{j}", named_steps(f"hidden.{j}", b)) for j, b in enumerate(hidden)]))
    head = Block("classifier", [Step("classifier", "layer", model.classifier)])
    return Structure(pre=list(pre or []), stages=stages, head=head, points=dict(model._points))



def pool_stages(prefix: str, blocks: list[Block]) -> list[Stage]:
    """Group blocks into stages, each closed by a block whose steps end in pooling (VGG, AlexNet)."""
    stages: list[Stage] = []
    current: list[Block] = []
    for block in blocks:
        current.append(block)
        if block.steps[-1].role == "pool":
            stages.append(Stage(f"{prefix}.stage{len(stages)}", current))
            current = []
    if current:
        stages.append(Stage(f"{prefix}.stage{len(stages)}", current))
    return stages


# Roles of the zoo's own OrderedDict keys (cnn, lcnet, sfa nets)
SEQ_ROLES = {"conv": "layer", "fc": "layer", "lc": "layer", "bn": "norm", "ln": "norm", "act": "act",
             "pool": "pool", "drop": "dropout"}
