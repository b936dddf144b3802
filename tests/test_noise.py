"""SharedNoise: identical streams for identical seeds (DDP ranks), continued across a checkpoint."""
import torch

from bench.feedback.noise import SharedNoise


def test_same_seed_same_stream_and_state_continues_after_load():
    rank0, rank1, other = SharedNoise(5), SharedNoise(5), SharedNoise(6)
    first = torch.randn(3, generator=rank0.generator("cpu"))
    assert torch.equal(first, torch.randn(3, generator=rank1.generator("cpu")))
    assert not torch.equal(first, torch.randn(3, generator=other.generator("cpu")))
    resumed = SharedNoise(5)
    resumed.load(rank0.state())
    assert resumed.state() is not None  # a pending state is saved again if the run stops before drawing
    assert torch.equal(torch.randn(4, generator=rank0.generator("cpu")), torch.randn(4, generator=resumed.generator("cpu")))


# --------------------------------------------------------------------------- the base class's registry
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402

import pytest  # noqa: E402

from bench.algorithms import RULES  # noqa: E402
from bench.models import create_model  # noqa: E402

# rule → its stream's name, and the checkpoint the rule wrote before the registry (old run folders)
STREAMS = {
    "bp_noise": ("bp_noise", lambda s: {"noise_generator": s}),
    "dtp": ("tp_noise", lambda s: {"tp_noise_generator": s}),
    "eprop": ("ep_sign", lambda s: {"eprop_sign_generator": s}),
    "wm": ("mirror", lambda s: {"mirror": {"steps": 3, "generator": s}}),
}


def build(small_cfg, rule):
    cfg = small_cfg(f"algorithm.name={rule}", "seed=4")
    return RULES.get(rule)(cfg, create_model(cfg.model, (12,), 3), 3, (12,))


@pytest.mark.parametrize("rule", sorted(STREAMS))
def test_noise_stream_resumes_exactly_from_new_and_old_checkpoints(small_cfg, rule):
    name, legacy = STREAMS[rule]
    module = build(small_cfg, rule)
    assert list(module.noise_streams) == [name]
    gen = module.noise_streams[name].generator("cpu")
    torch.randn(5, generator=gen)  # the run has drawn from it
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["noise_streams"]) == {name}
    ahead = torch.randn(7, generator=gen)
    from_seed = torch.randn(7, generator=build(small_cfg, rule).noise_streams[name].generator("cpu"))
    assert not torch.equal(from_seed, ahead)
    for saved in (checkpoint, legacy(checkpoint["noise_streams"][name])):
        resumed = build(small_cfg, rule)
        resumed.on_load_checkpoint(saved)
        assert torch.equal(torch.randn(7, generator=resumed.noise_streams[name].generator("cpu")), ahead), saved.keys()
        if rule == "wm":
            assert resumed._mirror_steps == saved.get("mirror", {}).get("steps", 0)
    # a checkpoint without the stream (none drawn yet) starts it again from its seed, as before
    fresh = build(small_cfg, rule)
    fresh.on_load_checkpoint({})
    assert torch.equal(torch.randn(7, generator=fresh.noise_streams[name].generator("cpu")), from_seed)


def test_a_stream_name_is_registered_once(small_cfg):
    module = build(small_cfg, "bp_noise")
    with pytest.raises(ValueError, match="already registered"):
        module.add_noise_stream("bp_noise", SharedNoise(1))
    assert build(small_cfg, "fa").noise_streams == {}


RUN = ["data.name=synthetic", "data.shape=[12]", "data.num_classes=3", "data.n_train=288", "data.n_test=48",
       "data.val_size=32", "data.batch_size=16", "data.eval_batch_size=64", "model.depth=2", "model.width=8",
       "algorithm.name=bp_noise", "trainer.epochs=3", "trainer.threads=1", "probe.every=0",
       "output.progress=none", "seed=2"]


def test_old_run_folder_with_the_legacy_noise_key_resumes_exactly(tmp_path, monkeypatch, capsys):
    """A bp_noise run stopped after epoch 0 whose last.ckpt holds the stream under the pre-registry
    key ``noise_generator`` resumes to the uninterrupted run's weights; the same folder with the
    stream dropped does not (the noise then restarts from its seed)."""
    from bench import cli
    from bench.callbacks.timing import EpochTimer

    def run(root):
        cli.main(["run", *RUN, f"output.root={root}"])

    def weights(root):
        (ckpt,) = root.rglob("last.ckpt")
        return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]

    threads = torch.get_num_threads()
    try:
        run(tmp_path / "reference")
        original = EpochTimer.on_train_epoch_end

        def sigterm_after_first_epoch(self, trainer, pl_module):
            original(self, trainer, pl_module)
            if trainer.current_epoch == 0:
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(EpochTimer, "on_train_epoch_end", sigterm_after_first_epoch)
        with pytest.raises(SystemExit) as stopped:
            run(tmp_path / "old")
        assert stopped.value.code == 143
        monkeypatch.setattr(EpochTimer, "on_train_epoch_end", original)
        shutil.copytree(tmp_path / "old", tmp_path / "dropped")
        for root, keep in (("old", True), ("dropped", False)):
            (path,) = (tmp_path / root).rglob("last.ckpt")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            state = ckpt.pop("noise_streams")["bp_noise"]
            assert state is not None and json.loads((path.parent / "summary.json").read_text())["epochs_done"] == 1
            if keep:
                ckpt["noise_generator"] = state  # as bp_noise wrote it before the registry
            torch.save(ckpt, path)
            run(tmp_path / root)
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().err.count("resuming ") == 2
    reference, old, dropped = (weights(tmp_path / r) for r in ("reference", "old", "dropped"))
    assert reference.keys() == old.keys()
    for key in reference:
        torch.testing.assert_close(old[key], reference[key], rtol=0, atol=1e-6, msg=key)
    assert max(float((dropped[k] - reference[k]).abs().max()) for k in reference) > 1e-3
