"""Typed options: the one declaration mechanism for every config key, and its validator.

Every key a run can have is a field of an :class:`Options` dataclass with a type, a default, an
optional range or set of choices, and a one-line description:

* the sections every run has (the top-level keys, ``trainer``, ``data``, ``probe``, ``guard``,
  ``output`` and the optimiser keys every rule shares) are declared here;
* each rule declares its own options next to its class, in its ``bench/algorithms/<family>.py``
  file, as a subclass of :class:`AlgorithmOptions` whose ``names`` lists the rules it serves;
* each zoo model declares its options next to its class in ``bench/models/``, as a subclass of
  :class:`ModelOptions`.

Config errors must be one line, exit status 2, within two seconds and before torch is imported
(importing torch and Lightning costs 10–20 s on a small machine). The rule and model files import
torch, so the validator does not import them: :func:`declared` reads their ``*Options`` classes
from the source with :mod:`ast` and executes only those class bodies, in a namespace that holds
this module's names. An options class may therefore use only literals and the names exported
here (``opt``, ``Literal``, ``ClassVar``, the base classes and other ``*Options`` classes); a class
that needs anything else fails the test suite (``tests/test_options.py``), never a user's run.
When a rule module *is* imported (inside a run), its real class replaces the scanned copy; both
come from the same source text, so they cannot disagree.

Types a field may have: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]`` (the choices),
``list[int | float | str]`` and any of these ``| None``. Ranges: ``ge``/``gt``/``le``/``lt``;
floats must be finite. Constraints between options (or between a rule and the model) go in
:meth:`Options.check`, which sees the whole composed config.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, ClassVar, Literal

PACKAGE = Path(__file__).resolve().parent
# Folders whose modules declare options next to their classes (scanned, never imported here).
DECLARING_PACKAGES = ("algorithms", "models", "data")


class ConfigError(ValueError):
    """A bad config. ``str()`` is one line meant for the user; the CLI exits with status 2."""


def opt(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None) -> Any:
    """A declared option: its default, a one-line description and an optional numeric range
    (applied to a number, or to every element of a list of numbers)."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


# (section, name) -> declaring class. A scanned copy never replaces an imported class.
_REGISTRY: dict[tuple[str, str], type] = {}
_SCANNING = False


class Options:
    """Base of every declaration. Subclasses become dataclasses automatically, so a declaration
    is a plain class body of ``name: type = opt(default, "description", ...)`` lines."""

    section: ClassVar[str] = ""
    names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(cls)
        for name in cls.__dict__.get("names", ()):
            key = (cls.section, name)
            if _SCANNING:
                _REGISTRY.setdefault(key, cls)
            else:
                _REGISTRY[key] = cls

    def check(self, cfg: Any) -> None:
        """Constraints between options, or between these options and the rest of the config
        (``cfg``, the composed DictConfig). Raise :class:`ConfigError` with one line. A subclass
        checks only its own options: :meth:`check_all` runs every class's ``check`` (no ``super()``)."""

    def check_all(self, cfg: Any) -> None:
        """Every ``check`` of the declaration's class hierarchy, base first, each once."""
        for klass in reversed(type(self).__mro__):
            if "check" in vars(klass):
                vars(klass)["check"](self, cfg)

    @classmethod
    def specs(cls) -> dict[str, "Spec"]:
        hints = typing.get_type_hints(cls, globalns=_namespace(), localns=None)
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            out[f.name] = Spec(f"{cls.section}.{f.name}" if cls.section else f.name, hints[f.name], default,
                               f.metadata.get("doc", ""), {k: f.metadata.get(k) for k in ("ge", "gt", "le", "lt")})
        return out

    @classmethod
    def from_config(cls, section: Any) -> "Options":
        """An instance from a composed (already validated) config section."""
        from omegaconf import DictConfig, OmegaConf

        values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclasses.dataclass(frozen=True)
class Spec:
    """One declared key, as the validator and ``bench options`` see it."""

    path: str
    type: Any
    default: Any
    doc: str
    bounds: dict

    @property
    def nullable(self) -> bool:
        return _is_optional(self.type)

    def type_text(self) -> str:
        return _type_text(self.type)

    def allowed(self) -> str:
        """What the key accepts, in words (for error lines and the option tables)."""
        base = _strip_optional(self.type)
        if typing.get_origin(base) is Literal:
            text = "one of " + ", ".join(map(str, typing.get_args(base)))
        else:
            text = _type_text(base)
            rng = _range_text(self.bounds)
            if rng:
                text += (" with every element " if typing.get_origin(base) is list else " ") + rng
        return text + (" or null" if self.nullable else "")

    def coerce(self, value: Any) -> Any:
        """``value`` converted to this key's type and checked; a one-line ConfigError otherwise."""
        if value is None:
            if self.nullable:
                return None
            self._fail(value)
        base = _strip_optional(self.type)
        try:
            out = _convert(base, value)
        except (TypeError, ValueError):
            self._fail(value)
        for element in (out if isinstance(out, list) else [out]):
            if isinstance(element, float) and not math.isfinite(element):
                self._fail(value)
            if isinstance(element, (int, float)) and not isinstance(element, bool) and not _in_range(element, self.bounds):
                self._fail(value)
        return out

    def _fail(self, value: Any) -> typing.NoReturn:
        shown = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig" else value
        allowed = self.allowed()
        allowed = allowed.replace("one of ", "valid choices: ", 1) if allowed.startswith("one of ") else f"expected {allowed}"
        raise ConfigError(f"{self.path}={shown!r} is not valid; {allowed}" + (f" ({self.doc})" if self.doc else ""))


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, _UnionType) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if _is_optional(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return tp


_UnionType = type(int | None)


def _type_text(tp: Any) -> str:
    if _is_optional(tp):
        return _type_text(_strip_optional(tp)) + " | null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    if origin is list:
        return f"list[{_type_text(typing.get_args(tp)[0])}]"
    if origin in (typing.Union, _UnionType):
        return " | ".join(_type_text(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _range_text(bounds: dict) -> str:
    parts = [f"{sym} {bounds[k]:g}" for k, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
             if bounds.get(k) is not None]
    return " and ".join(parts)


def _in_range(x: float, bounds: dict) -> bool:
    checks = {"ge": lambda b: x >= b, "gt": lambda b: x > b, "le": lambda b: x <= b, "lt": lambda b: x < b}
    return all(checks[k](b) for k, b in bounds.items() if b is not None)


def _convert(tp: Any, value: Any) -> Any:
    """YAML and the command line give strings, ints and lists; convert to ``tp`` or raise."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, (int, float, bool)) and str(value).lower() == str(choice).lower()):
                return choice
        raise ValueError(value)
    if origin is list:
        if isinstance(value, str) or not hasattr(value, "__iter__") or isinstance(value, dict):
            raise TypeError(value)
        if type(value).__name__ == "DictConfig":
            raise TypeError(value)
        (element,) = typing.get_args(tp)
        return [_convert(element, v) for v in value]
    if origin in (typing.Union, _UnionType):
        for member in typing.get_args(tp):
            try:
                return _convert(member, value)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise TypeError(value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise TypeError(value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        raise TypeError(value)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError(value)
    raise TypeError(f"unsupported option type {tp!r}")


# --------------------------------------------------------------------------- shared choices
# Names that several declarations use, defined once here (torch-free) and imported by the modules
# that implement them, so the choices a config accepts are the ones the code builds.
ACTIVATIONS = ("tanh", "relu", "elu", "sigmoid", "sign", "abs", "leaky_relu", "identity")
WEIGHT_INITS = ("default", "gaussian", "xavier", "kaiming", "lecun")
FEEDBACK_INITS = ("gaussian", "xavier", "kaiming", "uniform")
# Rules that replace every Linear/Conv2d's backward by a feedback tensor (bench/feedback/replaced.py):
# they cannot train a weight shared by two layers (a tied embedding and output head).
REPLACED_BACKWARD_RULES = ("fa", "usf_init", "usf_sn", "ss", "kp", "wm", "dense_fa")


# --------------------------------------------------------------------------- the shared sections

class RunOptions(Options):
    """Top-level keys."""

    seed: int = opt(0, "seed of the run (weights, feedback draws, data order)", ge=0)
    table: str | None = opt(None, "table id, set by `bench run table=…` (null for a free-standing run)")
    row: str | None = opt(None, "table row of the run")
    column: str | None = opt(None, "table column of the run")
    budget: str | None = opt(None, "budget name; the budget's values land in the sections below")
    variant: str | None = opt(None, "set by compose: hash of a table run's non-neutral overrides (its own run folder)")


class AlgorithmOptions(Options):
    """What every rule shares: the optimiser, the schedule and update re-projection. A rule with
    options of its own subclasses this next to its class and lists its rule names in ``names``."""

    section: ClassVar[str] = "algorithm"

    name: str = opt("bp", "the rule (configs/algorithm/<name>.yaml)")
    optimizer: Literal["adam", "adamw", "sgd"] = opt("adam", "the optimiser that applies the rule's update")
    lr: float = opt(1.0e-3, "learning rate (0 freezes the weights)", ge=0)
    weight_decay: float = opt(0.0, "L2 weight decay of the optimiser", ge=0)
    momentum: float = opt(0.0, "SGD momentum", ge=0, lt=1)
    betas: list[float] = opt([0.9, 0.999], "Adam's (β₁, β₂)", ge=0, lt=1)
    scheduler: Literal["none", "step", "multistep", "plateau", "noam"] = opt(
        "none", "learning-rate schedule; noam = lr·d_model^-0.5·min(t^-0.5, t·warmup^-1.5) per step (Vaswani et al. 2017)")
    step_size: int = opt(30, "step: epochs between decays", ge=1)
    gamma: float = opt(0.1, "step/multistep/plateau: learning-rate decay factor", gt=0, le=1)
    milestones: list[int] = opt([], "multistep: the epochs at which the learning rate decays", ge=1)
    patience: int = opt(5, "plateau: epochs without validation-loss improvement", ge=0)
    max_grad_norm: float | None = opt(None, "update re-projection Nm(Δ, c) per tensor (rec-LRA appendix); null = off", gt=0)
    eps: float = opt(1.0e-8, "Adam/AdamW ε (Launay et al. 2020's language model: 1e-9)", gt=0)
    clip_grad_norm: float | None = opt(None, "clip the global norm of all updates before the step (Launay et al. 2020's LM: 0.5); null = off", gt=0)
    warmup: int = opt(4000, "noam: warmup steps (Launay et al. 2020's LM: 4000)", ge=1)
    granularity: Literal["micro", "macro"] = opt(
        "micro", "feedback points used by direct-projection rules and the probe: micro = after every "
                 "nonlinearity, macro = after every block")

    def check(self, cfg: Any) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"algorithm.betas={list(self.betas)!r} is not valid; expected two values (β₁, β₂)")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ConfigError(f"algorithm.milestones={list(self.milestones)!r} is not valid; expected increasing epochs")


class ModelOptions(Options):
    """Base of the zoo models' declarations (next to each model class in ``bench/models/``)."""

    section: ClassVar[str] = "model"

    name: str = opt("mlp", "the zoo model (configs/model/<name>.yaml)")


class DataOptions(Options):
    """Every dataset's keys; ``configs/data/<name>.yaml`` holds a dataset's differences."""

    section: ClassVar[str] = "data"
    names: ClassVar[tuple[str, ...]] = ("*",)

    name: str = opt("fmnist", "the dataset (configs/data/<name>.yaml)")
    root: str = opt("data", "folder holding (or receiving) the dataset files")
    batch_size: int = opt(32, "training batch size (global: split across DDP ranks)", ge=1)
    eval_batch_size: int = opt(1000, "batch size of validation and test", ge=1)
    val_size: int = opt(2000, "training samples held out for validation (0 = none, or the dataset's own split)", ge=0)
    train_subset: int | None = opt(None, "train on the first N training samples (after the validation split); null = all", ge=1)
    download: bool = opt(True, "download through torchvision when the files are absent")
    verify: bool = opt(True, "check the dataset files' checksums")
    augment: bool = opt(False, "training-time augmentation (random crop with padding and flips)")
    crop: int | None = opt(None, "S: train on random S×S crops, evaluate on the centre crop (sfa Table 2 CIFAR-10 Model 1: 24)", ge=1)
    normalize: Literal["none", "standard", "gcn_zca"] = opt(
        "none", "none | standard (per-channel mean/std) | gcn_zca (per-image GCN, then ZCA fitted on the training split)")
    num_workers: int = opt(4, "DataLoader workers for datasets read from disk (ImageNet)", ge=0)
    image_size: int = opt(224, "ImageNet: side of the centre crop", ge=1)
    shape: list[int] = opt([1, 28, 28], "synthetic: the input shape (C, H, W)", ge=1)
    num_classes: int = opt(10, "synthetic: the number of classes", ge=2)
    n_train: int = opt(2000, "synthetic: training samples", ge=1)
    n_test: int = opt(500, "synthetic: test samples", ge=1)
    seq_len: int = opt(64, "text: tokens per sequence, the context T (Launay et al. 2020: 128)", ge=1)
    vocab_size: int = opt(4096, "text: BPE vocabulary size, <eos> included (trained on the training split; Launay et al.: 32000)", ge=257)



def check_training_set(data: Any) -> None:
    """A synthetic training set (its sizes are all in the config) too small for one batch fails when
    a run is planned, before anything loads; computed tables use synthetic data without a
    validation split or batches, so this is not part of :class:`DataOptions`' own check."""
    if str(data.name) != "synthetic":
        return
    train = int(data.n_train) - int(data.val_size)
    if data.train_subset is not None:
        train = min(train, int(data.train_subset))
    if train < int(data.batch_size):
        raise ConfigError(f"data.n_train={data.n_train} leaves {train} training samples after data.val_size="
                          f"{data.val_size}, fewer than one batch (data.batch_size={data.batch_size})")


# Lightning's accepted values (lightning.fabric.connector; tests/test_options.py checks them against the
# installed Lightning), listed here so that a bad value fails before Lightning is imported.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true",
              "ddp_spawn_find_unused_parameters_true", "fsdp", "deepspeed", "single_device")
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", "64", "32", "16", "bf16")


class TrainerOptions(Options):
    section: ClassVar[str] = "trainer"
    names: ClassVar[tuple[str, ...]] = ("*",)

    name: str = opt("cpu", "the trainer preset (configs/trainer/<name>.yaml)")
    accelerator: Literal[ACCELERATORS] = opt("cpu", "Lightning accelerator")  # type: ignore[valid-type]
    devices: int = opt(1, "devices per node; -1 = all", ge=-1)
    num_nodes: int = opt(1, "nodes", ge=1)
    strategy: Literal[STRATEGIES] = opt("auto", "Lightning strategy (ddp for multi-process runs)")  # type: ignore[valid-type]
    precision: Literal[PRECISIONS] = opt("32-true", "Lightning precision; anything but fp32 is part of the config hash")  # type: ignore[valid-type]
    epochs: int = opt(1, "training epochs", ge=1)
    max_steps: int = opt(-1, "stop after this many optimizer steps; -1 = no limit", ge=-1)
    deterministic: bool = opt(False, "torch deterministic algorithms")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default", ge=0)
    pipeline: Literal["sequential", "pipelined"] = opt("sequential", "sequential: one process steps every component | pipelined: AL only, one worker per component group (bench/run/pipeline.py)")

    def check(self, cfg: Any) -> None:
        if self.devices == 0:
            raise ConfigError("trainer.devices=0 is not valid; expected a positive count or -1 (all)")
        if self.max_steps == 0:
            raise ConfigError("trainer.max_steps=0 is not valid; expected a positive count or -1 (no limit)")
        if self.pipeline == "pipelined" and str(cfg.algorithm.name) != "al":
            raise ConfigError(f"trainer.pipeline=pipelined runs the al rule only; algorithm.name={cfg.algorithm.name}")


class ProbeOptions(Options):
    section: ClassVar[str] = "probe"
    names: ClassVar[tuple[str, ...]] = ("*",)

    every: int = opt(100, "alignment probe interval in optimizer steps; 0 = off", ge=0)
    signals: bool = opt(True, "per-feedback-point teaching-signal angles (Launay Eq. 6)")
    sign_flips: bool = opt(False, "cumulative fraction of weights that changed sign since init (sfa Fig. 5), every step")


class GuardOptions(Options):
    section: ClassVar[str] = "guard"
    names: ClassVar[tuple[str, ...]] = ("*",)

    every: int = opt(1, "divergence check interval in steps (each check syncs the device); 0 = off", ge=0)


class OutputOptions(Options):
    section: ClassVar[str] = "output"
    names: ClassVar[tuple[str, ...]] = ("*",)

    root: str = opt("runs", "run folders live under here")
    progress: Literal["auto", "rich", "none"] = opt("auto", "progress bars: auto = rich on a terminal, none under CI")
    wandb: Literal["online", "offline", "disabled"] = opt("disabled", "Weights & Biases logging")
    checkpoint: bool = opt(True, "save last.ckpt every epoch (resume)")


SECTIONS: dict[str, type[Options]] = {"trainer": TrainerOptions, "data": DataOptions, "probe": ProbeOptions,
                                      "guard": GuardOptions, "output": OutputOptions}
GROUP_BASES: dict[str, type[Options]] = {"algorithm": AlgorithmOptions, "model": ModelOptions,
                                         "data": DataOptions, "trainer": TrainerOptions}


# --------------------------------------------------------------------------- finding declarations

def _namespace() -> dict:
    """What an options class body may use: this module's public names and the builtins."""
    import builtins

    ns = {k: v for k, v in globals().items() if not k.startswith("_")}
    ns.update({"__builtins__": builtins, "Literal": Literal, "ClassVar": ClassVar})
    ns.update({cls.__name__: cls for cls in {c for c in _REGISTRY.values()}})
    ns.update(_SCANNED_CLASSES)
    return ns


_SCANNED_CLASSES: dict[str, type] = {}
_SCANNED = False


def _options_classes(tree: ast.Module) -> list[ast.ClassDef]:
    return [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name.endswith("Options")
            and any(isinstance(b, ast.Name) and b.id.endswith("Options") for b in node.bases)]


def scan() -> None:
    """Execute the ``*Options`` class bodies of the declaring packages, without importing them."""
    global _SCANNED, _SCANNING
    if _SCANNED:
        return
    pending = []
    for package in DECLARING_PACKAGES:
        for path in sorted((PACKAGE / package).glob("*.py")):
            source = path.read_text()
            if "Options" not in source:
                continue
            for node in _options_classes(ast.parse(source, str(path))):
                pending.append((path, node.name, ast.get_source_segment(source, node)))
    _SCANNING = True
    try:
        while pending:  # bases may be declared in another file: retry until nothing resolves
            left = []
            for path, name, text in pending:
                ns = _namespace()
                ns["__name__"] = f"bench.options.scanned.{path.stem}"
                try:
                    exec(compile(text, str(path), "exec", dont_inherit=True), ns)  # noqa: S102 - the suite's own source
                except NameError:
                    left.append((path, name, text))
                    continue
                _SCANNED_CLASSES[name] = ns[name]
            if len(left) == len(pending):
                path, name, _ = left[0]
                raise RuntimeError(f"{path}: options class {name} uses a name the options namespace does not hold "
                                   f"(only bench.options' names and other *Options classes are allowed)")
            pending = left
    finally:
        _SCANNING = False
    _SCANNED = True


def declared(section: str, name: str) -> type[Options]:
    """The options class that serves ``name`` in ``section``; the section's base if none does."""
    if section in SECTIONS:
        return SECTIONS[section]
    if (section, name) not in _REGISTRY:
        scan()
    return _REGISTRY.get((section, name), GROUP_BASES[section])


def declarations(section: str) -> dict[str, type[Options]]:
    """Every declared name of a group section (``algorithm`` or ``model``) and its options class."""
    scan()
    return {name: cls for (sec, name), cls in sorted(_REGISTRY.items()) if sec == section}


# --------------------------------------------------------------------------- documentation

def option_table(cls: type[Options], own_only: bool = False) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) rows of a declaration; ``own_only`` leaves out what the
    section's base (e.g. the optimiser keys every rule shares) declares."""
    base = GROUP_BASES.get(cls.section)
    inherited = set(base.specs()) if (own_only and base is not None) else set()
    rows = []
    for key, spec in cls.specs().items():
        if key == "name" or key in inherited:
            continue
        default = "null" if spec.default is None else str(spec.default).lower() if isinstance(spec.default, bool) else str(spec.default)
        rng = _range_text(spec.bounds)
        rows.append((key, spec.type_text() + (f" ({rng})" if rng else ""), default, spec.doc))
    return rows


def format_options(rule: str) -> str:
    """What ``python -m bench options <rule>`` prints: every key of ``algorithm.*`` for that rule,
    its type and range, its default (after the rule's config file) and its description."""
    from bench.config import _load_yaml, group_choices, group_file

    if not group_file("algorithm", rule).exists():
        raise ConfigError(f"unknown algorithm {rule!r}; valid choices: {', '.join(group_choices('algorithm'))}")
    cls = declared("algorithm", rule)
    deltas = {k: v for k, v in _load_yaml(group_file("algorithm", rule)).items() if k != "name"}
    rows = [(k, t, str(deltas[k]).lower() if isinstance(deltas.get(k), bool) else str(deltas.get(k, d)), doc)
            for k, t, d, doc in option_table(cls)]
    widths = [max(len(r[i]) for r in rows + [("key", "type", "default", "")]) for i in range(3)]
    lines = [f"{rule}: options of {cls.__name__} (configs/algorithm/{rule}.yaml sets "
             f"{', '.join(f'{k}={v}' for k, v in deltas.items()) or 'no delta'})"]
    lines.append(f"  {'key':<{widths[0]}}  {'type':<{widths[1]}}  {'default':<{widths[2]}}  description")
    for key, tp, default, doc in rows:
        lines.append(f"  {key:<{widths[0]}}  {tp:<{widths[1]}}  {default:<{widths[2]}}  {doc}")
    return "\n".join(lines)


README_BEGIN = "<!-- rule-options:begin (generated by `python -m bench options --readme`; tests/test_options.py fails when stale) -->"
README_END = "<!-- rule-options:end -->"


def readme_block() -> str:
    """The README's rule-options table, generated from the declarations and the rule configs."""
    from bench.config import _load_yaml, group_choices, group_file

    lines = [README_BEGIN, "", "| rule | declared in | its own options (default) |", "|---|---|---|"]
    for rule in group_choices("algorithm"):
        cls = declared("algorithm", rule)
        deltas = {k: v for k, v in _load_yaml(group_file("algorithm", rule)).items() if k != "name"}
        own = [f"`{k}`={str(deltas.get(k, d)).lower() if isinstance(deltas.get(k), bool) else deltas.get(k, d)}"
               for k, _, d, _ in option_table(cls, own_only=True)]
        where = "`bench/options.py` (shared only)" if cls is AlgorithmOptions else f"`{cls.__name__}`"
        lines.append(f"| `{rule}` | {where} | {', '.join(own) or '—'} |")
    lines += ["", "Every rule also takes the shared optimiser keys (`python -m bench options bp`).", "", README_END]
    return "\n".join(lines)
