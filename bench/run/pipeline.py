"""Pipelined Associated Learning: one worker per component group, trained concurrently.

Kao & Chen (Associated Learning, Neural Computation 2021, arXiv:1906.05560) Table 1 describes
the schedule and §6 says they could not implement it. Here it runs on ``torch.distributed``
point-to-point ops (``isend``/``irecv``): gloo between CPU processes, NCCL between GPUs. Nothing
is written by hand below the ``torch.distributed`` API.

Workers and what flows. The K components are split into W ≤ K contiguous groups (balanced by
parameter count, :func:`partition`); worker w holds group w. For every mini-batch, worker 0 reads
(x, y) and forms s_0 = x, t_0 = onehot(y); worker w runs its components on (s, t) received from
worker w − 1 and sends its last (s_i, t_i), detached, to worker w + 1. Training sends nothing
upstream: AL's losses are local, so no gradient or target ever flows back.

Schedule (Table 1). At tick τ worker w works on mini-batch τ − w. Per mini-batch k a worker does:
receive k (the receive of k + 1 is already posted, so the transfer overlaps this compute) →
forward its components → ``isend`` s, t of k downstream → backward of its local losses → update.
Staleness: component i at tick τ works on mini-batch τ − i + 1 with its *own current* weights;
because nothing flows upstream, the inputs it receives were computed by the upstream weights
exactly as sequential AL computes them, so with ``algorithm.delay = 0`` the pipeline computes
sequential AL's updates, bit for bit up to float summation order (tests/test_pipeline.py).
``algorithm.delay = d > 0`` is the delayed schedule: a worker computes the gradient of mini-batch
k at its forward and applies it after the forward of k + d (a queue of d gradients), so the
gradient of k is taken at the weights after max(0, k − d) updates. :func:`delayed_sequential`
runs that schedule in one process, component after component: it is the documented reference.

Ordering and shutdown. Every worker iterates over the same number of mini-batches (the epoch
order is a function of (seed, epoch), bench/data/loader.py), so sends and receives pair up
without a handshake. At the end of an epoch each worker drains its delay queue, waits for its
last sends, and ``gather_object``s its components' weights, buffers, optimiser state and loss
sums to worker 0 — the epoch boundary is the pipeline's only barrier.

Inference runs on worker 0, which receives every component at the epoch boundary anyway (for the
checkpoint) and evaluates Eq. 8 (f_1 … f_K, b_K, h_K … h_1) on the validation and test sets. A
reverse pipeline would run the h-path back down through all W workers (2W − 1 hops per batch)
for a forward-only pass that takes a fraction of the epoch; one copy of the effective weights per
epoch is cheaper and keeps the evaluation identical to sequential AL's.

Launch, run folder, resume. ``trainer.pipeline=pipelined`` in ``bench run`` (or a table row)
calls :func:`train_pipelined`: under torchrun or SLURM (``RANK``/``WORLD_SIZE`` or
``SLURM_PROCID``/``SLURM_NTASKS`` set, ``MASTER_ADDR``/``MASTER_PORT`` given) each process is
one worker; otherwise it spawns the W workers itself (``torch.multiprocessing``, spawn). Worker 0
writes the run folder like every run: ``config.yaml``, ``metrics.csv`` (one row per epoch,
``time/epoch_s`` the train-only wall clock), ``summary.json`` and ``last.ckpt`` (weights-only,
written to a temp name and renamed, so a kill never leaves it truncated). Rerunning the command
resumes from the last checkpoint: each worker reloads its components and optimiser state and
the data order replays from the next epoch, so the resumed run ends with the same weights.

Failures. The launcher polls its workers every 0.5 s; when one dies (a signal) or raises, it stops
the others (SIGTERM, then SIGKILL), writes ``summary.json`` with status ``failed`` and prints one
line naming the worker, why, and the last completed checkpoint. Under torchrun, its agent does the
same; the process group's timeout (``TIMEOUT_S``) is the last guard against a hang.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

TIMEOUT_S = 120  # process-group timeout: only a guard; the launcher stops a broken pipeline within ~1 s
CKPT_KEY = "bench"  # as bench.results.run.CKPT_KEY


# --------------------------------------------------------------------------- shared pieces

def partition(costs: list[float], workers: int) -> list[list[int]]:
    """Contiguous groups of component indices, ``workers`` of them, minimising the largest group
    cost (exact, by trying every split: K ≤ a few dozen)."""
    K = len(costs)
    if not 1 <= workers <= K:
        raise ValueError(f"pipeline: {workers} workers for {K} components; expected 1 … {K}")
    from functools import lru_cache

    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @lru_cache(None)
    def best(start: int, w: int) -> tuple[float, tuple[int, ...]]:
        if w == 1:
            return prefix[K] - prefix[start], (K,)
        out = (float("inf"), ())
        for end in range(start + 1, K - w + 2):
            rest, cuts = best(end, w - 1)
            out = min(out, (max(prefix[end] - prefix[start], rest), (end, *cuts)))
        return out

    _, cuts = best(0, workers)
    groups, start = [], 0
    for end in cuts:
        groups.append(list(range(start, end)))
        start = end
    return groups


def component_costs(model) -> list[float]:
    return [float(sum(p.numel() for m in model.component_modules(i).values() for p in m.parameters()))
            for i in range(model.K)]


def group_params(model, group: list[int]) -> dict[str, torch.nn.Parameter]:
    keep = {str(i) for i in group}
    return {n: p for n, p in model.named_parameters() if n.split(".")[1] in keep}


def group_state(model, group: list[int]) -> dict[str, torch.Tensor]:
    keep = {str(i) for i in group}
    return {n: v.detach().cpu().clone() for n, v in model.state_dict().items() if n.split(".")[1] in keep}


def onehot(y: torch.Tensor, classes: int, like: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y, classes).to(like.dtype)


class GroupTrainer:
    """One worker's components, optimiser and delay queue: the per-mini-batch work of the schedule."""

    def __init__(self, model, group: list[int], opts, delay: int):
        from bench.algorithms.associated import make_optimizer

        self.model, self.group, self.delay = model, group, int(delay)
        self.params = group_params(model, group)
        self.optimizer = make_optimizer(model, opts, self.params)
        self.queue: list[list[torch.Tensor]] = []
        self.sums = torch.zeros(2 * len(group))  # A_i then E_i summed over mini-batches
        self.batches = 0

    def forward(self, s: torch.Tensor, t: torch.Tensor):
        """Run the group's components: (s, t) out, and the summed local loss (with its graph)."""
        total, losses = 0.0, []
        for i in self.group:
            s, t, a, e = self.model.component_losses(i, s, t)
            total = total + a + e
            losses += [a, e]
        self._losses = losses
        return s.detach(), t.detach(), total

    def update(self, total: torch.Tensor) -> None:
        """Backward of the local losses, then the step the schedule calls for."""
        params = list(self.params.values())
        for p in params:
            p.grad = None
        total.backward()
        n = len(self.group)
        with torch.no_grad():
            vals = torch.stack([l.detach() for l in self._losses]).cpu()
            self.sums += torch.cat([vals[0::2], vals[1::2]])
        self.batches += 1
        if self.delay == 0:
            self.optimizer.step()
            return
        self.queue.append([p.grad.detach().clone() if p.grad is not None else None for p in params])
        if len(self.queue) > self.delay:
            self._apply(self.queue.pop(0))
        del n

    def _apply(self, grads) -> None:
        for p, g in zip(self.params.values(), grads):
            p.grad = g
        self.optimizer.step()

    def drain(self) -> None:
        """End of epoch: apply the queued gradients in order (the epoch boundary is a flush)."""
        while self.queue:
            self._apply(self.queue.pop(0))


def delayed_sequential(model, epochs, opts, delay: int = 0, groups: list[list[int]] | None = None) -> dict:
    """The documented reference schedule in one process. ``epochs`` is a list of epochs, each a
    list of (x, y) mini-batches. For each group in order, for every epoch, for every mini-batch in
    order: forward, gradient, then the update of mini-batch k − delay; drain at each epoch's end.
    Groups can run one after the other because nothing flows upstream. With ``delay = 0`` this is
    sequential AL. Returns each group's loss sums over the last epoch."""
    groups = groups or [[i] for i in range(model.K)]
    inputs = [[(x, onehot(y, model.num_classes, x)) for x, y in batches] for batches in epochs]
    sums = {}
    for group in groups:
        worker = GroupTrainer(model, group, opts, delay)
        outputs = []
        for batches in inputs:
            worker.sums.zero_()
            out = []
            for s, t in batches:
                s, t, total = worker.forward(s, t)
                out.append((s, t))
                worker.update(total)
            worker.drain()
            outputs.append(out)
        inputs = outputs
        sums[tuple(group)] = worker.sums.clone()
    return sums


# --------------------------------------------------------------------------- the worker

def _setup(cfg: DictConfig):
    """Data and model exactly as bench.run.train.train builds them (same seeding order)."""
    import lightning as L

    from bench.data import create_datamodule
    from bench.models import create_model

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm = create_datamodule(cfg.data, seed=int(cfg.seed))
    dm.prepare_data()
    dm.setup("fit")
    model = create_model(cfg.model, dm.input_shape, dm.num_classes)
    return dm, model


def _loader(dm, split, train: bool, epoch: int = 0):
    from bench.data.loader import InMemoryLoader

    c = dm.cfg
    return InMemoryLoader(*split, c.batch_size if train else c.eval_batch_size, train=train, seed=dm.seed,
                          epoch=lambda: epoch, augment=train and bool(c.augment))


@torch.no_grad()
def evaluate(model, loader, classes: int, device) -> dict[str, float]:
    """Eq. 8 error (%) and loss (MSE to one-hot) over a loader."""
    was = model.training
    model.eval()
    wrong = n = 0
    loss = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += float(F.mse_loss(out, onehot(y, classes, out), reduction="sum")) / classes
        wrong += int((out.argmax(-1) != y).sum())
        n += len(y)
    model.train(was)
    return {"err1": 100.0 * wrong / max(n, 1), "loss": loss / max(n, 1)}


def run_worker(rank: int, world: int, cfg: DictConfig, run_dir: Path, groups: list[list[int]]) -> None:
    """One worker of the pipeline (process group already initialised)."""
    from bench.algorithms.associated import ALOptions
    from bench.checkpoint import load_checkpoint
    from bench.options import declared

    (run_dir / "pipeline").mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline" / f"worker{rank}.pid").write_text(str(os.getpid()))
    if int(cfg.trainer.threads) > 0:
        torch.set_num_threads(int(cfg.trainer.threads))
    cuda = str(cfg.trainer.accelerator) in ("gpu", "cuda") and torch.cuda.is_available()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    opts: ALOptions = declared("algorithm", "al").from_config(cfg.algorithm)
    dm, model = _setup(cfg)
    model.to(device)
    group = groups[rank]
    worker = GroupTrainer(model, group, opts, opts.delay)
    first_epoch, step, rows = 0, 0, []
    ckpt_path = run_dir / "last.ckpt"
    if ckpt_path.exists():
        saved = load_checkpoint(ckpt_path)
        model.load_state_dict({k.removeprefix("model."): v for k, v in saved["state_dict"].items()})
        worker.optimizer.load_state_dict(saved["optimizer_states"][rank])
        first_epoch, step, rows = int(saved["epoch"]) + 1, int(saved["global_step"]), list(saved["rows"])
        del saved
    epochs, max_steps = int(cfg.trainer.epochs), int(cfg.trainer.max_steps)
    classes = model.num_classes
    n_batches = len(_loader(dm, dm.train, True))
    B = int(cfg.data.batch_size)
    with torch.no_grad():  # the shapes of what this worker receives: s_{first−1}, t_{first−1}
        probe = torch.zeros((B, *dm.input_shape), device=device)
        for i in range(group[0]):
            probe = model.f[i](probe)
    s_shape, t_shape = probe.shape, (B, classes if group[0] == 0 else int(model.g[0][0].out_features))
    for epoch in range(first_epoch, epochs):
        if 0 <= max_steps <= step:
            break
        start = time.perf_counter()
        batches = min(n_batches, max_steps - step) if max_steps > 0 else n_batches
        it = iter(_loader(dm, dm.train, True, epoch)) if rank == 0 else None
        worker.sums.zero_()
        worker.batches = 0

        def first_inputs(k):
            x, y = next(it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            return x, onehot(y, classes, x)

        stream_batches(worker, rank, world, first_inputs, batches, s_shape, t_shape, device)
        worker.drain()
        step += batches
        train_s = time.perf_counter() - start
        payload = {"state": group_state(model, group), "optim": _cpu(worker.optimizer.state_dict()),
                   "sums": (worker.sums / max(worker.batches, 1)).tolist(), "group": group}
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        epoch_s = time.perf_counter() - start
        if rank == 0:
            state = {}
            for part in gathered:
                state.update(part["state"])
            model.load_state_dict(state, strict=False)
            row = {"epoch": epoch, "step": step, "time/epoch_s": epoch_s, "time/train_s": train_s,
                   "time/samples_per_s": batches * B / epoch_s}
            for part in gathered:
                n = len(part["group"])
                for j, i in enumerate(part["group"]):
                    row[f"al/assoc_{i + 1}"] = part["sums"][j]
                    row[f"al/ae_{i + 1}"] = part["sums"][n + j]
            if dm.val is not None and len(dm.val[1]):
                row.update({f"val/{k}": v for k, v in evaluate(model, _loader(dm, dm.val, False), classes, device).items()})
            rows.append(row)
            _write_epoch(run_dir, cfg, model, [p["optim"] for p in gathered], epoch, step, rows, groups)
    dist.barrier()
    if rank == 0:
        final = {}
        for name, split in (("test", dm.test), ("final_train", dm.train)):
            final.update({f"{name}/{k}": v for k, v in evaluate(model, _loader(dm, split, False), classes, device).items()})
        final.update({k[:-4] + "acc1": 100.0 - v for k, v in list(final.items()) if k.endswith("/err1")})
        _write_summary(run_dir, cfg, rows, "finished", final, world, groups, device)


def stream_batches(worker: GroupTrainer, rank: int, world: int, first_inputs, n: int, s_shape, t_shape, device,
                   on_batch=None) -> None:
    """``n`` mini-batches through this worker, the one loop every pipelined run and benchmark uses.

    Rank 0 takes (s_0, t_0) from ``first_inputs(k)``; every later rank receives them from rank − 1,
    with the next receive posted before this batch's compute so the transfer overlaps it. The
    outputs go to rank + 1 (nothing goes upstream), then the worker updates. ``on_batch(k)`` runs
    before batch k (a benchmark starts its clock there). Returns when the last send completed."""
    pending = _post_recv(s_shape, t_shape, device, rank - 1) if rank > 0 else None
    sends: list = []
    for k in range(n):
        if on_batch is not None:
            on_batch(k)
        if rank == 0:
            s_in, t_in = first_inputs(k)
        else:
            (s_in, t_in), works = pending
            for w in works:
                w.wait()
            pending = _post_recv(s_shape, t_shape, device, rank - 1) if k + 1 < n else None
        s, t, total = worker.forward(s_in, t_in)
        if rank < world - 1:
            for w in sends:
                w.wait()
            sends = [dist.isend(s.contiguous(), rank + 1), dist.isend(t.contiguous(), rank + 1)]
        worker.update(total)
    for w in sends:
        w.wait()


def _post_recv(s_shape, t_shape, device, src: int):
    s, t = torch.empty(s_shape, device=device), torch.empty(t_shape, device=device)
    return (s, t), [dist.irecv(s, src), dist.irecv(t, src)]


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _write_epoch(run_dir: Path, cfg, model, optim_states, epoch, step, rows, groups) -> None:
    from bench.config import config_hash
    from bench.results.io import write_csv

    write_csv(run_dir / "metrics.csv", rows)
    if bool(cfg.output.checkpoint):
        ckpt = {"epoch": epoch, "global_step": step,
                "state_dict": {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer_states": optim_states, "rows": rows,
                "pipeline": {"groups": groups, "delay": int(cfg.algorithm.get("delay", 0))},
                CKPT_KEY: {"config_hash": config_hash(cfg)}}
        tmp = run_dir / ".last.ckpt.tmp"
        torch.save(ckpt, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, run_dir / "last.ckpt")
    _write_summary(run_dir, cfg, rows, "running", {}, len(groups), groups, None)


def _write_summary(run_dir: Path, cfg, rows, status, final, world, groups, device, error: str | None = None) -> dict:
    import platform

    from bench.results.io import write_json

    times = [r["time/epoch_s"] for r in rows]
    best = min(rows, key=lambda r: r.get("val/err1", float("inf"))) if rows else {}
    summary = {
        "status": status, "run": str(run_dir),
        "table": cfg.table, "row": cfg.row, "column": cfg.column, "budget": cfg.budget, "seed": int(cfg.seed),
        "algorithm": cfg.algorithm.name, "model": cfg.model.name, "data": cfg.data.name,
        "epochs_done": len(rows), "last_epoch": rows[-1] if rows else {}, "final": final, "best": best,
        "time": {"epoch_s_mean": sum(times) / len(times) if times else None, "epoch_s": times,
                 "step_median_ms": None, "probe_s_total": 0.0},
        "memory": {"peak_mb": None},
        "torch": torch.__version__,
        "device": (f"{device.type} ({platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} threads per worker)" if device is not None else None),
        "world_size": world,
        "pipeline": {"workers": world, "groups": [[i + 1 for i in g] for g in groups],
                     "delay": int(cfg.algorithm.get("delay", 0))},
    }
    if error:
        summary["error"] = error
    write_json(run_dir / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- the launcher

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_entry(rank: int, world: int, port: int, cfg_yaml: str, run_dir: str, groups) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = OmegaConf.create(cfg_yaml)
    _join_and_run(rank, world, cfg, Path(run_dir), groups)


def _join_and_run(rank, world, cfg, run_dir, groups) -> None:
    cuda = str(cfg.trainer.accelerator) in ("gpu", "cuda") and torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        run_worker(rank, world, cfg, run_dir, groups)
    finally:
        dist.destroy_process_group()


def plan_groups(cfg: DictConfig, model) -> list[list[int]]:
    workers = int(cfg.algorithm.get("workers", 0)) or model.K
    return partition(component_costs(model), workers)


def train_pipelined(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train (or resume, or skip) one pipelined AL run; returns its summary."""
    import torch.multiprocessing as mp

    from bench.checkpoint import load_checkpoint
    from bench.config import ConfigError, config_hash
    from bench.results.io import read_json, write_text

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = read_json(summary_path)
        if summary.get("status") == "finished":
            return summary
    ckpt = run_dir / "last.ckpt"
    saved_epoch = None
    if ckpt.exists():
        head = load_checkpoint(ckpt, mmap=True)
        if head.get(CKPT_KEY, {}).get("config_hash") not in (None, config_hash(cfg)):
            raise ConfigError(f"checkpoint {ckpt} is from a different config; delete it to start over")
        saved_epoch = int(head["epoch"])
        print(f"resuming {run_dir}: {saved_epoch + 1} of {int(cfg.trainer.epochs)} epochs done "
              f"(step {int(head['global_step'])}), training continues with epoch {saved_epoch + 1} "
              f"(numbered from 0, as in metrics.csv)", file=sys.stderr, flush=True)
        del head
    for stale in run_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    _, model = _setup_model_only(cfg)
    groups = plan_groups(cfg, model)
    world = len(groups)
    del model

    env_rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    env_world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS"))
    if env_rank is not None and env_world is not None and int(env_world) > 1:
        if int(env_world) != world:
            raise ConfigError(f"trainer.pipeline=pipelined: the launcher started {env_world} processes, the pipeline "
                              f"has {world} workers (algorithm.workers)")
        _join_and_run(int(env_rank), world, cfg, run_dir, groups)
        return read_json(summary_path) if int(env_rank) == 0 else {"status": "finished"}

    ctx = mp.start_processes(_worker_entry, args=(world, _free_port(), OmegaConf.to_yaml(cfg), str(run_dir), groups),
                             nprocs=world, start_method="spawn", join=False)
    try:
        while not ctx.join(timeout=0.5):
            pass
    except mp.ProcessExitedException as exc:
        return _failed(run_dir, cfg, groups, exc.error_index, f"died ({_why(exc)})")
    except mp.ProcessRaisedException as exc:
        last = [l for l in str(exc).strip().splitlines() if l.strip()][-1].strip()
        return _failed(run_dir, cfg, groups, exc.error_index, f"raised {last}")
    except BaseException:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(5)
            if p.is_alive():
                p.kill()
        raise
    return read_json(summary_path)


def _why(exc) -> str:
    import signal

    if exc.exit_code is not None and exc.exit_code < 0:
        try:
            return signal.Signals(-exc.exit_code).name
        except ValueError:
            return f"signal {-exc.exit_code}"
    return f"exit status {exc.exit_code}"


def _failed(run_dir: Path, cfg, groups, index: int, what: str) -> dict:
    from bench.checkpoint import load_checkpoint

    ckpt = run_dir / "last.ckpt"
    where = "none"
    if ckpt.exists():
        where = f"{ckpt} (epoch {int(load_checkpoint(ckpt, mmap=True)['epoch'])})"
    comps = ", ".join(str(i + 1) for i in groups[index])
    line = (f"pipeline: worker {index} (component{'s' if len(groups[index]) > 1 else ''} {comps}) {what}; "
            f"stopped the other workers; last checkpoint: {where}")
    print(line, file=sys.stderr, flush=True)
    rows = []
    if ckpt.exists():
        rows = list(load_checkpoint(ckpt)["rows"])
    return _write_summary(run_dir, cfg, rows, "failed", {}, len(groups), groups, None, error=line)


def _setup_model_only(cfg: DictConfig):
    """The model (for the partition) without loading the data: shapes from the data config."""
    from bench.models import create_model

    dm_shape, classes = _data_shape(cfg)
    torch.manual_seed(int(cfg.seed))
    return None, create_model(cfg.model, dm_shape, classes)


def _data_shape(cfg) -> tuple[tuple[int, ...], int]:
    name = str(cfg.data.name)
    if name == "synthetic":
        return tuple(int(v) for v in cfg.data.shape), int(cfg.data.num_classes)
    if name in ("mnist", "fmnist"):
        return (1, 28, 28), 10
    if name in ("cifar10", "cifar100"):
        return (3, 32, 32), 10 if name == "cifar10" else 100
    raise ValueError(f"pipeline: no input shape known for data.name={name}")


def format_exc_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()
