"""Config loading, merging, validation and run naming (OmegaConf).

A run's config is merged, in order, from:

1. the declared defaults of every key (:mod:`bench.options`: the shared sections, and the options
   the chosen rule and model declare next to their classes);
2. the group files chosen by ``algorithm.name``, ``model.name``, ``data.name``, ``trainer.name``
   (each holds only what differs from the declared defaults);
3. the table's ``common`` block, then the row, then the column (``configs/tables/<id>.yaml``);
4. the budget: ``configs/budget/<name>.yaml``, then the table's and the row's per-budget deltas;
5. dotlist overrides from the command line (``algorithm.lr=1e-4 seed=3``).

Validation happens before anything is built, and before torch is imported: every layer is checked
against the declarations, so a typo in a key, a value of the wrong type, a value outside its range
or choices, or options that contradict each other fail with a one-line :class:`ConfigError` naming
the key, the value and what is allowed.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from bench.options import GROUP_BASES, SECTIONS, ConfigError, RunOptions, declared

CONFIG_DIR = Path(os.environ.get("BENCH_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))
GROUPS = ("algorithm", "model", "data", "trainer")
RUN_KEYS = ("table", "row", "column", "budget")
# A budget file holds these keys; anything else in a budget block must be a config section.
BUDGET_KEYS = {"name": str, "epochs": int, "train_subset": int, "seeds": int}
# Overrides that change where or how fast a run goes, never what it computes: they do not make
# a table run a different variant (and so a different run folder).
NEUTRAL_PREFIXES = ("seed=", "output.", "probe.", "guard.", "trainer.threads=", "trainer.name=",
                    "trainer.accelerator=", "algorithm.compile=")
# Lightning's names for full fp32. Any other precision (bf16-mixed, 16-mixed, 64-true) computes other
# numbers, so it is part of the config hash and gives a table run its own variant folder; fp32 stays
# out of the hash so every fp32 run keeps the folder and hash it had before precision counted.
FP32_PRECISIONS = ("32-true", "32")
TABLE_KEYS = {"id", "title", "paper", "metric", "columns", "common", "rows", "budgets", "notes", "decisions", "compute", "figure"}
# Row keys that are not config sections. ``columns``: the row runs only in these columns (the
# paper reports it for those alone, e.g. rlra-5's skip-gap rows on CIFAR-10); ``cited``: where the
# row's paper numbers come from when the paper quotes them from other work.
ROW_META_KEYS = {"paper", "budgets", "note", "cited", "columns"}


def row_columns(table: DictConfig, row: str) -> list[str]:
    """The columns a row runs in: its ``columns:`` list, or every column of the table."""
    only = table.rows[row].get("columns")
    return list(table.columns) if only is None else [str(c) for c in only]


class CellNotInTable(ConfigError):
    """A row/column pair the table does not run (the row's ``columns:`` leaves the column out).
    A W&B grid is a full cross product, so its agents ask for such pairs; ``bench run`` answers
    with one line and exit status 0, so the sweep does not record a failure."""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def group_file(group: str, name: str) -> Path:
    return CONFIG_DIR / group / f"{name.replace(':', '-')}.yaml"


def group_choices(group: str) -> list[str]:
    files = sorted((CONFIG_DIR / group).glob("*.yaml"))
    if group == "model":  # model names may contain ':' (timm:resnet18); files use '-'
        return sorted(OmegaConf.load(f).get("name", f.stem) for f in files)
    return [f.stem for f in files]


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - re-raised as one line naming the file
        raise ConfigError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at its top level")
    return cfg


# --------------------------------------------------------------------------- tables

def table_ids() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "tables").glob("*.yaml"))


def trained_table_ids() -> list[str]:
    """Tables whose cells are runs (sweeps cover these); the rest are computed from the models."""
    return [t for t in table_ids() if "compute" not in _load_yaml(CONFIG_DIR / "tables" / f"{t}.yaml")]


def load_spec(folder: str, kind: str, spec_id: str, allowed: set[str], required: tuple[str, ...]) -> DictConfig:
    """``configs/<folder>/<spec_id>.yaml`` (a table, a leaderboard workload), its keys checked: one
    line for an unknown id, an unknown or missing key, or an id that is not the file name."""
    path = CONFIG_DIR / folder / f"{spec_id}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in (CONFIG_DIR / folder).glob("*.yaml"))
        raise ConfigError(f"unknown {kind} {spec_id!r}; valid choices: {', '.join(choices)}")
    spec = _load_yaml(path)
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"{kind} {spec_id}: unknown key {sorted(unknown)[0]!r}; valid keys: {', '.join(sorted(allowed))}")
    for key in required:
        if key not in spec:
            raise ConfigError(f"{kind} {spec_id}: missing key {key!r}")
    if spec.id != spec_id:
        raise ConfigError(f"{kind} file {path.name} declares id {spec.id!r}; it must equal the file name")
    return spec


def load_table(table_id: str) -> DictConfig:
    table = load_spec("tables", "table", table_id, TABLE_KEYS, ("id", "title", "columns", "rows"))
    for row, spec in table.rows.items():
        for column in (spec.get("columns") or []):
            if column not in table.columns:
                raise ConfigError(f"table {table_id} row {row!r}: columns names {column!r}, which is not a column; "
                                  f"valid choices: {', '.join(map(repr, table.columns))}")
    return table


def resolve_name(kind: str, given: str, names: Iterable[str], table_id: str) -> str:
    """Rows/columns are addressed by exact name or by slug (``rlra-tanh`` for ``"rLRA, tanh"``)."""
    names = list(names)
    for n in names:
        if given == n or slug(given) == slug(n):
            return n
    raise ConfigError(f"unknown {kind} {given!r} of table {table_id}; valid choices: {', '.join(map(repr, names))}")


def row_sections(row: DictConfig) -> DictConfig:
    return OmegaConf.create({k: v for k, v in row.items() if k not in ROW_META_KEYS})


def budget_layer(block: Any, where: str) -> tuple[DictConfig, dict]:
    """Split a budget block into config sections and the budget scalars (epochs, subset, seeds)."""
    block = OmegaConf.create(block or {})
    scalars, sections = {}, {}
    for key, value in block.items():
        if key in BUDGET_KEYS:
            scalars[key] = value
        else:
            sections[key] = value
    layer = OmegaConf.create(sections)
    if scalars.get("epochs") is not None:
        layer = OmegaConf.merge(layer, {"trainer": {"epochs": scalars["epochs"]}})
    if "train_subset" in scalars:
        layer = OmegaConf.merge(layer, {"data": {"train_subset": scalars["train_subset"]}})
    return layer, scalars


def budget_names() -> list[str]:
    return group_choices("budget")


def table_budget(table: DictConfig, budget: str, row: DictConfig | None = None,
                 column: DictConfig | None = None) -> tuple[list[DictConfig], dict]:
    """The layers a budget adds to a run, and its scalars (seeds, epochs) after table deltas
    (a column's ``budgets`` block, e.g. a stand-in dataset for that column only, comes last)."""
    if budget not in budget_names():
        raise ConfigError(f"unknown budget {budget!r}; valid choices: {', '.join(budget_names())}")
    layers, scalars = [], {}
    blocks = [(_load_yaml(group_file("budget", budget)), f"budget/{budget}.yaml")]
    if table is not None:
        blocks.append(((table.get("budgets") or {}).get(budget), f"table {table.id} budgets.{budget}"))
        if row is not None:
            blocks.append(((row.get("budgets") or {}).get(budget), f"row budgets.{budget}"))
        if column is not None:
            blocks.append(((column.get("budgets") or {}).get(budget), f"column budgets.{budget}"))
    for block, where in blocks:
        layer, sc = budget_layer(block, where)
        layers.append(layer)
        scalars.update({k: v for k, v in sc.items() if v is not None or k == "train_subset"})
    return layers, scalars


# --------------------------------------------------------------------------- validation

def _spec_tree(names: dict[str, str]) -> dict:
    """Every declared key of a run whose groups are ``names``: top-level keys and one dict per section."""
    tree: dict = dict(RunOptions.specs())
    for section in ("algorithm", "model", *SECTIONS):
        cls = declared(section, names.get(section, ""))
        tree[section] = cls.specs()
    return tree


def _defaults(tree: dict, names: dict[str, str]) -> DictConfig:
    out: dict = {}
    for key, spec in tree.items():
        if isinstance(spec, dict):
            out[key] = {k: s.default for k, s in spec.items()}
            if "name" in spec and key in names:
                out[key]["name"] = names[key]
        else:
            out[key] = spec.default
    return OmegaConf.create(out)


def check_layer(tree: dict, layer: Any, prefix: str = "") -> DictConfig:
    """Check ``layer`` against the declared keys; return it with every value converted and checked."""
    out = {}
    for key, value in (layer or {}).items():
        path = f"{prefix}{key}"
        if key not in tree:
            section = prefix.rstrip(".") or "the top level"
            shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
            raise ConfigError(
                f"unknown key {path}={shown!r}; valid keys of {section}: {', '.join(sorted(map(str, tree.keys())))}"
            )
        spec = tree[key]
        if isinstance(spec, dict):
            if not isinstance(value, (dict, DictConfig)):
                raise ConfigError(f"{path}: expected a section, got {value!r}")
            out[key] = check_layer(spec, value, f"{path}.")
        else:
            out[key] = spec.coerce(value)
    return OmegaConf.create(out)


def check_constraints(cfg: DictConfig) -> None:
    """The declarations' cross-option checks (``Options.check``), on the composed config."""
    RunOptions.from_config({k: cfg[k] for k in RunOptions.specs()}).check(cfg)
    for section in ("algorithm", "model", *SECTIONS):
        declared(section, str(cfg[section].get("name", ""))).from_config(cfg[section]).check_all(cfg)


# --------------------------------------------------------------------------- composition

KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_cli(args: Iterable[str]) -> tuple[dict, list[str]]:
    """Split ``key=value`` arguments into run keys (table, row, column, budget) and a dotlist.

    W&B agents pass ``--key=value``; the leading dashes are accepted too.
    """
    run, dotlist = {}, []
    for arg in args:
        arg = arg.lstrip("-")
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        if not KEY_PATTERN.match(key):
            raise ConfigError(f"bad key {key!r} in {arg!r}; expected dotted names such as algorithm.lr=1e-4")
        if key in RUN_KEYS:
            run[key] = value
        else:
            dotlist.append(f"{key}={value}")
    return run, dotlist


def compose(table: str | None = None, row: str | None = None, column: str | None = None,
            budget: str | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Resolve and validate one run's config. Raises :class:`ConfigError` on any problem."""
    overrides = list(overrides)
    for override in overrides:
        parse_cli([override])  # the key syntax, also for callers that pass a dotlist directly
    layers: list[tuple[str, Any]] = []
    table_cfg = row_cfg = None
    if table is not None:
        table_cfg = load_table(table)
        if row is None or column is None:
            raise ConfigError(f"table {table}: a run needs row=… and column=…")
        row = resolve_name("row", row, table_cfg.rows.keys(), table)
        column = resolve_name("column", column, table_cfg.columns.keys(), table)
        row_cfg = table_cfg.rows[row]
        if column not in row_columns(table_cfg, row):
            raise CellNotInTable(f"table {table} row {row!r} runs only in column(s) {', '.join(row_columns(table_cfg, row))}, "
                              f"not {column!r}")
        layers += [
            (f"table {table} common", table_cfg.get("common")),
            (f"table {table} row {row!r}", row_sections(row_cfg)),
            (f"table {table} column {column!r}", row_sections(table_cfg.columns[column])),
        ]
    elif row is not None or column is not None:
        raise ConfigError("row=/column= need table=")
    if budget is not None:
        budget_layers, _ = table_budget(table_cfg, budget, row_cfg, table_cfg.columns[column] if table_cfg else None)
        layers += [(f"budget {budget}", layer) for layer in budget_layers]
    try:
        cli = OmegaConf.from_dotlist(overrides)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot parse overrides {overrides}: {str(exc).splitlines()[0]}") from exc
    layers.append(("command line", cli))
    # A table run with overrides that change the computation is a variant of the row: it gets its
    # own folder, so it never skips or resumes the plain row's run.
    variant = sorted(o for o in overrides if not _is_neutral(o))
    variant_id = hashlib.sha1("\n".join(variant).encode()).hexdigest()[:8] if (table and variant) else None
    layers.append(("run keys", {"table": table, "row": row, "column": column, "budget": budget, "variant": variant_id}))

    # Group names can come from any layer, so find them first, then load their files.
    names = {group: str(GROUP_BASES[group].specs()["name"].default) for group in GROUPS}
    for _, layer in layers:
        for group in GROUPS:
            name = OmegaConf.select(OmegaConf.create(layer or {}), f"{group}.name", default=None) \
                if isinstance(layer, (dict, DictConfig)) or layer is None else None
            if name is not None:
                names[group] = str(name)
    group_layers = []
    for group in GROUPS:
        path = group_file(group, names[group])
        if not path.exists():
            raise ConfigError(f"unknown {group} {names[group]!r}; valid choices: {', '.join(group_choices(group))}")
        group_layers.append((f"configs/{group}/{path.name}", {group: _load_yaml(path)}))
    tree = _spec_tree(names)
    cfg = _defaults(tree, names)
    for where, layer in group_layers + layers:
        try:
            cfg = OmegaConf.merge(cfg, check_layer(tree, layer))
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {where})") from None
    check_constraints(cfg)
    return cfg


def _is_neutral(override: str) -> bool:
    """Does a command-line override leave what a run computes unchanged (see ``config_hash``)?"""
    key, _, value = override.partition("=")
    return override.startswith(NEUTRAL_PREFIXES) or (key == "trainer.precision" and value.strip("'\"") in FP32_PRECISIONS)


def run_name(cfg: DictConfig, digest: str | None = None) -> str:
    """``<budget>/<table>/<row>/<column>/s<seed>`` for table runs, ``adhoc/<rule>-<model>-<data>-<hash>/s<seed>``
    otherwise. The same config always maps to the same folder (resume/skip relies on it). ``digest``
    is ``config_hash(cfg)`` when the caller already has it (:class:`bench.run.plan.RunPlan`)."""
    seed = f"s{cfg.seed}"
    if cfg.table:
        row = slug(cfg.row) + (f"+{cfg.variant}" if cfg.variant else "")
        return "/".join([slug(cfg.budget or "custom"), cfg.table, row, slug(cfg.column), seed])
    digest = digest or config_hash(cfg)
    return f"adhoc/{slug(cfg.algorithm.name)}-{slug(cfg.model.name)}-{slug(cfg.data.name)}-{digest}/{seed}"


def config_hash(cfg: DictConfig) -> str:
    """Hash of everything that affects what a run computes (where it goes and how fast excluded)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("output", "seed", "probe", "guard"):
        plain.pop(key, None)
    for key in ("threads", "name", "accelerator"):
        plain["trainer"].pop(key, None)
    if str(plain["trainer"].get("precision")) in FP32_PRECISIONS:
        plain["trainer"].pop("precision")
    plain["algorithm"].pop("compile", None)  # rec-LRA's torch.compile switch: the same numbers, faster
    return hashlib.sha1(OmegaConf.to_yaml(OmegaConf.create(plain)).encode()).hexdigest()[:8]
