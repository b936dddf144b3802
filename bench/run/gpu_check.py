"""``make gpu-check``: every rule family on CUDA, in fp32 and bf16-mixed, in one short script.

What it checks, and writes to ``results/perf/gpu.csv`` (one row per check):

* **steps** — every registered rule, on every zoo model kind it is defined on (a small MLP, a
  small CNN, ResNet-18 with the CIFAR stem, VGG-16 with the CIFAR head, the transformer LM), in
  fp32 and under bf16 autocast: a few manual training steps on the device; the loss must be
  finite and every trainable parameter must receive a finite ``.grad`` (that is what a rule
  promises: its update reaches the optimiser as ``.grad``). A rule that refuses a model says why
  in one line, and the row records the refusal (not a failure).
* **trainer** — one rule per family through the real Trainer (``bench.run.train``) on the MLP, in
  fp32 and bf16-mixed: the run must finish, its probe angles must be finite, and its summary must
  hold the epoch time and the peak memory.
* **ratios** — the update-time ratios of ``make perf``'s core rows on the device (FA, uSF, DFA
  and rec-LRA ÷ BP; the 3×800 MLP and ResNet-18 CIFAR, batch 128) and the grape benchmark's two
  targets (GrAPE ÷ DFA and PEPITA ÷ BP on the grape-1 MLP, batch 256), interleaved as
  ``make perf`` does, with a device synchronisation around every timed update.
* **memory** — DFA's feedback-matrix bytes on VGG-16 (unified, micro), measured on the device,
  against the closed form l_max·e.

``--toy`` runs the same script on the CPU at toy sizes (tiny widths, 16×16 images, 2 repeats):
the test suite runs it so that the script itself cannot rot while no GPU is lent. On one H100 or
H200 the full run is sized to finish within 5 minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.config import compose
from bench.results.io import write_csv

# (kind, model overrides at full size, at toy size, input shape full/toy, classes)
MODELS = [
    ("mlp", ["model.name=mlp", "model.depth=3", "model.width=800"], ["model.name=mlp", "model.depth=2", "model.width=16"],
     (1, 28, 28), (1, 8, 8), 10),
    ("cnn", ["model.name=cnn", "model.channels=[32,64,64]"], ["model.name=cnn", "model.channels=[4,8]", "model.kernel=3"],
     (3, 32, 32), (3, 16, 16), 10),
    ("resnet18", ["model.name=timm:resnet18", "model.cifar_stem=true"], ["model.name=timm:resnet18", "model.cifar_stem=true"],
     (3, 32, 32), (3, 16, 16), 10),
    ("vgg16", ["model.name=timm:vgg16", "model.cifar_stem=true"],
     ["model.name=timm:vgg16", "model.cifar_stem=true", "model.head_width=16"], (3, 32, 32), (3, 32, 32), 100),
    ("transformer", ["model.name=transformer", "model.n_layer=2", "model.n_embd=128"],
     ["model.name=transformer", "model.n_layer=1", "model.n_embd=16", "model.n_head=2"], (64,), (8,), 256),
]
# One rule per family for the Trainer runs (the other rules of a family share its machinery).
TRAINER_RULES = ("bp", "fa", "dense_fa", "usf_sn", "kp", "dfa", "rlra", "dtp", "eprop")
# (case, model overrides, input shape, rules timed against BP, batch)
RATIO_CASES = [
    ("mlp-3x800", ["model.name=mlp", "model.depth=3", "model.width=800", "model.activation=tanh"], (1, 28, 28),
     ("fa", "usf_init", "usf_sn", "dfa", "rlra"), 128),
    ("resnet18-cifar", ["model.name=timm:resnet18", "model.cifar_stem=true"], (3, 32, 32),
     ("fa", "usf_sn", "dfa", "rlra"), 128),
    # the grape benchmark's two targets (GrAPE ÷ DFA ≤ 1.5, PEPITA ÷ BP ≤ 1.0), whose CPU misses
    # come from a serial random generator and elementwise work that a GPU runs differently
    ("grape-1 mlp 2x1024", ["model.name=mlp", "model.depth=2", "model.width=1024", "model.activation=tanh"], (1, 28, 28),
     ("dfa", "grape", "pepita"), 256),
]
# ratios between two non-BP rules, reported where a case times both
RATIO_PAIRS = (("grape", "dfa"),)
PRECISIONS = ("32-true", "bf16-mixed")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _module(rule: str, overrides: list[str], shape: tuple[int, ...], classes: int, device: torch.device):
    from bench.algorithms import RULES
    from bench.models import create_model

    cfg = compose(overrides=[f"algorithm.name={rule}", "data.name=synthetic",
                             f"data.shape=[{','.join(map(str, shape))}]", f"data.num_classes={classes}", *overrides])
    torch.manual_seed(0)
    model = create_model(cfg.model, tuple(shape), classes)
    return RULES.get(rule)(cfg, model, classes, tuple(shape)).to(device)


def _batch(shape, classes: int, batch: int, device: torch.device):
    if len(shape) == 1:  # token ids: next-token targets of the same length
        x = torch.randint(0, classes, (batch, *shape), device=device)
        return x, torch.randint(0, classes, (batch, *shape), device=device)
    return torch.randn(batch, *shape, device=device), torch.randint(0, classes, (batch,), device=device)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_steps(device: torch.device, toy: bool) -> list[dict]:
    """A few manual steps of every rule on every model kind and precision: finite loss, every
    trainable parameter gets a finite .grad, or a one-line refusal."""
    steps, batch = (1, 2) if toy else (3, 16)
    from bench.algorithms import RULES

    rows = []
    for kind, full, small, shape_full, shape_toy, classes in MODELS:
        overrides, shape = (small, shape_toy) if toy else (full, shape_full)
        for rule in RULES.names():
            for precision in PRECISIONS:
                row = {"check": "steps", "model": kind, "rule": rule, "precision": precision}
                try:
                    module = _module(rule, overrides, shape, classes, device)
                except (ValueError, NotImplementedError) as exc:  # ConfigError is a ValueError
                    rows.append({**row, "status": "refused", "detail": str(exc).splitlines()[0][:200]})
                    continue
                try:
                    module.train()
                    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3)
                    x, y = _batch(shape, classes, batch, device)
                    for _ in range(steps):
                        optimizer.zero_grad(set_to_none=True)
                        with _autocast(device, precision):
                            surrogate, _, loss = module.objective(x, y)
                        surrogate.backward()
                        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
                        missing = [n for n, p in trainable if p.grad is None]
                        bad = [n for n, p in trainable if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
                        if not bool(torch.isfinite(loss.detach()).all()) or missing or bad:
                            raise AssertionError(f"loss {float(loss.detach().float().mean()):.4g}; no .grad: {missing[:3]}; non-finite .grad: {bad[:3]}")
                        optimizer.step()
                    _sync(device)
                    rows.append({**row, "status": "ok", "detail": f"loss {float(loss.detach().float().mean()):.4f}"})
                except Exception as exc:  # noqa: BLE001 - a row per failure; the script goes on
                    rows.append({**row, "status": "FAILED", "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                finally:
                    del module
    return rows


def check_trainer(device: torch.device, toy: bool) -> list[dict]:
    """One rule per family through the real Trainer: finishes, finite probe angles, epoch time and
    peak memory in the summary."""
    from bench.results.io import read_csv
    from bench.run.train import train

    accelerator = "gpu" if device.type == "cuda" else "cpu"
    rows = []
    for rule in TRAINER_RULES:
        for precision in PRECISIONS:
            row = {"check": "trainer", "model": "mlp", "rule": rule, "precision": precision}
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    cfg = compose(overrides=[
                        f"algorithm.name={rule}", "model.name=mlp", "model.depth=2", f"model.width={16 if toy else 256}",
                        "data.name=synthetic", f"data.n_train={64 if toy else 1024}", "data.n_test=32", "data.val_size=32",
                        "data.batch_size=16", "trainer.epochs=1", "trainer.max_steps=3", f"trainer.accelerator={accelerator}",
                        f"trainer.precision={precision}", "probe.every=1", f"output.root={tmp}", "output.progress=none",
                        *(["algorithm.n_free=5", "algorithm.n_nudged=2"] if rule == "eprop" else [])])
                    summary = train(cfg)
                    if summary["status"] != "finished":
                        raise AssertionError(f"status {summary['status']}: {summary.get('error') or summary.get('divergence')}")
                    run_dir = next(Path(tmp).rglob("summary.json")).parent
                    probe = read_csv(run_dir / "probe.csv")
                    angles = [float(v) for r in probe for k, v in r.items() if k.startswith("align/") and v not in ("", None)]
                    if not angles or not all(math.isfinite(a) for a in angles):
                        raise AssertionError(f"probe angles missing or non-finite ({len(angles)} values)")
                    epoch_s = (summary.get("time") or {}).get("epoch_s_mean")
                    memory = summary.get("memory") or {}
                    if not epoch_s or not memory:
                        raise AssertionError(f"summary lacks epoch time ({epoch_s}) or memory ({memory})")
                    rows.append({**row, "status": "ok",
                                 "detail": f"{len(angles)} probe values; epoch {epoch_s:.3f} s; memory {memory}"[:200]})
                except Exception as exc:  # noqa: BLE001
                    rows.append({**row, "status": "FAILED",
                                 "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else traceback.format_exc(limit=1)}"})
    return rows


def check_ratios(device: torch.device, toy: bool) -> list[dict]:
    """Update time ÷ BP, interleaved in one process as ``make perf`` does, synchronised."""
    import random

    rows = []
    repeats, iters = (2, 1) if toy else (10, 5)
    for case, overrides, shape, rules, batch in RATIO_CASES:
        batch = 4 if toy else batch
        if toy:
            overrides = [o for o in overrides if "width" not in o] + (["model.width=16"] if "mlp" in case else [])
            shape = (shape[0], 16, 16) if len(shape) == 3 and shape[0] == 3 else shape
        modules = {r: _module(r, overrides, shape, 10, device) for r in ("bp", *rules)}
        x, y = _batch(shape, 10, batch, device)

        def update(m):
            for p in m.parameters():
                p.grad = None
            surrogate, _, _ = m.objective(x, y)
            surrogate.backward()

        for m in modules.values():  # warm-up: kernels, allocator, cuDNN autotuning
            update(m)
        times = {r: [] for r in modules}
        order = list(modules)
        for _ in range(repeats):
            random.shuffle(order)
            for r in order:
                _sync(device)
                start = time.perf_counter()
                for _ in range(iters):
                    update(modules[r])
                _sync(device)
                times[r].append((time.perf_counter() - start) / iters)
        for r in rules:
            ratio = statistics.median(t / b for t, b in zip(times[r], times["bp"]))
            rows.append({"check": "ratio", "model": case, "rule": r, "precision": "32-true", "status": "ok",
                         "detail": f"update {1000 * statistics.median(times[r]):.3f} ms", "value": round(ratio, 3)})
        for r, base in RATIO_PAIRS:
            if r in times and base in times:
                ratio = statistics.median(t / b for t, b in zip(times[r], times[base]))
                rows.append({"check": "ratio", "model": case, "rule": f"{r} / {base}", "precision": "32-true",
                             "status": "ok", "detail": f"{r} ÷ {base} update time, batch {batch}",
                             "value": round(ratio, 3)})
        del modules
    return rows


def check_dfa_memory(device: torch.device, toy: bool) -> list[dict]:
    """DFA's feedback bytes on VGG-16 (unified, micro), measured, against the closed form l_max·e."""
    from bench.models import point_sizes

    overrides = ["model.name=timm:vgg16", "model.cifar_stem=true"] + (["model.head_width=16"] if toy else [])
    shape, classes = (3, 32, 32), 100
    module = _module("dfa", overrides, shape, classes, device)
    measured = sum(b.numel() * b.element_size() for b in module.feedback.buffers())
    sizes = list(point_sizes(module.model, shape, "micro").values())
    expected = max(sizes) * classes * 4
    return [{"check": "memory", "model": "vgg16", "rule": "dfa", "precision": "32-true",
             "status": "ok" if measured == expected else "FAILED",
             "detail": f"feedback {measured / 2**20:.2f} MiB; closed form l_max·e = {expected / 2**20:.2f} MiB",
             "value": measured}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="CPU, toy sizes: checks the script itself (the test suite runs it)")
    parser.add_argument("--out", default=None, help="CSV to write (default results/perf/gpu.csv; --toy: no file unless given)")
    parser.add_argument("--only", nargs="*", default=None, choices=("steps", "trainer", "ratios", "memory"))
    args = parser.parse_args(argv)
    if not args.toy and not torch.cuda.is_available():
        print("error: gpu-check needs CUDA (none found); `--toy` runs the same script on the CPU at toy sizes",
              file=sys.stderr)
        return 2
    from bench.run.train import quiet_lightning

    quiet_lightning()
    device = torch.device("cpu" if args.toy else "cuda")
    start = time.perf_counter()
    checks = {"steps": check_steps, "trainer": check_trainer, "ratios": check_ratios, "memory": check_dfa_memory}
    rows = []
    for name, fn in checks.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        got = fn(device, args.toy)
        rows += got
        failed = [r for r in got if r["status"] == "FAILED"]
        print(f"{name}: {len(got)} rows, {len(failed)} failed ({time.perf_counter() - t0:.0f} s)", flush=True)
        for r in failed:
            print(f"  FAILED {r['model']} {r['rule']} {r['precision']}: {r['detail']}", flush=True)
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (toy sizes)"
    for r in rows:
        r.setdefault("value", "")
        r["device"] = device_name
    out = args.out or (None if args.toy else "results/perf/gpu.csv")
    if out:
        columns = ["check", "model", "rule", "precision", "status", "value", "detail", "device"]
        write_csv(Path(out), [{k: r.get(k, "") for k in columns} for r in rows])
        print(f"wrote {out}")
    failed = sum(r["status"] == "FAILED" for r in rows)
    print(f"gpu-check: {len(rows)} rows, {failed} failed, {time.perf_counter() - start:.0f} s on {device_name}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
