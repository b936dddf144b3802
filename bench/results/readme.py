"""The README's measured numbers, generated from the committed results files.

The README holds one block between :data:`BEGIN` and :data:`END`: per table, its headline result
file (``results/<id>.md``: the largest budget measured, see :mod:`bench.results.table`), that
file's budget, epochs, seeds, device and stand-ins (read from its header), and the measured
numbers of its ``<id>.csv``. Nothing in the block is typed by hand, so it cannot disagree with
the files; ``tests/test_readme.py`` fails when the committed README's block is stale.

``python -m bench.results.readme`` rewrites the block (``make readme``); ``--check`` exits 1
when it is stale. Rendering a table into the repository's ``results/`` refreshes it too.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
BEGIN = "<!-- measured:begin — generated from results/*.md and *.csv by `make readme`; do not edit by hand -->"
END = "<!-- measured:end -->"
MAX_VALUES = 12  # numbers quoted per table; the rest are in the linked file


def _header(md_text: str) -> dict:
    head = md_text.split("\n| ")[0]  # the lines before the table itself
    budget = re.search(r"budget: `([^`]+)`", head)
    epochs = re.search(r"epochs trained: ([^;\n]+);", head)
    seeds = re.search(r"seeds per cell: up to (\d+)", head)
    device = re.search(r"^- device: (.+)$", head, re.M)
    stand_ins = re.findall(r"column `([^`]+)` runs on `([^`]+)` at this budget", head)
    return {
        "budget": budget.group(1) if budget else None,
        "computed": "computed from the models" in head,
        "epochs": epochs.group(1).strip() if epochs else "–",
        "seeds": seeds.group(1) if seeds else "–",
        "device": device.group(1).strip() if device else "–",
        "stand_ins": stand_ins,
    }


def _measured(table_id: str, rows: list[dict], synthetic: set[str]) -> str:
    """``column field: row value, …`` for the table's headline field (``test`` if it has one,
    else its first) in each column with finished cells, synthetic stand-ins left out."""
    from bench.config import load_table
    from bench.results.table import number_format

    try:
        table = load_table(table_id)
        spec = number_format(table)
        unit = str(table.get("metric", {}).get("unit", "") or "")
    except Exception:  # noqa: BLE001 - a results file whose table config went away still lists
        spec, unit = ".2f", ""
    if rows and not {"field", "column", "row", "status", "measured_mean"} <= set(rows[0]):
        return f"see [results/{table_id}.csv](results/{table_id}.csv) (a measurement, not a paper-vs-measured table)"
    fields = list(dict.fromkeys(r["field"] for r in rows))
    field = "test" if "test" in fields else (fields[0] if fields else None)
    parts = []
    for column in dict.fromkeys(r["column"] for r in rows):
        if column in synthetic:
            continue
        done = [r for r in rows if r["column"] == column and r["field"] == field and r["status"] == "finished"
                and r["measured_mean"] not in ("", None)]
        if not done:
            continue
        values = [f"{r['row']} {float(r['measured_mean']):{spec}}" for r in done[:MAX_VALUES]]
        more = f" · … ({len(done) - MAX_VALUES} more)" if len(done) > MAX_VALUES else ""
        parts.append(f"{column} {field}: " + " · ".join(values) + more)
    if not parts:
        return "no measured number (synthetic stand-in only)" if synthetic else "–"
    return "; ".join(parts) + (f" ({unit.split(' ')[0]})" if unit.startswith("%") else "")


def block(results: str | Path) -> str:
    """The generated block (markers included) for the headline files in ``results``."""
    from bench.results.io import read_csv

    results = Path(results)
    lines = [BEGIN, "",
             "| table | headline file | budget | epochs | seeds per cell | device | stand-in data | measured (mean over seeds) |",
             "|---|---|---|---|---|---|---|---|"]
    ids = sorted(p.stem for p in results.glob("*.md") if "." not in p.stem)
    for table_id in ids:
        md = results / f"{table_id}.md"
        head = _header(md.read_text())
        csv_path = results / f"{table_id}.csv"
        rows = read_csv(csv_path) if csv_path.exists() else []
        synthetic = {col for col, used in head["stand_ins"] if used == "synthetic"}
        stand = ", ".join(f"{used} for {col}" for col, used in head["stand_ins"]) or "–"
        budget = "computed (any)" if head["computed"] else (head["budget"] or "–")
        # other budgets' files beside the headline; smoke ones are git-ignored local checks, never quoted
        others = sorted(p.name for p in results.glob(f"{table_id}.*.md") if not p.name.endswith(".smoke.md"))
        also = f" (also: {', '.join(f'[{o}](results/{o})' for o in others)})" if others else ""
        lines.append(f"| `{table_id}` | [results/{table_id}.md](results/{table_id}.md){also} | {budget} | "
                     f"{head['epochs'] if not head['computed'] else '–'} | {head['seeds'] if not head['computed'] else '–'} | "
                     f"{head['device']} | {stand} | {_measured(table_id, rows, synthetic)} |")
    lines += ["", END]
    return "\n".join(lines)


def replace_block(readme_text: str, new_block: str) -> str:
    start, end = readme_text.find(BEGIN), readme_text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no generated block ({BEGIN!r} … {END!r})")
    return readme_text[:start] + new_block + readme_text[end + len(END):]


def is_stale(readme: str | Path = REPO / "README.md", results: str | Path = REPO / "results") -> bool:
    text = Path(readme).read_text()
    return replace_block(text, block(results)) != text


def refresh(readme: str | Path = REPO / "README.md", results: str | Path = REPO / "results") -> bool:
    """Rewrite the README's block from ``results``; returns whether anything changed."""
    from bench.results.io import write_text

    readme = Path(readme)
    text = readme.read_text()
    new = replace_block(text, block(results))
    if new != text:
        write_text(readme, new)
    return new != text


def refresh_if_repo_results(out_dir: str | Path) -> None:
    """After a headline render into the repository's own ``results/`` (not a test's or a user's
    other folder), bring the README's numbers along."""
    readme = REPO / "README.md"
    if Path(out_dir).resolve() == (REPO / "results").resolve() and readme.exists() and BEGIN in readme.read_text():
        refresh(readme, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.results.readme",
                                     description="regenerate the README's measured-results block from results/")
    parser.add_argument("--check", action="store_true", help="exit 1 when the block is stale, write nothing")
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--results", default=str(REPO / "results"))
    args = parser.parse_args(argv)
    if args.check:
        stale = is_stale(args.readme, args.results)
        print(f"{args.readme}: measured block is {'stale (run `make readme`)' if stale else 'up to date'}")
        return 1 if stale else 0
    changed = refresh(args.readme, args.results)
    print(f"{'rewrote' if changed else 'unchanged:'} the measured block of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
