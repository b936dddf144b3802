"""The zoo's structure view (bench/models/structure.py): every registered model describes its
stages, blocks and inner layers truthfully, and the package dependency runs one way.

Models come from ``tests/test_models.py``'s ``CASES`` (every name in ``MODELS``), so a new model
is checked here without being listed.
"""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from test_models import CASES, batch, build

from bench.feedback.replaced import FeedbackLayer, convert_to_feedback
from bench.models.structure import OpaqueBlock, ResidualBlock, Step, Structure

MODELS_DIR = Path(__file__).resolve().parent.parent / "bench" / "models"


def all_steps(view: Structure) -> list[Step]:
    return [*view.pre, *(s for st in view.stages for b in st.blocks for s in b.steps),
            *(s for st in view.stages for s in st.exit), *view.head.steps]


@pytest.mark.parametrize("name,shape,ncls,opts", CASES)
def test_structure_runs_as_the_model(name, shape, ncls, opts):
    """Pre, stages (blocks, exits) and head, run piece by piece, give the model's logits bit for bit."""
    model = build(name, shape, ncls, opts)
    x = batch(name, shape, ncls)
    with torch.no_grad():
        assert torch.equal(model.structure().forward(x), model(x))


@pytest.mark.parametrize("name,shape,ncls,opts", CASES)
def test_structure_names_real_modules_and_every_point(name, shape, ncls, opts):
    model = build(name, shape, ncls, opts)
    view = model.structure()
    modules = dict(model.named_modules())
    steps = all_steps(view)
    for step in steps:  # a module step is the module of that name
        if step.module is not None:
            assert modules[step.name] is step.module, step.name
    # every weight of the model sits in some step (no layer hidden from the view)
    # (a functional step is named after the module whose weights it applies)
    covered = {id(p) for s in steps for p in (s.module or modules.get(s.name, torch.nn.Module())).parameters()}
    covered |= {id(p) for b in [*view.blocks, *view.aside] if isinstance(b, (ResidualBlock, OpaqueBlock))
                for p in b.module.parameters()}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    assert missing == [], missing
    names = {s.name for s in steps} | {b.name for b in view.blocks}
    for g in ("micro", "macro"):
        assert [p for p in view.points[g] if p not in names] == [], g
    assert view.head.layers, "the head holds the output layer"


@pytest.mark.parametrize("name", ["timm:resnet18", "presnet18"])
def test_residual_blocks_compose_to_timms_forward(name):
    """inner → act1 → mid → outer(+shortcut) → act2 is timm's BasicBlock.forward, block by block,
    in train mode too (BatchNorm on batch statistics, dropout-free blocks)."""
    shape = (3, 16, 16)
    opts = {"cifar_stem": True} if name == "timm:resnet18" else {"masks": 4}
    model = build(name, shape, 10, opts)
    blocks = [b for b in model.structure().blocks if isinstance(b, ResidualBlock)]
    assert len(blocks) == 8 and sum(b.shortcut is not None for b in blocks) == 3
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        x = model.net.act1(model.net.bn1(model.net.conv1(x)))
        for b in blocks:
            nn_out = b.module(x)
            mine = b.act2(b.outer(b.mid(b.act1(b.inner(x))), x))
            assert torch.equal(mine, nn_out), b.name
            x = nn_out
    aa = "pool" if name == "presnet18" else "other"  # pResNet downsamples in timm's aa slot
    assert [s.role for s in blocks[2].steps] == ["layer", "norm", "dropout", "act", aa, "layer", "norm",
                                                  "shortcut", "act"]


@pytest.mark.parametrize("name,shape,ncls,opts", [c for c in CASES if c[0] in ("mlp", "cnn", "timm:resnet18")])
def test_structure_follows_conversion(name, shape, ncls, opts):
    """The view is read from the current modules: after FA conversion its layers are the twins."""
    model = copy.deepcopy(build(name, shape, ncls, opts))
    converted = convert_to_feedback(model)
    view = model.structure()
    layers = {s.name: s.fn for s in all_steps(view) if s.role == "layer"}
    assert layers and set(layers) <= set(converted)
    assert all(isinstance(m, FeedbackLayer) for m in layers.values())


def test_lcnet_blocks_by_hand():
    model = build("lcnet", (3, 8, 8), 4, dict(channels=[2, 3], kernel=3, stride=1, batchnorm=True, dropout=0.1))
    view = model.structure()
    assert [st.name for st in view.stages] == ["features"]
    assert [[(s.name, s.role) for s in b.steps] for b in view.stages[0].blocks] == [
        [(f"features.{i}.lc", "layer"), (f"features.{i}.bn", "norm"), (f"features.{i}.act", "act"),
         (f"features.{i}.drop", "dropout")] for i in range(2)]
    assert [s.name for s in view.stages[0].exit] == ["flatten"] and view.head.layer is model.classifier
    pre, blocks = view.chain()
    assert pre == [] and [b.act_name for b in blocks] == ["features.0.act", "features.1.act", None]
    assert [s.name for s in blocks[1].post] == ["features.1.drop", "flatten"]


def test_opaque_and_residual_layouts_are_not_chains():
    for name, shape, opts in (("timm:resnet18", (3, 16, 16), {"cifar_stem": True}),
                              ("transformer", (8,), dict(n_layer=1, n_head=2, n_embd=8))):
        with pytest.raises(ValueError, match="not a plain"):
            build(name, shape, 10, opts).structure().chain()


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_models_never_import_feedback_or_rules():
    """The dependency runs one way: bench.feedback (and the rules) import the zoo, never the reverse
    (imports inside functions included)."""
    files = sorted(MODELS_DIR.glob("*.py"))
    assert len(files) >= 10
    bad = {f.name: m for f in files for m in _imports(f)
           if m.split(".")[:2] in (["bench", "feedback"], ["bench", "algorithms"])}
    assert bad == {}
