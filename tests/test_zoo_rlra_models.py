"""The rlra zoo: pseudo-convolution and pResNet-18, the locally-connected layer and network, and
the CIFAR-10 GCN + ZCA preprocessing (rlra §3.3, §4 and appendix). Numbers by hand."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bench.feedback.replaced import convert_to_feedback
from bench.models import MODELS
from bench.models.pseudo_conv import PseudoConv2d

# ---------------------------------------------------------------------------- pseudo-convolution


def hand_layer(in_channels: int, fanout: int, noise: list, weight: list, bias: float) -> PseudoConv2d:
    layer = PseudoConv2d(in_channels, 1, (2, 2), fanout=fanout)
    with torch.no_grad():
        layer.noise.copy_(torch.tensor(noise))
        layer.combine.weight.copy_(torch.tensor(weight).view(1, -1, 1, 1))
        layer.combine.bias.fill_(bias)
    return layer


def test_pseudo_conv_equals_the_formula_on_a_one_channel_example():
    """z = Σ_m w^m relu(x + n^m) + b, one input map perturbed by M = 2 masks (fanout 2)."""
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]]).view(1, 1, 2, 2)
    n1, n2 = [[-0.5, 1.0], [-1.0, 0.0]], [[0.25, 3.0], [0.0, -4.0]]
    layer = hand_layer(1, 2, [n1, n2], [2.0, -1.0], 0.5)
    # x + n1 = [[0.5, -1], [-0.5, 3]] → relu [[0.5, 0], [0, 3]]
    # x + n2 = [[1.25, 1], [0.5, -1]] → relu [[1.25, 1], [0.5, 0]]
    # 2·first − second + 0.5
    expected = torch.tensor([[0.25, -0.5], [0.0, 6.5]]).view(1, 1, 2, 2)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.perturbed(x), torch.tensor([[[0.5, 0.0], [0.0, 3.0]],
                                                                 [[1.25, 1.0], [0.5, 0.0]]]).view(1, 2, 2, 2))
    assert layer.masks == 2 and layer.weight.shape == (1, 2)


def test_pseudo_conv_pairs_input_map_m_with_noise_map_m():
    """fanout 1: z = Σ_m w^m relu(x^m + n^m) + b with one mask per input map."""
    x = torch.tensor([[[1.0, -1.0], [2.0, 0.0]], [[0.0, 1.0], [-3.0, 1.0]]]).unsqueeze(0)
    layer = hand_layer(2, 1, [[[0.0, 2.0], [-3.0, 1.0]], [[1.0, -2.0], [4.0, -1.0]]], [1.0, 3.0], -1.0)
    # relu(x1 + n1) = [[1, 1], [0, 1]];  relu(x2 + n2) = [[1, 0], [1, 0]]
    expected = torch.tensor([[1 + 3 - 1, 1 + 0 - 1], [0 + 3 - 1, 1 + 0 - 1]]).view(1, 1, 2, 2).float()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_pseudo_conv_noise_is_gaussian_at_its_level_and_checks_the_input_shape():
    torch.manual_seed(0)
    layer = PseudoConv2d(8, 4, (16, 16), fanout=2, level=0.1)
    assert layer.noise.shape == (16, 16, 16)
    assert abs(layer.noise.std().item() - 0.1) < 0.005 and abs(layer.noise.mean().item()) < 0.005
    assert [n for n, _ in layer.named_parameters()] == ["combine.weight", "combine.bias"]
    assert "noise" in layer.state_dict()
    with pytest.raises(ValueError, match=r"expects inputs of shape \(B, 8, 16, 16\)"):
        layer(torch.zeros(1, 8, 8, 8))


def test_pseudo_conv_local_update_is_the_papers_delta_w():
    """Δw^{c,m} = Σ_{b,i,j} e[b,c,i,j] relu(x^m + n^m)[b,i,j] — the gradient of ⟨e, z⟩."""
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]]).view(1, 1, 2, 2)
    layer = hand_layer(1, 2, [[[-0.5, 1.0], [-1.0, 0.0]], [[0.25, 3.0], [0.0, -4.0]]], [2.0, -1.0], 0.5)
    e = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]).view(1, 1, 2, 2)
    delta = PseudoConv2d.local_update(e, layer.perturbed(x))
    # Σ e·[[0.5, 0], [0, 3]] = 0.5 + 1.5 = 2;  Σ e·[[1.25, 1], [0.5, 0]] = 1.25 + 2 − 0.5 = 2.75
    torch.testing.assert_close(delta, torch.tensor([2.0, 2.75]).view(1, 2, 1, 1))
    torch.manual_seed(1)
    big = PseudoConv2d(3, 5, (4, 4), fanout=2)
    xb, eb = torch.randn(6, 3, 4, 4), torch.randn(6, 5, 4, 4)
    (grad,) = torch.autograd.grad((big(xb) * eb).sum(), big.combine.weight)
    torch.testing.assert_close(PseudoConv2d.local_update(eb, big.perturbed(xb)), grad, rtol=1e-5, atol=1e-5)


def test_under_bp_only_the_combination_weights_learn_and_the_masks_never_change():
    torch.manual_seed(0)
    layer = PseudoConv2d(2, 3, (4, 4), fanout=2)
    noise = layer.noise.clone()
    weight = layer.combine.weight.detach().clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randn(5, 2, 4, 4)
    loss = layer(x).square().mean()
    loss.backward()
    assert not layer.noise.requires_grad and layer.noise.grad is None
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == {"combine.weight", "combine.bias"}
    opt.step()
    torch.testing.assert_close(layer.noise, noise, rtol=0, atol=0)
    assert (layer.combine.weight - weight).abs().amax() > 1e-3


# ---------------------------------------------------------------------------- pResNet-18


@pytest.mark.parametrize("masks", [64, 160, 256])
def test_presnet18_forward_and_one_bp_step(masks):
    torch.manual_seed(0)
    model = MODELS.get("presnet18")(input_shape=(3, 32, 32), num_classes=10, masks=masks)
    convs = model.pseudo_convs()
    assert len(convs) == 16
    modules = dict(model.named_modules())
    first, last = modules[convs[0]], modules[convs[-1]]
    assert first.masks == masks and first.noise.shape == (masks, 32, 32)
    assert last.masks == 8 * masks and last.noise.shape == (8 * masks, 4, 4)
    noise = {n: b.clone() for n, b in model.named_buffers() if n.endswith("noise")}
    assert len(noise) == 16
    assert not any(n.endswith("noise") for n, _ in model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    logits = model(x)
    assert logits.shape == (2, 10)
    loss = F.cross_entropy(logits, y)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(modules[c].combine.weight.grad is not None for c in convs)
    opt.step()
    assert all(torch.equal(b, noise[n]) for n, b in model.named_buffers() if n in noise)
    if masks == 64:
        from bench.models.base import count_params

        assert torch.isfinite(F.cross_entropy(model(x), y))
        widths = [64, 128, 256, 512]
        # 1×1 combinations: conv1 (C_in → C) and conv2 (C → C) of both blocks of every stage
        combine = sum(cin * c + 3 * c * c for cin, c in zip([64, *widths[:-1]], widths))
        assert sum(p.numel() for n, p in model.named_parameters() if ".combine." in n) == combine == 1_220_608
        stem, bns = 3 * 64 * 9 + 2 * 64, sum(2 * 2 * 2 * c for c in widths)
        shortcuts = sum(cin * c + 2 * c for cin, c in zip(widths[:-1], widths[1:]))
        assert count_params(model) == combine + stem + bns + shortcuts + (512 * 10 + 10) == 1_409_098


def test_presnet18_points_are_timm_resnet18s():
    torch.manual_seed(0)
    model = MODELS.get("presnet18")(input_shape=(3, 32, 32), num_classes=10, widths=[4, 8, 8, 16])
    reference = MODELS.get("timm:resnet18")(input_shape=(3, 32, 32), num_classes=10, cifar_stem=True)
    for g in ("micro", "macro"):
        assert model.feedback_points(g) == reference.feedback_points(g)
    modules = dict(model.named_modules())
    assert modules["net.layer2.0.conv1"].noise.shape == (4, 32, 32)  # before the block's 2×2 pool
    assert modules["net.layer2.0.conv2"].noise.shape == (8, 16, 16)
    assert modules["net.layer4.1.conv2"].noise.shape == (16, 4, 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------------------- locally connected


def naive_lc(layer, x: torch.Tensor) -> torch.Tensor:
    """Position by position: out[:, :, i, j] = W_{ij} · patch_{ij}(x) + b[:, i, j]."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    ho, wo = layer.out_size
    out = torch.empty(x.shape[0], layer.out_channels, ho, wo)
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].reshape(x.shape[0], -1)
            out[:, :, i, j] = patch @ layer.weight[i * wo + j].t() + layer.bias[:, i, j]
    return out


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), (1, 1)])
def test_lc_layer_equals_a_per_position_loop(stride, padding):
    from bench.models.locally_connected import LocallyConnected2d

    torch.manual_seed(0)
    layer = LocallyConnected2d(2, 3, (5, 4), 3, stride=stride, padding=padding)
    x = torch.randn(4, 2, 5, 4)
    out = layer(x)
    assert out.shape == (4, 3, *layer.out_size)
    torch.testing.assert_close(out, naive_lc(layer, x), rtol=1e-5, atol=1e-5)
    # untied: changing one position's weights changes that output position only
    with torch.no_grad():
        layer.weight[0] += 1.0
    changed = (layer(x) - out).abs().sum(dim=(0, 1)) > 0
    assert changed.flatten().tolist() == [True] + [False] * (changed.numel() - 1)


def test_lc_layer_by_hand_and_its_local_update():
    """One 1-channel 3×3 input, 2×2 kernel, stride 1, no padding: four positions, four filters."""
    from bench.models.locally_connected import LocallyConnected2d

    layer = LocallyConnected2d(1, 1, 3, 2, bias=True)
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[1.0, 0, 0, 0]], [[0, 1.0, 0, 0]], [[0, 0, 1.0, 0]], [[1.0, 1.0, 1.0, 1.0]]]))
        layer.bias.copy_(torch.tensor([[[0.5, 0.0], [0.0, -1.0]]]))
    # patches: (1,2,4,5) (2,3,5,6) (4,5,7,8) (5,6,8,9) → 1 + .5, 3, 7, 28 − 1
    torch.testing.assert_close(layer(x), torch.tensor([[[[1.5, 3.0], [7.0, 27.0]]]]))
    e = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]])
    delta = layer.local_update(e, layer.patches(x))
    torch.testing.assert_close(delta, torch.tensor([[[1.0, 2, 4, 5]], [[-2.0, -3, -5, -6]], [[8.0, 10, 14, 16]],
                                                    [[0.0, 0, 0, 0]]]))
    (grad,) = torch.autograd.grad((layer(x) * e).sum(), layer.weight)
    torch.testing.assert_close(delta, grad)


def test_lcnet_is_bartunovs_cifar_network():
    from bench.models.base import count_params, point_sizes

    torch.manual_seed(0)
    model = MODELS.get("lcnet")(input_shape=(3, 32, 32), num_classes=10)
    assert point_sizes(model, (3, 32, 32)) == {
        "features.0.act": 64 * 16 * 16, "features.1.act": 128 * 8 * 8, "features.2.act": 256 * 8 * 8}
    lc = lambda cin, cout, k, side: side * side * cout * (cin * k * k + 1)  # noqa: E731 untied weights + biases
    by_hand = lc(3, 64, 5, 16) + lc(64, 128, 5, 8) + lc(128, 256, 3, 8) + (256 * 8 * 8 * 10 + 10)
    assert count_params(model) == by_hand == 33_415_178
    # the LC layers convert too (to FALocallyConnected2d), with the classifier
    assert sorted(convert_to_feedback(copy.deepcopy(model))) == [
        "classifier", "features.0.lc", "features.1.lc", "features.2.lc"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lcnet_norm_options_and_forward():
    torch.manual_seed(0)
    model = MODELS.get("lcnet")(input_shape=(3, 12, 12), num_classes=4, channels=[4, 6], kernel=3, stride=[2, 1],
                                batchnorm=True, layernorm=True, dropout=0.1, activation="relu", init="gaussian")
    block = model.features[1]
    assert list(block._modules) == ["lc", "bn", "ln", "act", "drop"]
    assert block.ln.normalized_shape == (6, 6, 6) and block.bn.num_features == 6
    model.train()
    loss = F.cross_entropy(model(torch.randn(3, 3, 12, 12)), torch.tensor([0, 1, 3]))
    loss.backward()
    assert torch.isfinite(loss) and model.features[0].lc.weight.grad.shape == (36, 4, 27)


# ---------------------------------------------------------------------------- GCN + ZCA


def test_gcn_by_hand():
    """Per image and channel: minus the channel's own mean; then the image scaled to L2 norm `scale`."""
    from bench.data.whitening import gcn

    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[5.0, 5.0], [7.0, 7.0]]]])  # one 2-channel 2×2 image
    # centred: [[-2, -1], [0, 3]] and [[-1, -1], [1, 1]]; squared norm 14 + 4 = 18
    expected = torch.tensor([[[[-2.0, -1.0], [0.0, 3.0]], [[-1.0, -1.0], [1.0, 1.0]]]]) / 18 ** 0.5
    torch.testing.assert_close(gcn(x, scale=1.0), expected)
    torch.testing.assert_close(gcn(x, scale=55.0), 55 * expected)
    torch.manual_seed(0)
    batch = gcn(torch.rand(7, 3, 8, 8) * 255)  # default scale 55
    torch.testing.assert_close(batch.mean(dim=(2, 3)), torch.zeros(7, 3), rtol=0, atol=1e-4)
    torch.testing.assert_close(batch.flatten(1).norm(dim=1), torch.full((7,), 55.0))
    assert gcn(torch.full((1, 3, 2, 2), 9.0)).abs().max() == 0  # a flat image stays zero


def test_zca_by_hand_on_a_rotated_2d_set():
    """Σ = R diag(4, 1) Rᵀ (R a 45° rotation) → W = R diag(1/2, 1) Rᵀ = [[.75, −.25], [−.25, .75]]."""
    from bench.data.whitening import ZCA

    points = torch.tensor([[2.0, 1.0], [-2.0, 1.0], [2.0, -1.0], [-2.0, -1.0]]) + torch.tensor([3.0, -1.0])
    c = 0.5 ** 0.5
    rotation = torch.tensor([[c, -c], [c, c]])
    x = (points - torch.tensor([3.0, -1.0])) @ rotation.T + torch.tensor([3.0, -1.0])  # rotate about the mean
    zca = ZCA.fit(x, epsilon=0.0)
    torch.testing.assert_close(zca.mean, torch.tensor([3.0, -1.0]))
    torch.testing.assert_close(zca.matrix, torch.tensor([[0.75, -0.25], [-0.25, 0.75]]))
    white = zca(x)
    torch.testing.assert_close(white.T @ white / 4, torch.eye(2), rtol=0, atol=1e-6)
    # ε shrinks each component: (4 + 1)^-½ and (1 + 1)^-½ along the two axes
    shrunk = ZCA.fit(x, epsilon=1.0).matrix
    d = torch.diag(torch.tensor([5 ** -0.5, 2 ** -0.5]))
    torch.testing.assert_close(shrunk, rotation @ d @ rotation.T)


def test_zca_whitened_training_data_has_identity_covariance():
    from bench.data.whitening import ZCA, gcn

    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(48, 48, generator=g) * torch.logspace(-1, 1, 48)  # strongly correlated, anisotropic
    x = gcn((torch.randn(3000, 48, generator=g) @ mixing).view(3000, 3, 4, 4))
    zca = ZCA.fit(x, epsilon=1e-6)
    white = zca(x).flatten(1)
    cov = (white - white.mean(0)).T @ (white - white.mean(0)) / len(white)
    # GCN removes 3 directions (each image's 3 channel means are 0): those eigenvalues are 0 and stay 0
    eig = torch.linalg.eigvalsh(cov.double())
    assert (eig[:3].abs() < 1e-3).all() and (eig[3:] - 1).abs().max() < 1e-3
    assert torch.allclose(zca.matrix, zca.matrix.T, atol=1e-5)  # ZCA (not PCA): rotated back, symmetric


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_zca_with_fewer_samples_than_dimensions_equals_the_full_eigendecomposition(epsilon):
    """The thin-SVD route (N < D) gives the matrix the D×D eigendecomposition gives."""
    from bench.data.whitening import ZCA

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 48, generator=g, dtype=torch.float64) @ torch.randn(48, 48, generator=g, dtype=torch.float64)
    zca = ZCA.fit(x, epsilon)
    centered = x - x.mean(0)
    eigvals, eigvecs = torch.linalg.eigh(centered.T @ centered / 20)
    total = eigvals.clamp_min(0) + epsilon
    keep = total > 1e-9  # 29 null directions: 0 with ε = 0, ε^-½ otherwise
    scales = torch.where(keep, total.clamp_min(1e-9).rsqrt(), torch.zeros_like(total))
    torch.testing.assert_close(zca.matrix.double(), (eigvecs * scales) @ eigvecs.T, rtol=1e-4, atol=1e-4)
    white = zca(x.float()).double()
    cov = (white - white.mean(0)).T @ (white - white.mean(0)) / 20
    assert torch.linalg.matrix_rank(cov, atol=1e-3) == 19


def test_cifar10_gcn_zca_loader_on_pickle_batches(tmp_path, monkeypatch):
    """data.normalize=gcn_zca on real-format CIFAR-10 files: GCN per image, ZCA fitted on the
    training split only (validation and test use it too), cached on disk and reused."""
    import pickle

    import numpy as np
    from omegaconf import OmegaConf

    import bench.data.whitening as whitening
    from bench.data import create_datamodule
    from bench.data.base import split_indices

    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    raw = {}
    for name, n in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 3)]:
        raw[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": rng.integers(0, 10, n).tolist(), "data": raw[name],
                         "filenames": [""] * n}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    cfg = OmegaConf.create(dict(name="cifar10", root=str(tmp_path), batch_size=4, eval_batch_size=5, val_size=5,
                                train_subset=None, download=False, verify=False, augment=False, normalize="gcn_zca",
                                num_workers=0))

    def images(*arrays):
        return torch.from_numpy(np.concatenate(arrays)).reshape(-1, 3, 32, 32).float() / 255

    dm = create_datamodule(cfg, seed=0)
    dm.setup("fit")
    all_train = images(*(raw[f"data_batch_{i}"] for i in range(1, 6)))
    train_idx, val_idx = split_indices(20, 5, None, 0)
    zca = whitening.ZCA.fit(whitening.gcn(all_train[train_idx]), whitening.ZCA_EPSILON)
    torch.testing.assert_close(dm.train[0], zca(whitening.gcn(all_train[train_idx])), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dm.val[0], zca(whitening.gcn(all_train[val_idx])), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dm.test[0], zca(whitening.gcn(images(raw["test_batch"]))), rtol=1e-4, atol=1e-4)
    assert dm.train[0].shape == (15, 3, 32, 32) and dm.input_shape == (3, 32, 32)
    torch.testing.assert_close(dm.train[0].flatten(1).mean(0), torch.zeros(3072), rtol=0, atol=1e-4)
    cached = list((tmp_path / ".zca-cache").glob("zca-*.pt"))
    assert len(cached) == 1
    # a second run reads the cached fit: no eigendecomposition happens
    monkeypatch.setattr(whitening.torch.linalg, "eigh", lambda *a: pytest.fail("ZCA refitted despite the cache"))
    again = create_datamodule(cfg, seed=0)
    again.setup("fit")
    torch.testing.assert_close(again.train[0], dm.train[0], rtol=0, atol=0)
    assert isinstance(again, whitening.WhitenedDataModule) and again.preprocessing == "gcn_zca"


def test_fa_locally_connected_sends_the_error_through_fixed_feedback():
    """FA twin of an LC layer: δx = fold(B_lᵀ δz_l) (the input gradient of an LC layer whose weights
    are B), ΔW and Δb exactly backprop's; use_feedback=False is backprop."""
    from bench.feedback.replaced import fa_locally_connected
    from bench.models.locally_connected import LocallyConnected2d

    torch.manual_seed(0)
    layer = LocallyConnected2d(2, 3, (5, 5), 3, stride=2, padding=1)
    feedback = torch.randn_like(layer.weight)
    fa = fa_locally_connected(layer, feedback)
    assert fa.weight is layer.weight and [n for n, _ in fa.named_parameters()] == ["weight", "bias"]
    x, delta = torch.randn(4, 2, 5, 5, requires_grad=True), torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(fa(x), layer(x))
    gx, gw, gb = torch.autograd.grad((fa(x) * delta).sum(), (x, fa.weight, fa.bias))
    bx, bw, bb = torch.autograd.grad((layer(x) * delta).sum(), (x, layer.weight, layer.bias))
    shadow = LocallyConnected2d(2, 3, (5, 5), 3, stride=2, padding=1)
    with torch.no_grad():
        shadow.weight.copy_(feedback)
    (expected_x,) = torch.autograd.grad((shadow(x) * delta).sum(), x)
    torch.testing.assert_close(gx, expected_x)
    torch.testing.assert_close(gw, bw) and torch.testing.assert_close(gb, bb)
    assert (gx - bx).abs().amax() > 1e-2
    fa.use_feedback = False
    torch.testing.assert_close(torch.autograd.grad((fa(x) * delta).sum(), x)[0], bx)


def test_fa_rule_converts_every_lc_layer_of_lcnet_with_per_position_feedback():
    """The fa rule (convert_to_feedback) turns lcnet's LC layers into FA twins: B has the weight's
    shape, each position's B is its own draw with the dense-layer variance (kaiming: 1/fan_out), and
    the rule's probe mode (true_gradient) recovers backprop."""
    from bench.feedback.replaced import FeedbackLayer
    from bench.feedback.replaced import FALocallyConnected2d
    from bench.run.perf import build_module

    module = build_module("fa", ["model.name=lcnet", "model.channels=[4,8,8]", "algorithm.feedback_init=kaiming"], [3, 16, 16])
    lc = [m for m in module.model.modules() if isinstance(m, FALocallyConnected2d)]
    assert len(lc) == 3
    for layer in lc:
        assert layer.feedback.shape == layer.weight.shape
        positions, out_ch, _ = layer.weight.shape
        assert not torch.equal(layer.feedback[0], layer.feedback[-1])  # one draw per position
        assert layer.feedback.var().item() == pytest.approx(1.0 / out_ch, rel=0.25)
    assert all(isinstance(m, FeedbackLayer) for m in lc)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    first = lc[0].weight
    surrogate, _, _ = module.objective(x, y)
    (fa_grad,) = torch.autograd.grad(surrogate, first)
    with module.true_gradient():
        surrogate, _, _ = module.objective(x, y)
        (bp_grad,) = torch.autograd.grad(surrogate, first)
    with module.true_gradient():
        (plain,) = torch.autograd.grad(torch.nn.functional.cross_entropy(module.model(x), y), first)
    torch.testing.assert_close(bp_grad, plain)
    assert torch.isfinite(fa_grad).all() and (fa_grad - bp_grad).abs().amax() > 1e-6
