"""Train one run from a resolved config: data → model → rule → Lightning Trainer → run folder.

A run folder that already holds a finished summary is skipped (its checkpoint is never opened);
one with ``last.ckpt`` and no final status resumes from it (Lightning restores weights,
optimizer, scheduler, loop and callback state; the rule's feedback tensors are buffers, so they
travel in the state dict). Every checkpoint load is ``weights_only=True`` (bench/checkpoint.py).

The run's name, config hash and folder come in a :class:`~bench.run.plan.RunPlan`, computed once;
its trainer and output values are checked once (:func:`check_runtime`): by the caller that made the
plan (``bench run``, ``bench table``), or here when :func:`train` is given a bare config.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

from bench.algorithms import RULES
from bench.callbacks.divergence import DivergenceGuard
from bench.callbacks.probe import AlignmentProbe
from bench.callbacks.timing import EpochTimer
from bench.console import interactive, under_ci
from bench.checkpoint import SafeCheckpointIO, load_checkpoint
from bench.config import ConfigError
from bench.data import create_datamodule
from bench.models import create_model
from bench.results.run import CKPT_KEY, FINAL_STATUSES, holds_config, read_summary
from bench.run.plan import RunPlan
from bench.run.recorder import RunRecorder

# Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (to keep fork-based strategies safe),
# which makes torch.optim query NVML on *every* optimizer step: ~0.1 ms per step on a machine
# with a CUDA build and no GPU. The suite never forks after touching CUDA (DDP uses the
# subprocess launcher), so the ordinary CUDA-runtime check is safe and free.
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)


def quiet_lightning() -> None:
    """Silence advice that does not apply here, so the output a researcher reads is the run's."""
    for pattern in (".*sync_dist=True.*",  # values are reduced before logging (torchmetrics/max)
                    ".*LeafSpec.*", ".*weights_only.*", ".*does not have many workers.*",
                    ".*smaller than the logging interval.*", ".*litlogger.*"):
        warnings.filterwarnings("ignore", pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)


OUTPUT_CHOICES = {"wandb": ("online", "offline", "disabled"), "progress": ("auto", "rich", "none")}


def check_runtime(cfg: DictConfig) -> None:
    """One ConfigError line for a trainer or output value Lightning or W&B would reject mid-run."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    t = cfg.trainer
    choices = {
        "trainer.accelerator": ("auto", *sorted(AcceleratorRegistry.available_accelerators()), "gpu"),
        "trainer.strategy": ("auto", *StrategyRegistry.available_strategies()),
        "trainer.precision": typing.get_args(_PRECISION_INPUT_STR) + typing.get_args(_PRECISION_INPUT_STR_ALIAS),
        **{f"output.{k}": v for k, v in OUTPUT_CHOICES.items()},
    }
    for key, valid in choices.items():
        value = OmegaConf.select(cfg, key)
        if str(value) not in valid:
            raise ConfigError(f"{key}={value!r} is not valid; valid choices: {', '.join(valid)}")
    for key in ("devices", "num_nodes"):
        if int(t[key]) < 1 and not (key == "devices" and int(t[key]) == -1):
            raise ConfigError(f"trainer.{key}={t[key]} is not valid; a positive count" + (" or -1 (all)" if key == "devices" else ""))


def show_progress(cfg: DictConfig) -> bool:
    mode = str(cfg.output.progress)
    if mode == "auto":
        return interactive(sys.stderr)
    return mode == "rich"


def build_trainer(plan: RunPlan, callbacks: list) -> L.Trainer:
    """The run's Lightning Trainer. Its checkpoint loads are ``weights_only=True`` (the
    :class:`SafeCheckpointIO` plugin), including ``fit(ckpt_path=...)``'s resume."""
    cfg, run_dir = plan.cfg, plan.run_dir
    t = cfg.trainer
    strategy = t.strategy
    if strategy == "ddp":
        # Feedback tensors are drawn from the same seed on every rank, so broadcasting buffers
        # every forward (DDP's default) would only cost time.
        strategy = DDPStrategy(broadcast_buffers=False)
    if show_progress(cfg):
        callbacks = [*callbacks, RichProgressBar()]
    # No Lightning CSV logger: its logs/metrics.csv held the same epoch metrics as the run folder's
    # metrics.csv and the same probe values as probe.csv, in another layout (one row per logging
    # call, train and probe values on separate rows), was rewritten from scratch on every resume
    # (hence one folder per attempt), and nothing read it. The run folder has one metrics.csv, ours.
    loggers = []
    if cfg.output.wandb != "disabled" and not under_ci():  # W&B is never required, and off under CI
        from lightning.pytorch.loggers import WandbLogger

        # The W&B run id is a function of the run name, so a resumed run continues its W&B run.
        wandb_id = hashlib.sha1(f"{run_dir.resolve()}".encode()).hexdigest()[:16]
        loggers.append(WandbLogger(project="bpfree-bench", name=plan.run_name, mode=cfg.output.wandb,
                                   save_dir=str(run_dir), id=wandb_id, resume="allow"))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_epochs=t.epochs, max_steps=t.max_steps, deterministic=t.deterministic,
        callbacks=callbacks, logger=loggers or False, enable_progress_bar=show_progress(cfg),
        plugins=[SafeCheckpointIO()],
        enable_checkpointing=True,  # RunRecorder is the checkpoint callback
        enable_model_summary=False, num_sanity_val_steps=0,
        # Lightning shards torch DataLoaders (ImageNet) with a DistributedSampler and leaves the
        # in-memory loaders, which shard by rank themselves, untouched.
        use_distributed_sampler=True,
        log_every_n_steps=50, default_root_dir=str(run_dir),
    )


def check_same_config(plan: RunPlan, checkpoint: bool = True) -> None:
    """Refuse to skip or resume a run folder that holds a run of another config, or (with
    ``checkpoint``) whose ``last.ckpt`` is not plain data or was written for another config."""
    if not holds_config(plan.run_dir, plan.config_hash):
        raise ConfigError(f"run folder {plan.run_dir} holds a run of a different config; delete it, or pass "
                          f"output.root=<another folder>")
    if checkpoint:
        checkpoint_header(plan)


def checkpoint_header(plan: RunPlan) -> dict | None:
    """The run folder's ``last.ckpt`` (None if there is none), loaded ``weights_only=True`` and memory-
    mapped (only the small entries are read, not the weights), after checking it is this config's."""
    ckpt = plan.run_dir / "last.ckpt"
    if not ckpt.exists():
        return None
    saved = load_checkpoint(ckpt, mmap=True)  # a file that is not plain data: one line, its payload never runs
    saved_hash = saved.get(CKPT_KEY, {}).get("config_hash")
    if saved_hash is not None and saved_hash != plan.config_hash:
        raise ConfigError(f"checkpoint {ckpt} is from a different config (hash {saved_hash}, this run "
                          f"{plan.config_hash}); delete it to start over, or pass output.root=<another folder>")
    return saved


def resume_line(run_dir: Path, saved: dict, epochs: int) -> str:
    """The one line a resumed run prints. Epochs are numbered from 0, as in metrics.csv."""
    done = int(saved.get("epoch", -1)) + 1  # the checkpoint is written at the end of epoch `epoch`
    return (f"resuming {run_dir}: {done} of {epochs} epochs done (step {int(saved.get('global_step', 0))}), "
            f"training continues with epoch {done} (numbered from 0, as in metrics.csv)")


def plan_run(cfg: DictConfig, run_dir: str | Path | None = None) -> RunPlan:
    """The plan of a composed config, its trainer and output values checked (:func:`check_runtime`)."""
    check_runtime(cfg)
    return RunPlan.of(cfg, run_dir)


def train(run: RunPlan | DictConfig, run_dir: str | Path | None = None, retry_failed: bool = True) -> dict:
    """Train (or resume, or skip) one run and return its summary. ``run`` is the run's plan, whose
    trainer values its maker has checked, or a bare config, which is checked and planned here
    (``run_dir`` then overrides its folder)."""
    if isinstance(run, RunPlan):
        if run_dir is not None:
            raise TypeError("train(plan, run_dir): a plan carries its run folder")
        plan = run
    else:
        plan = plan_run(run, run_dir)
    cfg, run_dir = plan.cfg, plan.run_dir
    check_same_config(plan, checkpoint=False)
    summary = read_summary(run_dir)  # before the checkpoint: a finished run is skipped unopened
    if summary and summary["status"] in ("finished", "diverged"):
        return summary
    if summary and summary["status"] == "failed" and not retry_failed:
        return summary
    if cfg.trainer.pipeline == "pipelined":  # Associated Learning's pipelined trainer (its own launcher)
        from bench.run.pipeline import train_pipelined

        return train_pipelined(cfg, run_dir)
    saved = checkpoint_header(plan)
    quiet_lightning()
    if int(cfg.trainer.threads) > 0:
        torch.set_num_threads(int(cfg.trainer.threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    datamodule = create_datamodule(cfg.data, seed=int(cfg.seed))
    datamodule.prepare_data()
    datamodule.setup("fit")
    try:
        model = create_model(cfg.model, datamodule.input_shape, datamodule.num_classes)
        module = RULES.get(str(cfg.algorithm.name))(cfg, model, datamodule.num_classes, datamodule.input_shape)
    except (ValueError, NotImplementedError) as exc:
        # A rule that is not defined on this model (or a model that cannot take this data) refuses
        # while it is built, before any step: that is a config error, one line and exit status 2.
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{cfg.algorithm.name} on {cfg.model.name}: {str(exc).strip().splitlines()[0]}") from exc

    probe, timer, guard = AlignmentProbe(), EpochTimer(), DivergenceGuard()
    recorder = RunRecorder(plan, probe=probe, timer=timer, checkpoint=bool(cfg.output.checkpoint), guard=guard)
    ckpt = recorder.ckpt_path if saved is not None else None
    trainer = build_trainer(plan, [timer, probe, guard, recorder])
    if ckpt is not None and trainer.is_global_zero:
        print(resume_line(run_dir, saved, int(cfg.trainer.epochs)), file=sys.stderr, flush=True)
    del saved
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)

    final = {}
    if module.status != "diverged":
        results = trainer.test(module, dataloaders=[datamodule.test_dataloader(), datamodule.train_eval_dataloader()],
                               verbose=False)
        for per_loader in results:
            final.update({k.split("/dataloader_idx")[0]: float(v) for k, v in per_loader.items()})
        # accuracies too, for the tables that report them (dfa, sfa): acc = 100 − error
        final.update({k[:-4] + "acc" + k[-1]: 100.0 - v for k, v in list(final.items()) if k[:-1].endswith("/err")})
    status = module.status if module.status == "diverged" else "finished"
    summary = recorder.write_summary(trainer, module, status, final=final) if trainer.is_global_zero else {"status": status}
    assert status in FINAL_STATUSES
    return summary
