"""``python -m bench {run, table, perf, regress}``.

Bad configs exit with status 2 and one line; missing data exits with status 3 and one line.
"""
from __future__ import annotations

import argparse
import sys
import time

from bench.console import interactive
from bench.config import ConfigError, budget_names, compose, parse_cli, table_ids


def _fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def cmd_run(args: argparse.Namespace) -> None:
    run, dotlist = parse_cli(args.overrides)
    # Validate before importing Lightning, so a typo costs a second, not ten.
    cfg = compose(run.get("table"), run.get("row"), run.get("column"), run.get("budget"), dotlist)
    from bench.data import DataUnavailable
    from bench.train import run_dir_for, train

    try:
        summary = train(cfg, retry_failed=True)
    except DataUnavailable as exc:
        _fail(str(exc), 3)
    if summary.get("status") in ("finished", "diverged") and "final" in summary:
        final = summary["final"]
        parts = [f"{k}={v:.2f}" for k, v in sorted(final.items()) if k.endswith("err1")]
        print(f"{summary['status']}: {run_dir_for(cfg)}  {' '.join(parts)}  "
              f"epoch_s={summary['time']['epoch_s_mean'] or float('nan'):.2f}")
    if summary.get("status") == "failed":
        raise SystemExit(1)


def cmd_table(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.results.table import expand, run_cells, write_table
    from bench.train import train

    table, cells = expand(args.table, args.budget, output_root=args.output_root, overrides=args.overrides,
                          rows=args.rows, seeds=args.seeds)
    quiet = not interactive()
    console = Console()
    start = time.perf_counter()

    def train_quietly(cfg):
        if quiet:
            cfg.output.progress = "none"
        return train(cfg, retry_failed=args.retry_failed)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=quiet) as progress:
        task = progress.add_task(f"{table.id} ({args.budget})", total=len(cells))

        def report(cell):
            progress.advance(task)
            line = f"{cell.label}: {cell.status}"
            if cell.status == "finished":
                line += f"  test err {cell.summary['final'].get('test/err1', float('nan')):.2f}%"
            progress.console.print(line)

        run_cells(cells, train_quietly, progress=report, retry_failed=args.retry_failed)
    md, text = write_table(table, args.budget, cells, out_dir=args.results)
    console.print(Markdown(text) if not quiet else text)
    console.print(f"wrote {md} and {md.with_suffix('.csv')} in {time.perf_counter() - start:.0f} s")


def cmd_perf(args: argparse.Namespace) -> None:
    from bench.perf import main as perf_main

    perf_main(args)


def cmd_regress(args: argparse.Namespace) -> None:
    from bench.regress import main as regress_main

    raise SystemExit(regress_main(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="bpfree-bench: backprop-free learning rules")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train one run: key=value … (table=ID row=R column=C budget=B, any config key)")
    p.add_argument("overrides", nargs="*", help="e.g. table=rlra-1 row=FA column=fmnist budget=smoke algorithm.lr=1e-4 seed=2")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("table", help="run the missing cells of a paper table and render results/<id>.md")
    p.add_argument("table", choices=table_ids(), metavar="TABLE")
    p.add_argument("--budget", default="smoke", choices=budget_names())
    p.add_argument("--rows", nargs="*", default=None, help="only these rows")
    p.add_argument("--seeds", type=int, default=None, help="override the budget's seed count")
    p.add_argument("--output-root", default=None, help="run folders root (default: output.root)")
    p.add_argument("--results", default="results", help="where the rendered table goes")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells whose last run failed")
    p.add_argument("overrides", nargs="*", help="dotlist applied to every cell, e.g. trainer.threads=2")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("perf", help="update-time ratios against backprop, interleaved, in one process")
    p.add_argument("--out", default="results/perf/cpu.csv")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke check of the benchmark)")
    p.set_defaults(func=cmd_perf)

    p = sub.add_parser("regress", help="rerun the CI accuracy baselines and compare")
    p.add_argument("--baseline", default="results/baselines/cpu.json")
    p.add_argument("--write", action="store_true", help="measure and (re)write the baseline file")
    p.set_defaults(func=cmd_regress)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as exc:
        _fail(str(exc), 2)
