"""Redraw a table's committed figures from its committed numbers, when the run folders are gone.

``python -m bench.results.rerender ID [ID …]`` reads ``results/<id>.md`` (its header: budget,
epochs, seeds, device, stand-ins), ``<id>.csv`` (the points of ``kind: rows`` figures) and
``<id>-curves.csv`` (every plotted curve) and draws the PNGs again with the current plotting
setup (:mod:`bench.results.plots`), under the same names. Nothing is recomputed: a figure whose
numbers are not in a CSV (a t-SNE map) is left as it is, and reported.
"""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from bench.config import load_table, slug
from bench.results import plots
from bench.results.io import read_csv
from bench.results.readme import REPO, _header
from bench.results.table import declared_dataset, draw_curves, figure_specs, plot_figure


def _note(table, md_text: str) -> str:
    head = _header(md_text)
    stand_ins = [f"{used} stands in for {declared_dataset(table, col) or col}"
                 for col, used in head["stand_ins"] if col in table.columns]
    epochs = [int(e) for e in head["epochs"].split(",") if e.strip().isdigit()]
    seeds = int(head["seeds"]) if str(head["seeds"]).isdigit() else 0
    if head["computed"]:  # "mean ± std over 16 random draws per cell"
        import re

        draws = re.search(r"over (\d+) random draws", md_text)
        return plots.provenance(None, seeds=int(draws.group(1)) if draws else 0, devices=[head["device"]],
                                draws="random draw")
    return plots.provenance(head["budget"], epochs, seeds, [head["device"]], stand_ins)


def _float(v):
    return None if v in ("", None) else float(v)


def rerender(table_id: str, results: str | Path = REPO / "results") -> tuple[list[Path], list[str]]:
    """Redraw what the committed CSVs hold; returns (PNGs drawn, PNGs left as they were)."""
    results = Path(results)
    table = load_table(table_id)
    md_text = (results / f"{table_id}.md").read_text()
    note = _note(table, md_text)
    drawn, left = [], []
    specs = figure_specs(table)
    records = [{**r, "paper": _float(r["paper"]), "measured_mean": _float(r["measured_mean"]),
                "measured_std": _float(r["measured_std"]), "seeds": int(r["seeds"] or 0)}
               for r in read_csv(results / f"{table_id}.csv")] if (results / f"{table_id}.csv").exists() else []
    curves_csv = results / f"{table_id}-curves.csv"
    curves = read_csv(curves_csv) if curves_csv.exists() else []
    for spec in specs:
        kind = str(spec.get("kind", "rows"))
        if kind == "rows":
            stem = table.id + (f"-{slug(spec.name)}" if spec.get("name") and len(specs) > 1 else "")
            if (results / "plots" / f"{stem}.png").exists():
                drawn.append(plot_figure(table, records, [], results / "plots" / f"{stem}.png", spec, note)[0])
        elif kind == "curves":
            prefix = f"{table.id}-{slug(spec.name)}" if spec.get("name") else table.id
            by = str(spec.get("lines", "layers"))
            for png in dict.fromkeys(r["png"] for r in curves):
                stem = png.removesuffix(".png")
                if not stem.startswith(prefix) or (not spec.get("name") and len([s for s in specs if str(s.get("kind")) == "curves"]) > 1):
                    continue
                rest = stem[len(prefix):].lstrip("-")
                column = next((c for c in table.columns if len(table.columns) > 1
                               and (rest == slug(c) or rest.endswith(f"-{slug(c)}"))), next(iter(table.columns)))
                row = next((r for r in table.rows if rest.startswith(slug(r))), None)
                subtitle = column if by == "rows" else f"{row} / {column}"
                lines: dict[str, list] = {}
                for r in curves:
                    if r["png"] == png:
                        lines.setdefault(r["line"], []).append((int(r["step"]), float(r["value"])))
                drawn.append(draw_curves(table, spec, results / "plots" / png, subtitle, lines, note, by=by)[0])
        else:
            left += [p.name for p in (results / "plots").glob(f"{table.id}.png")]
    return drawn, left


def main(argv: list[str] | None = None) -> int:
    for table_id in argv if argv is not None else sys.argv[1:]:
        drawn, left = rerender(table_id)
        print(f"{table_id}: redrew {', '.join(p.name for p in drawn) or 'nothing'}"
              + (f"; left as they were (no numbers to redraw from): {', '.join(left)}" if left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
