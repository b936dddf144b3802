"""``python -m bench {run, table, sweep, report, compare, perf, regress}``.

Bad configs exit with status 2 and one line; missing data exits with status 3 and one line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.console import interactive
from bench.config import (CellNotInTable, ConfigError, budget_names, compose, load_table, parse_cli, resolve_name,
                          table_ids)
from bench.results.io import check_writable
from bench.run.plan import RunPlan  # torch-free: bench.run.train (torch, Lightning) is imported after validation


EXIT_TERMINATED = 128 + 15  # the shell's status for a process ended by SIGTERM


def _fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def cmd_run(args: argparse.Namespace) -> dict:
    """Train one run; returns its summary (a SLURM job's result, :class:`bench.run.submit.RunJob`)."""
    run, dotlist = parse_cli(args.overrides)
    if os.environ.get("WANDB_SWEEP_ID") and not any(o.startswith("output.wandb=") for o in dotlist):
        # Started by a W&B agent: log to its sweep. output.* is neutral, so the run folder (and
        # skip/resume) is the same as for a local run of this cell.
        dotlist.append("output.wandb=online")
    # Validate before importing Lightning, so a typo costs a second, not ten.
    cfg = compose(run.get("table"), run.get("row"), run.get("column"), run.get("budget"), dotlist)
    plan = RunPlan.of(cfg)  # the run's name, hash and folder, from here on
    check_writable(plan.run_dir, "run folder")  # before torch: a config error costs ~1 s
    from bench.data import DataUnavailable
    from bench.run.train import check_runtime, train

    check_runtime(cfg)  # the one check of its trainer and output values

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        summary = train(plan, retry_failed=True)
    except DataUnavailable as exc:
        _fail(str(exc), 3)
    except SIGTERMException:  # Lightning's SIGTERM handler: a SystemExit whose status would be 0
        _fail(f"{plan.run_dir}: stopped by SIGTERM; run the same command again to resume from its last epoch",
              EXIT_TERMINATED)
    if summary.get("status") == "diverged" and summary.get("divergence"):  # a result, exit status 0
        from bench.callbacks.divergence import describe

        print(f"diverged: {plan.run_dir}  {describe(summary['divergence'])}")
    elif summary.get("status") in ("finished", "diverged") and "final" in summary:
        final = summary["final"]
        parts = [f"{k}={v:.2f}" for k, v in sorted(final.items()) if k.endswith("err1")]
        print(f"{summary['status']}: {plan.run_dir}  {' '.join(parts)}  "
              f"epoch_s={summary['time']['epoch_s_mean'] or float('nan'):.2f}")
    if summary.get("status") == "failed":
        raise SystemExit(1)
    return summary


def check_rows_early(table_id: str, rows: list[str] | None, columns: list[str] | None = None) -> None:
    """An unknown table, --rows or --columns name fails before the table machinery (and Lightning) is imported."""
    table = load_table(table_id)
    for r in rows or []:
        resolve_name("row", r, table.rows.keys(), table_id)
    for c in columns or []:
        resolve_name("column", c, table.columns.keys(), table_id)


def cmd_table(args: argparse.Namespace) -> None:
    check_rows_early(args.table, args.rows, args.columns)
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.results.table import write_table
    from bench.run.cells import expand, run_cells
    from bench.run.train import train

    table, cells = expand(args.table, args.budget, output_root=args.output_root, overrides=args.overrides,
                          seeds=args.seeds)
    todo = select_rows(table, cells, args.rows, args.columns)
    check_folders(cells, args.results)
    quiet = not interactive()
    console = Console()
    start = time.perf_counter()

    def train_quietly(plan):
        if quiet:
            plan.cfg.output.progress = "none"  # output.* is outside the config hash: the plan stands
        return train(plan, retry_failed=args.retry_failed)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=quiet) as progress:
        task = progress.add_task(f"{table.id} ({args.budget})", total=len(todo))

        def report(cell):
            progress.advance(task)
            line = f"{cell.label}: {cell.status}"
            if cell.status == "finished":
                line += f"  test err {cell.summary['final'].get('test/err1', float('nan')):.2f}%"
            elif cell.status == "diverged" and cell.summary.get("divergence"):
                d = cell.summary["divergence"]
                line += f"  ({d['quantity']} non-finite at step {d['step']})"
            progress.console.print(line)

        run_cells(todo, train_quietly, progress=report, retry_failed=args.retry_failed)
    md, text = write_table(table, args.budget, cells, out_dir=args.results)
    console.print(Markdown(text) if not quiet else text)
    console.print(f"wrote {md} and {md.with_suffix('.csv')} in {time.perf_counter() - start:.0f} s")


def print_table(table, budget: str, cells, results: str, quiet: bool, console) -> None:
    from rich.markdown import Markdown

    from bench.results.table import write_table

    md, text = write_table(table, budget, cells, out_dir=results)
    if quiet:  # plain print: rich would wrap lines at 80 columns and read [..] as markup
        print(text)
        print(f"wrote {md} and {md.with_suffix('.csv')}")
    else:
        console.print(Markdown(text))
        console.print(f"wrote {md} and {md.with_suffix('.csv')}")


def select_rows(table, cells, rows: list[str] | None, columns: list[str] | None = None):
    """The cells of the rows named by --rows and the columns named by --columns (as the table spells
    them, or their slugs); an unknown name is one line. The rendered table still shows every finished run."""
    if rows:
        names = {resolve_name("row", r, table.rows.keys(), table.id) for r in rows}
        cells = [c for c in cells if c.row in names]
    if columns:
        names = {resolve_name("column", c, table.columns.keys(), table.id) for c in columns}
        cells = [c for c in cells if c.column in names]
    return cells


def check_folders(cells, results: str) -> None:
    """Every folder a table run writes, and the runs' trainer settings, checked before the first run starts
    (the one check of each run's trainer and output values: ``train(plan)`` does not repeat it)."""
    from bench.run.train import check_runtime

    for cfg in {id(c.cfg): c.cfg for c in cells if c.cfg is not None}.values():
        check_runtime(cfg)
    for root in sorted({Path(c.cfg.output.root) for c in cells if c.cfg is not None}):
        check_writable(root, "run folder root")
    check_writable(Path(results), "results folder")


def cmd_sweep(args: argparse.Namespace) -> None:
    if args.table:
        check_rows_early(args.table, args.rows if args.local else None, args.columns if args.local else None)
    from bench.run import sweep as sw

    sweeps_dir = Path(args.sweeps_dir) if args.sweeps_dir else None
    if args.write:
        check_writable(sweeps_dir or sw.SWEEPS_DIR, "sweeps folder")
        for path in sw.write_sweeps([args.table] if args.table else None, sweeps_dir):
            print(f"wrote {path}")
        return
    if not args.table:
        _fail("sweep: name a table id (or pass --write to regenerate every sweep file)", 2)
    if args.wandb:
        sweep_id, agent = sw.create_wandb_sweep(args.table, args.budget or sw.SWEEP_BUDGET, project=args.project,
                                                entity=args.entity, sweeps_dir=sweeps_dir)
        print(f"created W&B sweep {sweep_id}; start agents with:\n  {agent}")
        return
    if not args.local:
        _fail("sweep: choose --local (run here, no server), --wandb (create a W&B sweep) or --write", 2)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    budget = args.budget or "smoke"
    table, cells = sw.plan(args.table, budget, output_root=args.output_root, overrides=args.overrides,
                           seeds=args.seeds)
    todo = select_rows(table, cells, args.rows, args.columns)
    check_folders(cells, args.results)
    quiet = not interactive()
    console = Console()
    start = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=quiet) as progress:
        task = progress.add_task(f"{table.id} ({budget}, {args.parallel} at a time)", total=len(todo))

        def report(cell):
            progress.advance(task)
            if quiet:
                print(sw.cell_line(cell), flush=True)
            else:
                progress.console.print(sw.cell_line(cell), markup=False)

        sw.run_local(todo, parallel=args.parallel, retry_failed=args.retry_failed, overrides=args.overrides,
                     progress=report)
    print_table(table, budget, cells, args.results, quiet, console)
    failed = [c for c in todo if c.status == "failed"]
    print(f"{len(todo)} cells in {time.perf_counter() - start:.0f} s"
          + (f"; {len(failed)} failed (rerun them with --retry-failed)" if failed else ""))
    if failed:
        raise SystemExit(1)


def cmd_report(args: argparse.Namespace) -> None:
    from bench.results.report import report

    if args.decisions_only:
        from bench.results.table import refresh_decisions

        changed = refresh_decisions(load_table(args.table), args.results)
        print("\n".join(f"wrote {md}" for md in changed) or f"{args.table}: decisions already current")
        return
    for folder in (Path(args.results), Path(args.results) / "plots"):
        check_writable(folder, "results folder")
    md, pngs, _ = report(args.table, args.budget, output_root=args.output_root, results=args.results)
    print(f"wrote {md}" + "".join(f"\n      {p}" for p in pngs))


def cmd_compare(args: argparse.Namespace) -> None:
    for target in (args.a, args.b):  # before the report machinery (and Lightning) is imported
        if not (Path(target) / "summary.json").exists() and target not in table_ids():
            _fail(f"compare: {target!r} is neither a run folder (with summary.json) nor a table id; "
                  f"tables: {', '.join(table_ids())}", 2)
    from bench.results.report import compare_text, resolve

    print(compare_text(resolve(args.a, args.budget, args.output_root), resolve(args.b, args.budget, args.output_root)))


def cmd_submit(args: argparse.Namespace) -> None:
    from bench.run import submit as sb
    from bench.run.sweep import plan

    if (args.slurm is None) == (not args.local_executor):
        _fail("submit: pass --slurm partition=… nodes=… gpus_per_node=…, or --local-executor", 2)
    slurm = sb.parse_slurm(args.slurm) if args.slurm is not None else None
    table, cells = plan(args.table, args.budget, output_root=args.output_root, overrides=args.overrides)
    folder = Path(args.folder or Path(next(c.cfg.output.root for c in cells if c.cfg is not None)) / "submitit")
    check_writable(folder, "submitit log folder")
    executor = sb.make_executor(folder, slurm, f"bench-{table.id}")
    jobs = sb.submit(cells, executor, slurm, overrides=args.overrides, retry_failed=args.retry_failed)
    if not jobs:
        print(f"{table.id} ({args.budget}): nothing to submit; every cell is finished, failed or unavailable")
        return
    print(f"submitted {len(jobs)} runs of {table.id} ({args.budget}): jobs {', '.join(j.job_id for j in jobs)}; "
          f"logs in {folder}")
    if args.wait:
        failed = 0
        for job in jobs:
            try:
                summary = job.result()
                print(f"{job.job_id}: {summary.get('status')} {summary.get('run', '')}")
            except Exception as exc:  # noqa: BLE001 - one failed job must not hide the others
                failed += 1
                print(f"{job.job_id}: failed ({str(exc).strip().splitlines()[-1]})")
        if failed:
            raise SystemExit(1)


def cmd_perf(args: argparse.Namespace) -> None:
    from bench.run.perf import main as perf_main
    from bench.registry import UnknownChoice

    try:
        perf_main(args)
    except UnknownChoice as exc:
        _fail(str(exc), 2)


def cmd_options(args: argparse.Namespace) -> None:
    from bench import options

    if args.readme:
        path = Path(args.readme)
        text = path.read_text()
        if options.README_BEGIN not in text or options.README_END not in text:
            _fail(f"{path} has no rule-options block (the lines {options.README_BEGIN!r} … {options.README_END!r})", 2)
        head, rest = text.split(options.README_BEGIN, 1)
        path.write_text(head + options.readme_block() + rest.split(options.README_END, 1)[1])
        print(f"wrote the rule-options table of {path}")
        return
    if not args.rule:
        _fail("options: name a rule (e.g. `python -m bench options rlra`), or pass --readme", 2)
    print(options.format_options(args.rule))


def cmd_leaderboard(args: argparse.Namespace) -> None:
    from bench.run import leaderboard as lb

    lb.load_workload(args.workload)  # one line for an unknown or malformed workload, before training
    md = lb.run(args.workload, output_root=args.output_root, results=args.results)
    print(f"wrote {md}, {md.with_suffix('.csv')} and {Path(args.results) / 'plots' / f'leaderboard-{args.workload}.png'}")


def cmd_regress(args: argparse.Namespace) -> None:
    from bench.run.regress import main as regress_main

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
    p.add_argument("--columns", nargs="*", default=None, help="only these columns")
    p.add_argument("--seeds", type=int, default=None, help="override the budget's seed count")
    p.add_argument("--output-root", default=None, help="run folders root (default: output.root)")
    p.add_argument("--results", default="results", help="where the rendered table goes")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells whose last run failed")
    p.add_argument("overrides", nargs="*", help="dotlist applied to every cell, e.g. trainer.threads=2")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("sweep", help="a table's grid: run it locally (--local), create a W&B sweep (--wandb), "
                                     "or regenerate sweeps/*.yaml (--write)")
    p.add_argument("table", nargs="?", default=None, metavar="TABLE")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run the grid here, N runs at a time, no server")
    mode.add_argument("--wandb", action="store_true", help="create the W&B sweep and print the agent command")
    mode.add_argument("--write", action="store_true", help="regenerate sweeps/<id>.yaml (all tables without TABLE)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (--local); each gets cores // N threads")
    p.add_argument("--budget", default=None, choices=budget_names(),
                   help="--local: default smoke; --wandb: default full (the sweep file)")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells whose last run failed")
    p.add_argument("--rows", nargs="*", default=None, help="only these rows (--local)")
    p.add_argument("--columns", nargs="*", default=None, help="only these columns (--local)")
    p.add_argument("--seeds", type=int, default=None, help="override the budget's seed count (--local)")
    p.add_argument("--output-root", default=None, help="run folders root (default: output.root)")
    p.add_argument("--results", default="results", help="where the rendered table goes")
    p.add_argument("--sweeps-dir", default=None, help="where sweep files live (default: sweeps/)")
    p.add_argument("--project", default="bpfree-bench", help="W&B project (--wandb)")
    p.add_argument("--entity", default=None, help="W&B entity (--wandb)")
    p.add_argument("overrides", nargs="*", help="dotlist applied to every cell, e.g. trainer.accelerator=gpu")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="write results/<id>.md and its plots (results/plots/) from the run folders")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("--budget", default="smoke", choices=budget_names())
    p.add_argument("--output-root", default=None, help="run folders root (default: output.root)")
    p.add_argument("--results", default="results", help="where the table and plots go")
    p.add_argument("--decisions-only", action="store_true",
                   help="only rewrite the rendered tables' notes and decisions from the config (no run folders needed)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="side-by-side metrics of two runs (run folders) or two tables (ids)")
    p.add_argument("a", help="a run folder or a table id")
    p.add_argument("b", help="a run folder or a table id")
    p.add_argument("--budget", default="smoke", choices=budget_names(), help="budget of table ids")
    p.add_argument("--output-root", default=None, help="run folders root of table ids")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("submit", help="submit a table's pending runs to SLURM through submitit (one array task per run)")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("--slurm", nargs="+", default=None, metavar="KEY=VALUE",
                   help="partition=… nodes=… gpus_per_node=… [time_min= cpus_per_task= mem_gb= account= qos= "
                        "constraint= array_parallelism=]")
    p.add_argument("--local-executor", action="store_true", help="run the jobs here with submitit's LocalExecutor")
    p.add_argument("--budget", default="full", choices=budget_names())
    p.add_argument("--retry-failed", action="store_true", help="resubmit cells whose last run failed")
    p.add_argument("--output-root", default=None, help="run folders root (default: output.root); must be shared")
    p.add_argument("--folder", default=None, help="submitit logs (default: <output root>/submitit)")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and print their status")
    p.add_argument("overrides", nargs="*", help="dotlist applied to every run (put it before --slurm)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("perf", help="update-time ratios against backprop, interleaved, in one process")
    p.add_argument("--out", default="results/perf/cpu.csv")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke check of the benchmark)")
    p.add_argument("--only", default=None, help="run one benchmark: 'core' or a name in bench/run/benchmarks/")
    p.set_defaults(func=cmd_perf)

    p = sub.add_parser("leaderboard", help="time-to-target of every rule on a workload (configs/leaderboards/<id>.yaml)")
    p.add_argument("workload", help="a workload id, e.g. rlra1-fmnist")
    p.add_argument("--output-root", default=None, help="run folders root (default: output.root)")
    p.add_argument("--results", default="results", help="where the leaderboard md, csv and png go")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("options", help="a rule's options: types, ranges, defaults and descriptions")
    p.add_argument("rule", nargs="?", default=None, help="a rule name (configs/algorithm/<rule>.yaml)")
    p.add_argument("--readme", nargs="?", const="README.md", default=None,
                   help="regenerate the rule-options table of this README (default README.md)")
    p.set_defaults(func=cmd_options)

    p = sub.add_parser("regress", help="rerun the CI accuracy baselines and compare")
    p.add_argument("--baseline", default="results/baselines/cpu.json")
    p.add_argument("--write", action="store_true", help="measure and (re)write the baseline file")
    p.add_argument("--only", nargs="+", default=None, help="with --write: measure these rules, keep the others' entries")
    p.set_defaults(func=cmd_regress)
    return parser


def main(argv: list[str] | None = None):
    """Run a command; returns what it returns (``run``: the run's summary)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # argparse leaves key=value overrides typed after an option (`sweep ID --local a.b=1`) unparsed;
    # they are overrides all the same. W&B agents may pass --key=value (${args}) to `run`.
    def override(u: str) -> bool:
        return "=" in u and (not u.startswith("-") or (args.command == "run" and u.startswith("--")))

    if unknown and hasattr(args, "overrides") and all(override(u) for u in unknown):
        args.overrides = [*(args.overrides or []), *unknown]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except CellNotInTable as exc:
        print(f"skipped: {exc}")
    except ConfigError as exc:
        _fail(str(exc), 2)
