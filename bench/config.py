"""Config loading, merging, validation and run naming (OmegaConf).

A run's config is merged, in order, from:

1. ``configs/base.yaml`` (every key that exists, with defaults);
2. the group files chosen by ``algorithm.name``, ``model.name``, ``data.name``, ``trainer.name``;
3. the table's ``common`` block, then the row, then the column (``configs/tables/<id>.yaml``);
4. the budget: ``configs/budget/<name>.yaml``, then the table's and the row's per-budget deltas;
5. dotlist overrides from the command line (``algorithm.lr=1e-4 seed=3``).

Validation happens before anything is built: every layer is checked against the defaults of
(1)+(2), so a typo in a key, a value of the wrong type or an unknown group value fails with a
one-line :class:`ConfigError` naming the key, the value and the valid choices.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(os.environ.get("BENCH_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))
GROUPS = ("algorithm", "model", "data", "trainer")
RUN_KEYS = ("table", "row", "column", "budget")
# A budget file holds these keys; anything else in a budget block must be a config section.
BUDGET_KEYS = {"name": str, "epochs": int, "train_subset": int, "seeds": int}
# Keys whose default is null still have a type; a value given for them is checked against it.
NULLABLE_TYPES = {"table": "", "row": "", "column": "", "budget": "", "variant": "",
                  "data.train_subset": 0, "algorithm.max_grad_norm": 0.0, "model.block_size": 0,
                  "algorithm.feedback_device": "", "algorithm.bottleneck_layer": ""}
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


class ConfigError(ValueError):
    """A bad config. ``str()`` is one line meant for the user; the CLI exits with status 2."""


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


def load_table(table_id: str) -> DictConfig:
    path = CONFIG_DIR / "tables" / f"{table_id}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown table {table_id!r}; valid choices: {', '.join(table_ids())}")
    table = _load_yaml(path)
    unknown = set(table) - TABLE_KEYS
    if unknown:
        raise ConfigError(f"table {table_id}: unknown key {sorted(unknown)[0]!r}; valid keys: {', '.join(sorted(TABLE_KEYS))}")
    for key in ("id", "title", "columns", "rows"):
        if key not in table:
            raise ConfigError(f"table {table_id}: missing key {key!r}")
    if table.id != table_id:
        raise ConfigError(f"table file {path.name} declares id {table.id!r}; it must equal the file name")
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

def _type_name(value: Any) -> str:
    if isinstance(value, (list, ListConfig)):
        return "list"
    return type(value).__name__


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Return ``value`` converted to the type of ``default``, or raise a one-line ConfigError."""
    if value is None:
        return value
    if default is None:
        if key not in NULLABLE_TYPES:
            return value
        default = NULLABLE_TYPES[key]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(default, (list, ListConfig)):
        if isinstance(value, (list, ListConfig)):
            if len(default):  # elements take the type of the default's first element
                return [_coerce(f"{key}[{i}]", default[0], v) for i, v in enumerate(value)]
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {_type_name(default)}, got {value!r} ({_type_name(value)})")


def check_layer(schema: DictConfig, layer: Any, prefix: str = "") -> DictConfig:
    """Check ``layer`` against ``schema`` key by key; return it with values coerced to schema types."""
    out = {}
    for key, value in (layer or {}).items():
        path = f"{prefix}{key}"
        if key not in schema:
            section = prefix.rstrip(".") or "the top level"
            raise ConfigError(
                f"unknown key {path}={value!r}; valid keys of {section}: {', '.join(sorted(map(str, schema.keys())))}"
            )
        default = schema[key]
        if isinstance(default, DictConfig):
            if not isinstance(value, (dict, DictConfig)):
                raise ConfigError(f"{path}: expected a section, got {value!r}")
            out[key] = check_layer(default, value, f"{path}.")
        else:
            out[key] = _coerce(path, default, value)
    return OmegaConf.create(out)


# --------------------------------------------------------------------------- composition

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
        if key in RUN_KEYS:
            run[key] = value
        else:
            dotlist.append(f"{key}={value}")
    return run, dotlist


def compose(table: str | None = None, row: str | None = None, column: str | None = None,
            budget: str | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Resolve and validate one run's config. Raises :class:`ConfigError` on any problem."""
    base = _load_yaml(CONFIG_DIR / "base.yaml")
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
        cli = OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {str(exc).splitlines()[0]}") from exc
    layers.append(("command line", cli))
    # A table run with overrides that change the computation is a variant of the row: it gets its
    # own folder, so it never skips or resumes the plain row's run.
    variant = sorted(o for o in overrides if not _is_neutral(o))
    variant_id = hashlib.sha1("\n".join(variant).encode()).hexdigest()[:8] if (table and variant) else None
    layers.append(("run keys", {"table": table, "row": row, "column": column, "budget": budget, "variant": variant_id}))

    # Group names can come from any layer, so find them first, then load their files.
    probe = OmegaConf.merge(base, *[OmegaConf.create(layer or {}) for _, layer in layers])
    schema = base.copy()
    for group in GROUPS:
        name = str(probe[group].name)
        path = group_file(group, name)
        if not path.exists():
            raise ConfigError(f"unknown {group} {name!r}; valid choices: {', '.join(group_choices(group))}")
        schema = OmegaConf.merge(schema, {group: _load_yaml(path)})
    cfg = schema.copy()
    for where, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, check_layer(schema, layer))
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {where})") from None
    return cfg


def _is_neutral(override: str) -> bool:
    """Does a command-line override leave what a run computes unchanged (see ``config_hash``)?"""
    key, _, value = override.partition("=")
    return override.startswith(NEUTRAL_PREFIXES) or (key == "trainer.precision" and value.strip("'\"") in FP32_PRECISIONS)


def run_name(cfg: DictConfig) -> str:
    """``<budget>/<table>/<row>/<column>/s<seed>`` for table runs, ``adhoc/<rule>-<model>-<data>-<hash>/s<seed>``
    otherwise. The same config always maps to the same folder (resume/skip relies on it)."""
    seed = f"s{cfg.seed}"
    if cfg.table:
        row = slug(cfg.row) + (f"+{cfg.variant}" if cfg.variant else "")
        return "/".join([slug(cfg.budget or "custom"), cfg.table, row, slug(cfg.column), seed])
    digest = config_hash(cfg)
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
