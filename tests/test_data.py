"""Data loading: exact values from small files in the real on-disk formats, splits, sharding,
augmentation and the missing-data error."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import bench.data.vision as vision
from bench.data import DATASETS, DataUnavailable, InMemoryLoader, create_datamodule
from bench.data.base import split_indices
from bench.data.idx import read_idx
from bench.data.loader import PAD, crop_flip, draw_crop_flip
from bench.data.synthetic import make_synthetic
from bench.registry import UnknownChoice

DEFAULTS = dict(
    name="synthetic", root="data", batch_size=4, eval_batch_size=5, val_size=0, train_subset=None,
    download=False, verify=True, augment=False, normalize="none", num_workers=0, image_size=8,
    shape=[2], num_classes=3, n_train=40, n_test=10,
)


def make_cfg(**overrides):
    return OmegaConf.create({**DEFAULTS, **overrides})


def loaded(**overrides):
    dm = create_datamodule(make_cfg(**overrides), seed=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def collect(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ---- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_mnist_like(folder: Path, ext: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 7, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(folder / (stem + ext), array)
    return arrays


def assert_mnist_like(dm, arrays):
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10
    for loader, prefix in [(dm.train_eval_dataloader(), "train"), (dm.test_dataloader(), "t10k")]:
        x, y = collect(loader)
        images = torch.from_numpy(arrays[f"{prefix}-images-idx3-ubyte"])
        expected = images.float().unsqueeze(1) / 255
        assert torch.equal(x, expected)
        assert y.tolist() == arrays[f"{prefix}-labels-idx1-ubyte"].tolist()


@pytest.mark.parametrize("ext", ["", ".gz"])
def test_read_idx_returns_exact_array(tmp_path, ext):
    array = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / f"a{ext}", array)
    assert np.array_equal(read_idx(tmp_path / f"a{ext}"), array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "magic").write_bytes(b"\x00\x00\x0d\x01" + (2).to_bytes(4, "big") + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic.*00000d01"):
        read_idx(tmp_path / "magic")
    write_idx(tmp_path / "short", np.zeros((2, 3), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    expected = r"short: header promises shape \(2, 3\) \(6 bytes\), file holds 5"
    with pytest.raises(ValueError, match=expected):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("subdir, ext", [("FashionMNIST/raw", ".gz"), ("", "")])
def test_fmnist_reads_idx_files_exactly(tmp_path, subdir, ext):
    arrays = write_mnist_like(tmp_path / subdir, ext)
    assert_mnist_like(loaded(name="fmnist", root=str(tmp_path)), arrays)


def test_mnist_reads_torchvision_layout_exactly(tmp_path):
    arrays = write_mnist_like(tmp_path / "MNIST" / "raw", "")
    assert_mnist_like(loaded(name="mnist", root=str(tmp_path)), arrays)


DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed"
)
def test_debian_fmnist_has_the_rlra_split_sizes(tmp_path):
    dm = loaded(
        name="fmnist", root=str(tmp_path), val_size=2000, batch_size=32, eval_batch_size=1000
    )
    assert (len(dm.train[1]), len(dm.val[1]), len(dm.test[1])) == (58000, 2000, 10000)
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10
    assert dm.test[1][:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # first t10k labels
    assert dm.train[0].min() == 0 and dm.train[0].max() == 1
    assert len(dm.train_dataloader()) == 58000 // 32 and len(dm.test_dataloader()) == 10


# ---- CIFAR pickle batches ------------------------------------------------------------------

def write_cifar(root: Path, batches: dict[str, int], label_key: str, meta: tuple[str, str, int]):
    """Pickle batches as the CIFAR python versions ship them; returns name -> (data, labels)."""
    rng = np.random.default_rng(1)
    folder = root / ("cifar-10-batches-py" if label_key == "labels" else "cifar-100-python")
    folder.mkdir(parents=True)
    written = {}
    for name, n in batches.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, meta[2], n).tolist()
        with open(folder / name, "wb") as f:
            batch = {"batch_label": name, label_key: labels, "data": data, "filenames": [""] * n}
            pickle.dump(batch, f)
        written[name] = (data, labels)
    with open(folder / meta[0], "wb") as f:
        pickle.dump({meta[1]: [f"class{i}" for i in range(meta[2])]}, f)
    return written


def expected_images(*datas):
    return torch.from_numpy(np.concatenate(datas)).reshape(-1, 3, 32, 32).float() / 255


def test_cifar10_reads_pickle_batches_exactly(tmp_path):
    batches = {f"data_batch_{i}": i for i in range(1, 6)} | {"test_batch": 3}
    written = write_cifar(tmp_path, batches, "labels", ("batches.meta", "label_names", 10))
    dm = loaded(name="cifar10", root=str(tmp_path), verify=False)
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == 10
    train = [written[f"data_batch_{i}"] for i in range(1, 6)]
    x, y = collect(dm.train_eval_dataloader())
    assert torch.equal(x, expected_images(*(d for d, _ in train)))
    assert y.tolist() == sum((labels for _, labels in train), [])
    x, y = collect(dm.test_dataloader())
    assert torch.equal(x, expected_images(written["test_batch"][0]))
    assert y.tolist() == written["test_batch"][1]


def test_cifar100_reads_fine_labels_exactly(tmp_path):
    meta = ("meta", "fine_label_names", 100)
    written = write_cifar(tmp_path, {"train": 6, "test": 4}, "fine_labels", meta)
    dm = loaded(name="cifar100", root=str(tmp_path), verify=False)
    assert dm.num_classes == 100
    for loader, name in [(dm.train_eval_dataloader(), "train"), (dm.test_dataloader(), "test")]:
        x, y = collect(loader)
        assert torch.equal(x, expected_images(written[name][0]))
        assert y.tolist() == written[name][1]


def test_cifar_with_verify_rejects_files_failing_md5(tmp_path):
    write_cifar(tmp_path, {"train": 2, "test": 2}, "fine_labels", ("meta", "fine_label_names", 100))
    with pytest.raises(DataUnavailable, match="cifar100 data unavailable.*cifar-100-python"):
        loaded(name="cifar100", root=str(tmp_path), verify=True)


# ---- ImageFolder (ImageNet) ----------------------------------------------------------------

COLOURS = {"a_red": (200, 10, 30), "b_blue": (5, 60, 250)}


def test_imagenet_reads_image_folders(tmp_path):
    for split, count in [("train", 3), ("val", 2)]:
        for cls, colour in COLOURS.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (10, 12), colour).save(tmp_path / split / cls / f"{i}.png")
    dm = loaded(name="imagenet", root=str(tmp_path), val_size=2, batch_size=2, eval_batch_size=3)
    assert dm.input_shape == (3, 8, 8) and dm.num_classes == 2
    assert (len(dm.train), len(dm.val), len(dm.train_eval), len(dm.test)) == (4, 2, 4, 4)
    # solid images: any crop or resize keeps the colour
    colours = torch.tensor(list(COLOURS.values())).float() / 255
    for loader in [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]:
        for x, y in loader:
            assert x.shape[1:] == (3, 8, 8)
            assert torch.allclose(x, colours[y][:, :, None, None].expand_as(x), atol=1e-6)
    assert collect(dm.test_dataloader())[1].tolist() == [0, 0, 1, 1]


# ---- synthetic -----------------------------------------------------------------------------

def test_synthetic_is_deterministic_per_seed_and_differs_across_seeds():
    cfg = make_cfg(shape=[1, 4, 4])
    a, b, c = make_synthetic(cfg, 0), make_synthetic(cfg, 0), make_synthetic(cfg, 1)
    assert a.train_x.shape == (40, 1, 4, 4) and a.test_x.shape == (10, 1, 4, 4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_is_learnable_by_a_linear_rule():
    """Nearest class mean (a linear classifier) fitted on train clearly beats chance (1/10)."""
    a = make_synthetic(make_cfg(shape=[20], num_classes=10, n_train=1000, n_test=500), seed=0)
    means = torch.stack([a.train_x[a.train_y == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(a.test_x, means).argmin(1) == a.test_y).float().mean()
    assert accuracy > 0.9


# ---- splits and normalization --------------------------------------------------------------

def test_val_split_is_seeded_disjoint_and_sized():
    train, val = split_indices(100, 20, None, seed=3)
    assert (len(train), len(val)) == (80, 20)
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    again, other = split_indices(100, 20, None, seed=3), split_indices(100, 20, None, seed=4)
    assert torch.equal(again[1], val) and not torch.equal(other[1], val)
    subset, val_with_subset = split_indices(100, 20, 30, seed=3)
    assert len(subset) == 30 and set(subset.tolist()) <= set(train.tolist())
    assert torch.equal(val_with_subset, val)


def test_datamodule_holds_out_val_rows_of_the_training_set():
    dm = loaded(val_size=10, train_subset=25)
    raw = make_synthetic(dm.cfg, seed=0)
    rows = {tuple(r) for r in raw.train_x.tolist()}
    train_rows = {tuple(r) for r in dm.train[0].tolist()}
    val_rows = {tuple(r) for r in dm.val[0].tolist()}
    assert (len(train_rows), len(val_rows)) == (25, 10)
    assert train_rows | val_rows <= rows and not train_rows & val_rows


def test_standard_normalization_uses_training_split_statistics():
    dm = loaded(shape=[3, 2, 2], normalize="standard", val_size=10)
    mean, std = dm.train[0].mean(dim=(0, 2, 3)), dm.train[0].std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5)
    assert torch.allclose(std, torch.ones(3), atol=1e-5)
    assert not torch.allclose(dm.val[0].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3)


def test_bad_settings_fail_with_one_line():
    with pytest.raises(ValueError, match="data.augment=true is for 32x32 colour images"):
        loaded(augment=True)
    with pytest.raises(ValueError, match="data.normalize='zca'; valid choices: none, standard"):
        loaded(normalize="zca")
    with pytest.raises(UnknownChoice, match="unknown dataset 'svhn'; valid choices: cifar10"):
        create_datamodule(make_cfg(name="svhn"))
    assert DATASETS.names() == ["cifar10", "cifar100", "fmnist", "fortunes", "imagenet", "mnist", "synthetic",
                               "wikitext103", "wikitext2"]



def test_cifar10_crop_trains_on_random_24x24_windows_and_evaluates_on_the_centre(tmp_path):
    # sfa Table 2, CIFAR-10 Model 1: 24×24×3 random crops; evaluation on the centre crop
    written = write_cifar(tmp_path, {f"data_batch_{i}": 6 for i in range(1, 6)} | {"test_batch": 5},
                          "labels", ("batches.meta", "label_names", 10))
    dm = loaded(name="cifar10", root=str(tmp_path), verify=False, crop=24)
    assert dm.input_shape == (3, 24, 24)
    full = expected_images(*(written[f"data_batch_{i}"][0] for i in range(1, 6)))
    x, _ = collect(dm.test_dataloader())
    assert x.shape == (5, 3, 24, 24) and torch.equal(x, expected_images(written["test_batch"][0])[..., 4:28, 4:28])
    x, _ = collect(dm.train_eval_dataloader())
    assert torch.equal(x, full[..., 4:28, 4:28])
    # every 24×24 window of every image: (image, top·9 + left, pixels)
    windows = full.unfold(2, 24, 1).unfold(3, 24, 1).permute(0, 2, 3, 1, 4, 5).reshape(len(full), 81, -1)
    offsets = []
    for epoch in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=epoch)
        for xb, yb in dm.train_dataloader():
            assert xb.shape == (4, 3, 24, 24)
            for crop in xb:  # each crop is exactly one 24×24 window of one training image
                hits = (windows == crop.reshape(1, 1, -1)).all(-1).nonzero().tolist()
                assert len(hits) == 1, hits
                offsets.append(divmod(hits[0][1], 9))  # (top, left)
    assert len(set(offsets)) > 20  # 56 crops over 81 possible offsets: about 40 distinct
    with pytest.raises(ValueError, match=r"data.crop=40 must lie in \[1, 32\]"):
        loaded(name="cifar10", root=str(tmp_path), verify=False, crop=40)


def test_crops_under_two_ranks_at_batch_b_equal_one_rank_at_2b():
    from bench.data.crop import CropLoader

    n, b = 43, 4
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(9))

    def batches(batch_size, rank=0, world_size=1, epoch=0):
        return list(CropLoader(x, torch.arange(n), batch_size, rank=rank, world_size=world_size, train=True,
                               seed=7, epoch=lambda: epoch, augment=True, size=24))

    for epoch in (0, 1):
        single = batches(2 * b, epoch=epoch)
        ranks = [batches(b, rank=r, world_size=2, epoch=epoch) for r in (0, 1)]
        assert len(single) == len(ranks[0]) == n // (2 * b)
        for (xs, ys), (x0, y0), (x1, y1) in zip(single, *ranks):
            assert xs.shape[-2:] == (24, 24)
            assert torch.equal(ys, torch.cat([y0, y1])) and torch.equal(xs, torch.cat([x0, x1]))


# ---- loader: order, sharding, augmentation -------------------------------------------------

def epoch_batches(n, batch_size, rank=0, world_size=1, epoch=0, train=True, augment=False):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    x += torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(9))  # distinct pixels
    loader = InMemoryLoader(x, torch.arange(n), batch_size, rank=rank, world_size=world_size,
                            train=train, seed=7, epoch=lambda: epoch, augment=augment)
    batches = list(loader)
    assert len(batches) == len(loader)
    return batches


@pytest.mark.parametrize("augment", [False, True])
def test_two_ranks_at_batch_b_see_what_one_rank_sees_at_2b(augment):
    n, b = 43, 4
    for epoch in (0, 1):
        single = epoch_batches(n, 2 * b, epoch=epoch, augment=augment)
        ranks = [
            epoch_batches(n, b, rank=r, world_size=2, epoch=epoch, augment=augment) for r in (0, 1)
        ]
        assert len(single) == len(ranks[0]) == len(ranks[1]) == n // (2 * b)  # last partial dropped
        for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks):
            assert torch.equal(y, torch.cat([y0, y1])) and torch.equal(x, torch.cat([x0, x1]))
    orders = [torch.cat([y for _, y in epoch_batches(n, b, epoch=e)]) for e in (0, 1)]
    assert not torch.equal(orders[0], orders[1])


@pytest.mark.parametrize("n, sizes", [
    (23, ([5, 5, 1], [5, 5, 2])),  # 2 full global batches of 10, then 3 split 1 + 2
    (21, ([5, 5], [5, 5, 1])),  # 1 left over: rank 0's share is empty, so it has one batch less
])
def test_eval_sharding_serves_every_sample_once(n, sizes):
    shards = [epoch_batches(n, 5, rank=r, world_size=2, train=False) for r in (0, 1)]
    assert tuple([len(y) for _, y in shard] for shard in shards) == sizes
    ys = torch.cat([y for shard in shards for _, y in shard])
    assert sorted(ys.tolist()) == list(range(n))


def test_crop_flip_matches_pad_crop_flip_per_sample():
    x = torch.rand(6, 3, 32, 32)
    params = draw_crop_flip(6, torch.Generator().manual_seed(0))
    params[0], params[1] = torch.tensor([PAD, PAD, 0]), torch.tensor([PAD, PAD, 1])
    out = crop_flip(x, params)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(2))
    for i, (dy, dx, flip) in enumerate(params.tolist()):
        expected = torch.nn.functional.pad(x[i], (PAD,) * 4)[:, dy : dy + 32, dx : dx + 32]
        assert torch.equal(out[i], expected.flip(2) if flip else expected)


def test_datamodule_reads_rank_world_size_and_epoch_from_the_trainer():
    dm = loaded(val_size=0)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, current_epoch=3)
    loader = dm.train_dataloader()
    assert (loader.rank, loader.world_size, loader.epoch()) == (1, 2, 3)
    expected = InMemoryLoader(
        *dm.train, 4, rank=1, world_size=2, train=True, seed=0, epoch=lambda: 3
    )
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(loader, expected, strict=True))


class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch[1].tolist())
        return (self.w * batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_trainer_sees_the_seeded_order_of_each_epoch():
    dm = create_datamodule(make_cfg(n_train=20), seed=5)
    model = Recorder()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, dm)
    for epoch in (0, 1):
        loader = InMemoryLoader(*dm.train, 4, train=True, seed=5, epoch=lambda: epoch)
        assert model.seen[epoch] == torch.cat([y for _, y in loader]).tolist()


# ---- missing data --------------------------------------------------------------------------

@pytest.mark.parametrize("name, where", [
    ("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
    ("imagenet", "train"), ("fmnist", "FashionMNIST/raw"),
])
def test_missing_data_raises_one_line_naming_dataset_and_path(tmp_path, monkeypatch, name, where):
    monkeypatch.setattr(vision, "DEBIAN_FMNIST", tmp_path / "no-debian-copy")
    with pytest.raises(DataUnavailable) as info:
        loaded(name=name, root=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name} data unavailable: looked in ")
    assert str(tmp_path / where) in message and "to get it: " in message
    assert info.value.dataset == name and str(tmp_path / where) in info.value.looked_in
    if name == "fmnist":
        assert "apt-get install dataset-fashion-mnist" in message
