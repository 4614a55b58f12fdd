"""SoftPatch / PatchCore: the memory-bank pieces against brute force, then the methods end to end.

Everything runs on CPU with small tensors and a random ResNet-18 teacher at 32-64 px.
"""

import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch
import torch.nn.functional as F
from sklearn.neighbors import LocalOutlierFactor

from bench.errors import UserError
from methods import TrainSet, build_method, get_method_class
from methods import coreset as cs
from methods.base import make_config
from methods.softpatch import PatchCoreConfig, SoftPatchConfig, patch_features

# ------------------------------------------------------------------------------------------
# Brute-force references


def brute_greedy(points: np.ndarray, n: int, first: np.ndarray, allowed=None) -> list[int]:
    """Textbook greedy k-center on a full distance matrix, starting from ``first`` distances."""
    dist = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    current = first.copy()
    if allowed is not None:
        current[~allowed] = -1.0
    chosen = []
    for _ in range(n):
        pick = int(np.argmax(current))
        chosen.append(pick)
        current = np.minimum(current, dist[:, pick])
    return chosen


def adaptive_pool(vec: np.ndarray, out: int) -> np.ndarray:
    length = len(vec)
    return np.array(
        [vec[(i * length) // out : -((-(i + 1) * length) // out)].mean() for i in range(out)]
    )


def random_images(n: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=gen) * 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------
# Coreset


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_coreset_matches_brute_force(seed):
    x = torch.randn(80, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pts = x.numpy()
    full = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    got = cs.greedy_coreset(x, 20, init="exact").tolist()
    assert got == brute_greedy(pts, 20, np.linalg.norm(full, axis=1))


def test_approx_coreset_matches_brute_force_with_its_starts():
    x = torch.randn(90, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pts = x.numpy()
    starts = torch.randperm(90, generator=torch.Generator().manual_seed(7))[:10].numpy()
    first = np.sqrt(((pts[:, None] - pts[None, starts]) ** 2).sum(-1)).mean(1)
    got = cs.greedy_coreset(
        x, 25, init="approx", num_starts=10, generator=torch.Generator().manual_seed(7)
    )
    assert got.tolist() == brute_greedy(pts, 25, first)


def test_coreset_never_selects_excluded_points():
    x = torch.randn(70, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x[:10] *= 50  # far-away points a plain k-center would pick first
    allowed = torch.ones(70, dtype=torch.bool)
    allowed[:10] = False
    pts = x.numpy()
    full = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    got = cs.greedy_coreset(x, 30, init="exact", candidates=allowed)
    assert got.min() >= 10 and len(set(got.tolist())) == 30
    assert got.tolist() == brute_greedy(pts, 30, np.linalg.norm(full, axis=1), allowed.numpy())
    with pytest.raises(ValueError):
        cs.greedy_coreset(x, 61, candidates=allowed)


def test_random_projection_law_and_seed():
    a = cs.random_projection(400, 32, generator=torch.Generator().manual_seed(0))
    b = cs.random_projection(400, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (400, 32)
    assert a.abs().max() <= 1 / 20 and a.std() == pytest.approx(1 / 20 / 3**0.5, rel=0.05)


# ------------------------------------------------------------------------------------------
# Noise discriminators


def test_lof_matches_scikit_learn_and_is_chunk_invariant():
    x = torch.randn(4, 30, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = cs.lof_scores(x, 5)
    ref = np.stack(
        [-LocalOutlierFactor(n_neighbors=5).fit(p.numpy()).negative_outlier_factor_ for p in x]
    )
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9)
    assert torch.allclose(cs.lof_scores(x, 5, budget_mb=1e-6), ours)  # one position per chunk
    # k larger than the group is capped at N - 1, as scikit-learn does.
    small = x[:, :4]
    ref_small = -LocalOutlierFactor(n_neighbors=3).fit(small[0].numpy()).negative_outlier_factor_
    np.testing.assert_allclose(cs.lof_scores(small, 9)[0].numpy(), ref_small, rtol=1e-9)


def test_nearest_and_gaussian_discriminators_match_brute_force():
    x = torch.randn(3, 25, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for p in range(3):
        pts = x[p].numpy()
        dist = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
        np.fill_diagonal(dist, np.inf)
        np.testing.assert_allclose(cs.nearest_scores(x)[p].numpy(), dist.min(1) + 1, rtol=1e-9)
        cov = np.cov(pts, rowvar=False) + 0.01 * np.eye(4)
        delta = pts - pts.mean(0)
        maha = np.sqrt(np.einsum("nd,de,ne->n", delta, np.linalg.inv(cov), delta))
        np.testing.assert_allclose(cs.gaussian_scores(x)[p].numpy(), maha + 1, rtol=1e-8)


@pytest.mark.parametrize("kind", ["lof", "nearest", "gaussian"])
def test_discriminator_removes_planted_outlier_patches(kind):
    gen = torch.Generator().manual_seed(2)
    n_pos, n_img, dim = 16, 40, 8
    x = torch.randn(n_pos, n_img, dim, generator=gen)
    planted = torch.zeros(n_pos, n_img, dtype=torch.bool)
    planted[torch.arange(n_pos), torch.randint(0, n_img, (n_pos,), generator=gen)] = True
    planted[::3, 5] = True  # one image with several defective positions
    x[planted] += 12.0 * torch.randn(int(planted.sum()), dim, generator=gen).sign()
    scores = cs.noise_scores(kind, x, lof_k=5)
    removed = cs.noisy_patch_mask(scores, 0.15)
    assert removed[planted].all()
    assert removed.float().mean() == pytest.approx(0.15, abs=1 / (n_pos * n_img))


def test_quantile_matches_torch_and_zero_ratio_removes_nothing():
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for q in (0.0, 0.3, 0.85, 1.0):
        assert cs.quantile_linear(values, q) == pytest.approx(float(torch.quantile(values, q)))
    assert not cs.noisy_patch_mask(values, 0.0).any()


# ------------------------------------------------------------------------------------------
# Nearest-neighbour search and smoothing


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbors_match_brute_force_with_chunking(k):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(130, 7, generator=gen, dtype=torch.float64)
    bank = torch.randn(77, 7, generator=gen, dtype=torch.float64)
    ref_d, ref_i = torch.topk(torch.cdist(q, bank) ** 2, k, largest=False)
    for budget in (64.0, 1e-4):  # one block, and many query x bank blocks
        d, i = cs.nearest_neighbors(q, bank, k, budget_mb=budget)
        assert torch.equal(i, ref_i)
        assert torch.allclose(d, ref_d)
    d, _ = cs.nearest_neighbors(q, bank, k, squared=False)
    assert torch.allclose(d, ref_d.sqrt())


@pytest.mark.parametrize("shape", [(2, 40, 33), (1, 8, 8)])
def test_gaussian_blur_equals_scipy(shape):
    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = cs.gaussian_blur(maps, 4.0).numpy()
    ref = np.stack([ndimage.gaussian_filter(m, sigma=4.0) for m in maps.numpy()])
    np.testing.assert_allclose(ours, ref, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Patch features


def test_patch_features_equal_neighbourhood_pooling():
    gen = torch.Generator().manual_seed(0)
    f2 = torch.randn(2, 5, 6, 6, generator=gen, dtype=torch.float64)
    f3 = torch.randn(2, 7, 3, 3, generator=gen, dtype=torch.float64)
    out = patch_features([f2, f3], 3, 16, 12)
    assert out.shape == (2, 6, 6, 12)
    # Brute force at a border position, layer3 upsampled the way the reference does it.
    b, i, j = 1, 0, 4
    padded2 = np.pad(f2[b].numpy(), ((0, 0), (1, 1), (1, 1)))
    vec2 = padded2[:, i : i + 3, j : j + 3].reshape(-1)
    unfold3 = F.unfold(f3, 3, padding=1).view(2, -1, 3, 3)
    vec3 = F.interpolate(unfold3, size=(6, 6), mode="bilinear")[b, :, i, j].numpy()
    expected = adaptive_pool(np.concatenate([adaptive_pool(vec2, 16), adaptive_pool(vec3, 16)]), 12)
    np.testing.assert_allclose(out[b, i, j].numpy(), expected, rtol=1e-12)
    # Every position, in the reference's order of operations (resize, then pool).
    hood2 = F.unfold(f2, 3, padding=1).transpose(1, 2).reshape(72, 1, -1)
    hood3 = F.interpolate(unfold3, size=(6, 6), mode="bilinear").flatten(2).transpose(1, 2)
    ref = torch.cat([F.adaptive_avg_pool1d(hood2, 16),
                     F.adaptive_avg_pool1d(hood3.reshape(72, 1, -1), 16)], dim=2)
    ref = F.adaptive_avg_pool1d(ref, 12).view(2, 6, 6, 12)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Methods end to end


def tiny(name="softpatch", seed=0, teacher_weights="random", **overrides):
    base = {"backbone": "resnet18", "pretrain_embed_dimension": 64,
            "target_embed_dimension": 64, "projection_dim": 16}
    return build_method(name, {**base, **overrides}, teacher_weights=teacher_weights, seed=seed)


def defect_train_set(n_normal=14, n_defect=2, size=64):
    """Smooth, aligned images; the last ``n_defect`` carry a bright square at a fixed spot."""
    gen = torch.Generator().manual_seed(11)
    ramp = torch.linspace(60, 180, size)
    base = (ramp[None, :, None] + ramp[None, None, :]) / 2
    images = base.expand(n_normal + n_defect, 3, size, size).clone()
    images += 6 * torch.randn(images.shape, generator=gen)
    images[n_normal:, :, 8:24, 36:52] = 255.0
    images = images.clamp(0, 255).to(torch.uint8)
    return TrainSet(images, tuple(f"img{i:02d}" for i in range(len(images))))


@pytest.fixture(scope="module")
def fitted():
    train = defect_train_set()
    method = tiny()
    logs = []
    method.fit(train, observer=lambda epoch, scalars, per_sample=None: logs.append(
        (epoch, scalars, per_sample)))
    return method, train, logs


def test_fit_logs_once_and_flags_defective_training_images(fitted):
    method, train, logs = fitted
    assert len(logs) == 1 and logs[0][0] == 0
    scalars, per_sample = logs[0][1], logs[0][2]
    n_patches = len(train) * 8 * 8  # layer2 of a 64 px image is 8 x 8
    assert scalars["n_patches"] == n_patches
    assert scalars["removed_patches"] == pytest.approx(0.15 * n_patches, abs=1)
    assert scalars["bank_size"] == int(0.1 * n_patches) == method.bank.shape[0]
    assert set(per_sample) >= {"patch_noise_mean", "patch_noise_max", "removed_fraction"}
    # The two images with the planted defect have the most outlying patches.
    top2 = np.argsort(per_sample["patch_noise_max"])[-2:]
    assert sorted(top2.tolist()) == [len(train) - 2, len(train) - 1]
    assert method.bank_weight.shape == (method.bank.shape[0],)
    assert (method.bank_weight > 0).all()


def test_scores_equal_brute_force_nearest_neighbour(fitted):
    method, train, _ = fitted
    images = train.images[[0, 15]]
    pred = method.predict(images, batch_size=1)
    emb = method.embed(images).double()
    bank = method.bank.double()
    d2 = torch.cdist(emb.reshape(-1, bank.shape[1]), bank) ** 2
    nearest = d2.argmin(1)
    grid = (d2.min(1).values * method.bank_weight.double()[nearest]).view(2, 8, 8)
    # float32 |a|^2 - 2ab + |b|^2 (as FAISS computes it) against float64 brute force
    ref_scores = grid.flatten(1).amax(1).numpy()
    np.testing.assert_allclose(pred.scores, ref_scores, rtol=1e-4, atol=1e-5 * ref_scores.max())
    up = F.interpolate(grid[:, None], size=(64, 64), mode="bilinear")[:, 0].numpy()
    ref_maps = np.stack([ndimage.gaussian_filter(m, sigma=4) for m in up])
    np.testing.assert_allclose(pred.maps, ref_maps, rtol=1e-4, atol=1e-4 * ref_maps.max())
    assert pred.scores.dtype == np.float32 and pred.maps.shape == (2, 64, 64)


def test_state_dict_round_trip_and_mismatch(fitted, tmp_path):
    method, train, _ = fitted
    path = tmp_path / "bank.pt"
    torch.save(method.state_dict(), path)
    restored = tiny()
    restored.load_state_dict(torch.load(path, weights_only=True))
    a, b = method.predict(train.images[:3]), restored.predict(train.images[:3])
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)
    with pytest.raises(UserError, match="lof_k"):
        tiny(lof_k=7).load_state_dict(method.state_dict())
    # Speed and memory settings do not change a bank: it loads, and predicts the same.
    lean = tiny(batch_size=2, budget_mb=1.0)
    lean.load_state_dict(method.state_dict())
    c = lean.predict(train.images[:3])
    # Another batch size may change the float32 summation order of the distances.
    np.testing.assert_allclose(c.scores, a.scores, rtol=1e-3)
    with pytest.raises(UserError, match="teacher"):
        tiny(teacher_weights="random:1").load_state_dict(method.state_dict())
    with pytest.raises(UserError, match="not a patchcore"):
        tiny("patchcore").load_state_dict(method.state_dict())


def test_determinism_with_a_fixed_seed():
    train = TrainSet(random_images(6, 32, 0), tuple("abcdef"))
    test = random_images(2, 32, 1)
    runs = []
    for seed in (3, 3, 4):
        method = tiny(seed=seed)
        method.fit(train)
        runs.append((method.bank.clone(), method.predict(test).scores))
    assert torch.equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][1], runs[2][1])


def test_patchcore_is_softpatch_without_denoising():
    train = TrainSet(random_images(6, 32, 2), tuple("abcdef"))
    logs = []
    patchcore = tiny("patchcore")
    patchcore.fit(train, observer=lambda e, s, p=None: logs.append(p))
    same = tiny("softpatch", noise_discriminator="none", denoise_ratio=0.0, soft_weight=False)
    same.fit(train)
    assert patchcore.bank_weight is None and logs == [None]
    assert patchcore.fit_stats["removed_patches"] == 0
    assert torch.equal(patchcore.bank, same.bank)
    # Exact coreset variant and no subsampling also run through the same path.
    full = tiny("patchcore", coreset_ratio=1.0)
    full.fit(train)
    assert full.bank.shape[0] == 6 * 4 * 4
    assert full.predict(train.images[:1]).scores[0] == pytest.approx(0.0, abs=1e-3)
    tiny("patchcore", coreset_init="exact").fit(train)


def test_defaults_and_config_errors():
    assert get_method_class("softpatch").Config is SoftPatchConfig
    defaults = SoftPatchConfig()
    assert (defaults.layers, defaults.coreset_ratio, defaults.denoise_ratio, defaults.lof_k,
            defaults.num_nn, defaults.sigma) == ((2, 3), 0.1, 0.15, 5, 1, 4.0)
    pc = PatchCoreConfig()
    assert (pc.noise_discriminator, pc.denoise_ratio, pc.soft_weight) == ("none", 0.0, False)
    assert {f.name for f in dataclasses.fields(pc)} == {
        f.name for f in dataclasses.fields(defaults)}
    cfg = make_config("softpatch", {"layers": "2,3", "noise_discriminator": "gaussian"})
    assert cfg.layers == (2, 3) and cfg.noise_discriminator == "gaussian"
    for bad in ({"denoise_ratio": 0.2, "noise_discriminator": "none"}, {"coreset_ratio": 0},
                {"layers": "4"}, {"patchsize": 2}, {"backbone": "vgg"}):
        with pytest.raises(UserError):
            tiny(**bad)
    with pytest.raises(UserError, match="at least 2"):
        tiny().fit(TrainSet(random_images(1, 32, 0), ("x",)))
    with pytest.raises(RuntimeError):
        tiny().predict(random_images(1, 32, 0))
    # 32 patches -> bank of 3: said at the end of fit, before any test image is loaded.
    with pytest.raises(UserError, match="num_nn=50 exceeds the memory bank"):
        tiny("patchcore", num_nn=50).fit(TrainSet(random_images(2, 32, 0), ("a", "b")))


@pytest.mark.parametrize("kind, n_defect", [("nearest", 1), ("gaussian", 2)])
def test_other_discriminators_flag_defective_training_images(kind, n_defect):
    # One defect for "nearest": two identical defects are each other's nearest neighbour.
    train = defect_train_set(n_normal=15, n_defect=n_defect)
    logs = []
    method = tiny(noise_discriminator=kind)
    method.fit(train, observer=lambda e, s, p=None: logs.append(p))
    top = np.argsort(logs[0]["patch_noise_max"])[-n_defect:]
    assert sorted(top.tolist()) == list(range(15, 15 + n_defect))
    assert (method.bank_weight >= 1).all()  # distance + 1

