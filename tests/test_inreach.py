"""InReaCh: associations, channels and filter on hand-made features, then the method end to end.

Everything runs on CPU: toy tensors, and a random ResNet-18 (its block outputs stand in for
WideResNet-50's) at 64 px.
"""

import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from bench.errors import UserError
from methods import TrainSet, build_method, get_method_class
from methods import coreset as cs
from methods.backbones import load_backbone_net, teacher_input
from methods.base import make_config
from methods.inreach import (
    BLOCKS,
    ChannelMembers,
    InReaChConfig,
    associate,
    backbone_input,
    build_block_extractor,
    channel_members,
    filter_channels,
    mutual_nearest_neighbors,
    transpose_mse,
)

# ------------------------------------------------------------------------------------------
# Associations on features whose answer is worked out by hand

# Four images of three 2-d patches; images 0 and 1 are the seeds (assoc_depth = 2).
TOY = torch.tensor([
    [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]],   # image 0 = seed 0: a0, a1, a2
    [[10.0, 1.0], [0.0, 1.0], [20.0, 18.0]],  # image 1 = seed 1: b0, b1, b2
    [[0.5, 0.0], [10.0, 0.8], [0.0, 9.0]],    # image 2: c0, c1, c2
    [[0.0, 0.2], [0.1, 0.0], [10.0, 0.6]],    # image 3: d0, d1, d2
])
# Worked out by hand (squared distances in the comments):
# image 1 (seed 0 only): b0 -> a1 (1), a1's nearest in image 1 is b0: mutual; b1 -> a0 (1),
#   mutual; b2 -> a1 (424 < 464 for a2), but a1 prefers b0: not mutual.
# image 2: c0 -> a0 (0.25) beats b1 (1.25), mutual; c1 -> b0 (0.04) beats a1 (0.64), mutual;
#   c2 -> a2 (1) beats b1 (64), mutual.
# image 3: d0 -> a0 (0.04) beats b1 (0.64), but a0 prefers d1 (0.01): dropped, although its
#   match with seed 1 (b1's nearest in image 3 is d0) is mutual; d1 -> a0 (0.01), mutual;
#   d2 -> b0 (0.16) beats a1 (0.36), mutual.
TOY_SEED = [[-1, -1, -1], [0, 0, 0], [0, 1, 0], [0, 0, 1]]
TOY_PATCH = [[1, 0, 1], [0, 0, 2], [0, 0, 0]]  # images 1..3
TOY_MUTUAL = [[False, False, False], [True, True, False], [True, True, True], [False, True, True]]


@pytest.mark.parametrize("budget", [64.0, 1e-6])
def test_mutual_matching_and_best_seed_by_hand(budget):
    assoc = associate(TOY, 2, torch.device("cpu"), budget_mb=budget)
    assert assoc.seed.tolist() == TOY_SEED
    assert assoc.seed_patch[1:].tolist() == TOY_PATCH
    assert assoc.mutual.tolist() == TOY_MUTUAL
    np.testing.assert_allclose(assoc.sq_dist[3], [0.04, 0.01, 0.16], atol=1e-5)  # float32


def test_seeds_are_only_compared_with_later_images():
    # With one seed, image 2's c1 can only match seed 0 (a1, 0.64), not b0.
    assoc = associate(TOY, 1, torch.device("cpu"))
    assert assoc.seed[2].tolist() == [0, 0, 0]
    assert assoc.seed_patch[2].tolist() == [0, 1, 2]
    # assoc_depth beyond the images: the last image is never a seed (nothing follows it), and
    # an image never matches itself or a later seed.
    deep = associate(TOY, 10, torch.device("cpu"))
    assert deep.seed.max() == 2  # d2 -> c1 (0.04) beats b0 (0.16)
    assert all((deep.seed[j] < j).all() for j in range(1, 4))


def members_as_set(m: ChannelMembers) -> set:
    return set(zip(m.channel.tolist(), m.image.tolist(), m.position.tolist()))


def test_both_index_conventions_by_hand():
    assoc = associate(TOY, 2, torch.device("cpu"))
    # channel id = seed * 3 + key position; members are (image, position) of the store.
    official = {  # key (image patch x, seed), members: seed patch at x, image patch at t
        (0, 0, 0), (0, 1, 1), (0, 2, 0),           # key (0, seed 0)
        (1, 0, 1), (1, 1, 0), (1, 3, 0),           # key (1, seed 0)
        (2, 0, 2), (2, 2, 2),                      # key (2, seed 0)
        (4, 1, 1), (4, 2, 0),                      # key (1, seed 1)
        (5, 1, 2), (5, 3, 0),                      # key (2, seed 1)
    }
    matched = {  # key (seed patch t, seed), members: seed patch at t, image patch at x
        (0, 0, 0), (0, 1, 1), (0, 2, 0), (0, 3, 1),  # a0 with b1, c0, d1
        (1, 0, 1), (1, 1, 0),                        # a1 with b0
        (2, 0, 2), (2, 2, 2),                        # a2 with c2
        (3, 1, 0), (3, 2, 1), (3, 3, 2),             # b0 with c1, d2
    }
    assert members_as_set(channel_members(assoc, "official")) == official
    assert members_as_set(channel_members(assoc, "matched")) == matched
    rows = channel_members(assoc, "official")
    assert np.all(np.diff(rows.image) >= 0)  # sorted by image (the filter relies on it)


def test_mutual_nearest_neighbors_match_brute_force_and_chunking():
    gen = torch.Generator().manual_seed(0)
    seed = torch.randn(37, 6, generator=gen, dtype=torch.float64)
    images = torch.randn(3, 29, 6, generator=gen, dtype=torch.float64)
    d2 = torch.cdist(images, seed[None].expand(3, -1, -1)) ** 2  # (3, 29, 37)
    ref_near = d2.argmin(2)
    ref_back = d2.argmin(1)  # (3, 37)
    ref_mutual = torch.gather(ref_back, 1, ref_near) == torch.arange(29)[None]
    for budget in (64.0, 1e-6):  # one block, and one seed row per block
        near, dist, mutual = mutual_nearest_neighbors(seed, images, budget_mb=budget)
        assert torch.equal(near, ref_near)
        assert torch.equal(mutual, ref_mutual)
        assert torch.allclose(dist, d2.min(2).values)


def test_chunked_associations_equal_one_block():
    gen = torch.Generator().manual_seed(1)
    store = torch.randn(9, 25, 8, generator=gen).to(torch.float16)
    one = associate(store, 4, torch.device("cpu"), budget_mb=256.0)
    many = associate(store, 4, torch.device("cpu"), budget_mb=0.002)  # 6 seed rows a block
    for field in ("seed", "seed_patch", "mutual"):
        assert np.array_equal(getattr(one, field), getattr(many, field))
    np.testing.assert_allclose(one.sq_dist, many.sq_dist, rtol=1e-5)  # block shapes round


# ------------------------------------------------------------------------------------------
# The channel filter


def official_filter(channels: dict, min_len: int, max_std: float) -> dict:
    """InReaCh.py gen_channels' filter, transcribed literally (numpy, per channel)."""
    out = {}
    for key, patches in channels.items():
        if len(patches) <= min_len:
            continue
        arr = np.array(patches)
        mean = arr.mean(0)
        std = np.std(np.sqrt(np.sum(np.square(arr - mean), axis=1)))
        kept = [i for i, p in enumerate(patches) if np.sqrt(np.sum(np.square(mean - p))) <
                max_std * std]
        if len(kept) > min_len:
            out[key] = kept
    return out


def toy_channel_store():
    """24 images x 4 positions x 2 dims; channel c lives at position c, one member per image.

    channel 0: 23 members at the origin and one at (24, 0): mean (1, 0), distances 1 (x23)
        and 23, spherical std 4.396, so 5 std = 21.98 drops the far member and keeps 23;
    channel 1: 4 members equally far from their mean: std 0, nothing is < 0, dropped;
    channel 2: 3 members: not more than min_channel_length, dropped unseen;
    channel 3: 4 identical members: distance 0, std 0, and 0 < 0 fails: dropped.
    """
    store = torch.zeros(24, 4, 2, dtype=torch.float64)
    store[23, 0] = torch.tensor([24.0, 0.0])
    store[:4, 1] = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    store[:3, 2] = torch.tensor([[5.0, 5.0], [6.0, 5.0], [5.0, 9.0]])
    store[:4, 3] = 7.0
    rows = [(0, i, 0) for i in range(24)] + [(1, i, 1) for i in range(4)] + [
        (2, i, 2) for i in range(3)] + [(3, i, 3) for i in range(4)]
    rows.sort(key=lambda r: (r[1], r[2]))
    channel, image, position = (np.array(col) for col in zip(*rows))
    return store, ChannelMembers(channel, image, position)


def test_channel_filter_on_toy_channels():
    store, members = toy_channel_store()
    out = filter_channels(store, members, min_length=3, max_std=5.0)
    assert out.bank_index.tolist() == [i * 4 for i in range(23)]  # channel 0 minus image 23
    assert (out.n_channels, out.n_candidate_channels, out.n_kept_channels) == (4, 3, 1)
    assert out.n_bank_members == 23
    # The far member (distance 23) against max_std x the population std 4.396: dropped at
    # 5.2 (22.86), kept at 5.25 (23.08). The n-1 std (4.491) would keep it at 5.2 already.
    assert filter_channels(store, members, min_length=3, max_std=5.2).n_bank_members == 23
    wide = filter_channels(store, members, min_length=3, max_std=5.25)
    assert wide.bank_index.tolist() == [i * 4 for i in range(24)]
    # min_channel_length=2 makes channel 2 a candidate: distances 1.37, 1.49, 2.69 to its mean,
    # std 0.59, all three inside 5 std, so it joins the bank.
    low = filter_channels(store, members, min_length=2, max_std=5.0)
    assert low.n_kept_channels == 2
    assert low.bank_index.tolist() == sorted([i * 4 for i in range(23)] + [2, 6, 10])


def test_channel_filter_matches_the_reference_transcription():
    gen = torch.Generator().manual_seed(2)
    n_images, n_pos, dim = 30, 6, 4
    # Tight cores with a few far members: the regime in which the filter keeps something.
    store = torch.randn(n_images, n_pos, dim, generator=gen, dtype=torch.float64) * 0.01
    far = torch.rand(n_images, n_pos, generator=gen) < 0.08
    store[far] += 30 * torch.randn(int(far.sum()), dim, generator=gen, dtype=torch.float64)
    sizes = [30, 12, 4, 3, 25, 18]
    rows = [(c, i, c) for c in range(n_pos) for i in range(sizes[c])]
    rows.sort(key=lambda r: (r[1], r[2]))
    channel, image, position = (np.array(col) for col in zip(*rows))
    out = filter_channels(store, ChannelMembers(channel, image, position), min_length=3,
                          max_std=5.0)
    channels = {c: [store[i, c].numpy() for i in range(sizes[c])] for c in range(n_pos)}
    ref = official_filter(channels, 3, 5.0)
    expected = sorted(i * n_pos + c for c, kept in ref.items() for i in kept)
    assert out.bank_index.tolist() == expected
    assert out.n_kept_channels == len(ref) > 0


# ------------------------------------------------------------------------------------------
# Positional test, colour, BatchNorm, blocks


def gradient_images(n: int, size: int, symmetric: bool, seed: int = 0) -> torch.Tensor:
    """Noisy images whose mean is symmetric about the diagonal (i + j) or not (columns only)."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(20, 235, size)
    base = (ramp[:, None] + ramp[None, :]) / 2 if symmetric else ramp[None, :].expand(size, size)
    images = base.expand(n, 3, size, size).clone() + 8 * torch.randn(n, 3, size, size,
                                                                     generator=gen)
    return images.clamp(0, 255).to(torch.uint8)


def reference_transpose_mse(images: torch.Tensor) -> float:
    """utils.py test_for_positional_class_transpose on the (H, W, BGR) arrays cv2 gives."""
    imgs = [im.flip(0).permute(1, 2, 0).numpy() for im in images]
    average = np.mean(np.array(imgs), axis=0, keepdims=False)
    average_f = np.transpose(average, (1, 0, 2))
    return float(np.mean(np.square(average.astype(np.float16) - average_f.astype(np.float16))))


def tiny(**overrides):
    base = {"backbone": "resnet18", "pretrain_embed_dimension": 64, "target_embed_dimension": 48}
    return build_method("inreach", {**base, **overrides}, teacher_weights="random", seed=0)


def names(n):
    return tuple(f"img{i:02d}" for i in range(n))


@pytest.mark.parametrize("symmetric", [True, False])
def test_positional_test_both_ways(symmetric):
    images = gradient_images(16, 64, symmetric)
    mse = transpose_mse(images)
    assert mse == reference_transpose_mse(images)
    assert (mse < 1000) == symmetric
    method = tiny()
    method.fit(TrainSet(images, names(16)))
    assert method.positional is (not symmetric)
    emb = method.embed(images[:2])
    assert emb.shape[-1] == 48 + (0 if symmetric else 2)
    if not symmetric:  # column, then row, index x 5 / 16 on the 16 x 16 grid
        cols = torch.arange(16.0) * 5 / 16
        assert torch.allclose(emb[1, 3, :, -2], cols)
        assert torch.allclose(emb[1, :, 7, -1], cols)
    # The threshold is inclusive (the reference's `< threshold` means no positional channels).
    at = tiny(pos_embed_thresh=mse)
    assert at.decide_positional(images) == mse and at.positional is True
    forced = tiny(positional="off")
    forced.decide_positional(images)
    assert forced.positional is False
    forced = tiny(positional="on")
    forced.decide_positional(images)
    assert forced.positional is True


def test_official_colour_is_bgr_with_the_permuted_mean():
    images = gradient_images(2, 8, False)
    got = backbone_input(images, torch.device("cpu"), "official_bgr").numpy()
    bgr = images.flip(1).permute(0, 2, 3, 1).numpy() / 255.0  # (B, H, W, BGR) as cv2 loads
    ref = (bgr - [0.456, 0.406, 0.485]) / [0.229, 0.224, 0.225]  # image_net_norm
    np.testing.assert_allclose(got, ref.transpose(0, 3, 1, 2), atol=1e-5)
    assert torch.equal(backbone_input(images, torch.device("cpu"), "rgb"),
                       teacher_input(images, "cpu"))


@torch.no_grad()
def test_per_image_batchnorm_is_the_reference_train_mode_forward():
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours, _ = build_block_extractor("resnet18", "random", "per_image")
    net, _ = load_backbone_net("resnet18", "random")
    # model.py: the torchvision net stays in train mode; InReaCh feeds one image at a time.
    ref = create_feature_extractor(net, return_nodes={b: b for b in BLOCKS["resnet18"]})
    assert ref.training
    batched = ours(x)
    for i in range(3):
        single = ref(x[i:i + 1])
        for block in BLOCKS["resnet18"]:
            assert torch.allclose(batched[block][i:i + 1], single[block], atol=1e-4, rtol=1e-4)
    running, _ = build_block_extractor("resnet18", "random", "running")
    fresh, _ = load_backbone_net("resnet18", "random")  # running statistics untouched
    fresh.eval()
    stem = fresh.maxpool(fresh.relu(fresh.bn1(fresh.conv1(x))))
    expected = fresh.layer4[0](fresh.layer3(fresh.layer2(fresh.layer1(stem))))
    assert torch.allclose(running(x)["layer4.0"], expected, atol=1e-5)


@torch.no_grad()
def test_block_outputs_of_both_backbones():
    wide, _ = build_block_extractor("wide_resnet50_2", "random", "per_image")
    out = wide(torch.zeros(1, 3, 64, 64).normal_(generator=torch.Generator().manual_seed(0)))
    assert list(out) == list(BLOCKS["wide_resnet50_2"]) and len(out) == 13
    assert [f.shape[1] for f in out.values()] == [256] * 3 + [512] * 4 + [1024] * 5 + [2048]
    assert [f.shape[-1] for f in out.values()] == [16] * 3 + [8] * 4 + [4] * 5 + [2]
    small, _ = build_block_extractor("resnet18", "random", "running")
    out = small(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in out.values()] == [64, 64, 128, 128, 256, 512]
    assert "layer3.0" not in out  # skipped, like WideResNet-50's


# ------------------------------------------------------------------------------------------
# The method end to end


def defect_train_set(n_normal=14, n_defect=2, size=64):
    """Aligned, noisy gradient images; the last ``n_defect`` carry a bright square."""
    images = gradient_images(n_normal + n_defect, size, symmetric=False, seed=11)
    images[n_normal:, :, 8:24, 36:52] = 255
    return TrainSet(images, names(n_normal + n_defect))


@pytest.fixture(scope="module")
def fitted():
    train = defect_train_set()
    method = tiny()
    logs = []
    method.fit(train, observer=lambda epoch, scalars, per_sample=None: logs.append(
        (epoch, scalars, per_sample)))
    return method, train, logs


def test_fit_logs_once_and_the_defective_images_associate_less(fitted):
    method, train, logs = fitted
    assert len(logs) == 1
    epoch, scalars, per_sample = logs[0]
    assert epoch == 0
    assert scalars["bank_size"] == method.bank.shape[0] > 0
    assert scalars["seeds"] == 10 and scalars["positional"] == 1.0
    assert scalars["n_patches"] == 16 * 16 * 16
    assoc = per_sample["associated_fraction"]
    assert assoc[0] == 0.0  # image 0 is a seed and never a source
    assert assoc[-2:].max() < assoc[1:-2].min()
    assert method.bank.dtype == torch.float16


def test_scores_equal_brute_force_nearest_neighbour(fitted):
    method, train, _ = fitted
    test = defect_train_set(n_normal=2, n_defect=2).images
    pred = method.predict(test, batch_size=3)
    emb = method.embed(test).reshape(4, 256, -1)
    bank = method.bank.float()
    d2 = (torch.cdist(emb.double(), bank.double()[None].expand(4, -1, -1)) ** 2).min(2).values
    grid = d2.view(4, 16, 16).numpy()
    ref_maps = np.stack([
        ndimage.gaussian_filter(np.repeat(np.repeat(g, 4, 0), 4, 1), 13.0) for g in grid
    ])
    np.testing.assert_allclose(pred.maps, ref_maps, rtol=1e-4, atol=1e-3 * ref_maps.max())
    np.testing.assert_allclose(pred.scores, ref_maps.reshape(4, -1).max(1), rtol=1e-4)
    assert pred.scores[2:].min() > pred.scores[:2].max()  # the squares score higher


def test_sigma_scaling_switch():
    method = tiny(sigma_scaling="image_size")
    assert method.effective_sigma(64) == pytest.approx(13 * 64 / 224)
    assert tiny().effective_sigma(64) == 13.0


def test_float16_bank_search_equals_float32_search():
    gen = torch.Generator().manual_seed(3)
    bank16 = torch.randn(300, 20, generator=gen).to(torch.float16)
    queries = torch.randn(50, 20, generator=gen)
    ref_d, ref_i = cs.nearest_neighbors(queries, bank16.float(), 1)
    for budget in (64.0, 1e-3):  # the on-the-fly float32 copy in one chunk, and in many
        d, i = cs.nearest_neighbors(queries, bank16, 1, budget_mb=budget)
        assert torch.equal(i, ref_i)
        assert torch.allclose(d, ref_d, rtol=1e-6)
    norms = cs.row_sq_norms(bank16, torch.float32, 7)
    assert torch.allclose(norms, (bank16.float() ** 2).sum(1))


def test_results_do_not_depend_on_chunks_batches_or_store(fitted):
    method, train, _ = fitted
    test = defect_train_set(n_normal=1, n_defect=1).images
    ref = method.predict(test)
    other = tiny(budget_mb=0.05, batch_size=3, store="cpu")  # ~16 blocks per seed and image
    other.fit(train)
    assert other.bank.shape == method.bank.shape
    assert torch.allclose(other.bank.float(), method.bank.float(), rtol=1e-3, atol=1e-3)
    got = other.predict(test)
    np.testing.assert_allclose(got.maps, ref.maps, rtol=1e-5, atol=1e-5 * ref.maps.max())


def test_determinism_with_a_fixed_seed(fitted):
    method, train, _ = fitted
    again = tiny()
    again.fit(train)
    assert torch.equal(again.bank, method.bank)
    a, b = method.predict(train.images[:3]), again.predict(train.images[:3])
    assert np.array_equal(a.maps, b.maps) and np.array_equal(a.scores, b.scores)


def test_index_conventions_give_different_banks(fitted):
    method, train, _ = fitted
    matched = tiny(channel_indices="matched")
    matched.fit(train)
    assert matched.fit_stats["associated_patches"] == method.fit_stats["associated_patches"]
    assert not (matched.bank.shape == method.bank.shape and torch.equal(matched.bank,
                                                                        method.bank))


def test_state_dict_round_trip_and_mismatch(fitted, tmp_path):
    method, train, _ = fitted
    path = tmp_path / "bank.pt"
    torch.save(method.state_dict(), path)
    state = torch.load(path, weights_only=True)
    restored = tiny()
    restored.load_state_dict(state)
    assert restored.positional is True and restored.image_size == (64, 64)
    a, b = method.predict(train.images[:2]), restored.predict(train.images[:2])
    np.testing.assert_array_equal(a.maps, b.maps)
    tiny(batch_size=2, budget_mb=1.0, store="cpu").load_state_dict(state)  # speed fields
    with pytest.raises(UserError, match="channel_indices"):
        tiny(channel_indices="matched").load_state_dict(state)
    with pytest.raises(UserError, match="teacher"):
        build_method("inreach", {"backbone": "resnet18", "pretrain_embed_dimension": 64,
                                 "target_embed_dimension": 48},
                     teacher_weights="random:1").load_state_dict(state)
    with pytest.raises(UserError, match="not an inreach bank"):
        tiny().load_state_dict({"format": "softpatch-bank/1", "method": "softpatch"})
    with pytest.raises(UserError, match="64x64"):
        restored.predict(torch.zeros(1, 3, 72, 72, dtype=torch.uint8))


def test_memory_and_data_limits_stop_with_one_line():
    train = defect_train_set()
    with pytest.raises(UserError, match=r"store_mb=0.01; raise store_mb"):
        tiny(store_mb=0.01).fit(train)
    with pytest.raises(UserError, match="min_channel_length"):
        tiny().fit(TrainSet(train.images[:3], names(3)))  # channels of <= 3 members
    with pytest.raises(UserError, match="at least 2"):
        tiny().fit(TrainSet(train.images[:1], names(1)))
    with pytest.raises(UserError, match="larger than 32 px"):
        tiny().fit(TrainSet(gradient_images(4, 32, False), names(4)))


def test_defaults_registration_and_config_errors():
    cls = get_method_class("inreach")
    assert cls.paper_name == "InReaCh" and cls.column_rank == 60
    cfg = InReaChConfig()
    assert (cfg.backbone, cfg.assoc_depth, cfg.min_channel_length, cfg.max_channel_std) == (
        "wide_resnet50_2", 10, 3, 5.0)
    assert (cfg.sigma, cfg.pos_embed_thresh, cfg.pos_embed_weight) == (13.0, 1000.0, 5.0)
    assert (cfg.channel_indices, cfg.colour, cfg.batchnorm) == (
        "official", "official_bgr", "per_image")
    assert {k: getattr(cfg, k) for k in cls.paper_setup} == dict(cls.paper_setup)
    corrected = build_method("inreach-corrected", teacher_weights="random")
    assert (corrected.config.channel_indices, corrected.config.colour,
            corrected.config.batchnorm) == ("matched", "rgb", "running")
    for bad in ({"sigma": float("nan")}, {"max_channel_std": 0}, {"budget_mb": float("inf")},
                {"store_mb": -1}, {"patchsize": 2}, {"assoc_depth": 0},
                {"colour": "bgr"}, {"min_channel_length": -1}, {"backbone": "vgg"},
                {"pos_embed_weight": -1.0}):
        with pytest.raises(UserError):
            make_config("inreach", bad)
    with pytest.raises(UserError):
        dataclasses.replace(cfg, batchnorm="frozen")
