"""FUN-AD: each step of an iteration against a plain reference, then the method end to end.

Everything runs on CPU with a tiny random ViT (patch 8, 64 px -> 8 x 8 patches) or random
tensors; nothing is downloaded (weight files and a hub cache are written by the tests).
"""

import dataclasses
import math

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch

from bench.errors import UserError
from methods import TrainSet, build_method
from methods import funad as fa
from methods import vit as vt
from methods.backbones import IMAGENET_MEAN, IMAGENET_STD
from methods.base import make_config, resolve_config

TINY = ("embed_dim=32", "depth=1", "num_heads=2")
SMALL = {"vit_overrides": TINY, "epochs": 2, "batch_size": 4}


def random_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=gen) * 255).to(torch.uint8)


def train_set(n: int = 10, seed: int = 0) -> TrainSet:
    return TrainSet(random_images(n, seed=seed), tuple(f"t{i}" for i in range(n)))


def funad(weights: str = "random", seed: int = 0, **overrides) -> fa.FunAD:
    return build_method("funad", {**SMALL, **overrides}, teacher_weights=weights, seed=seed)


# ------------------------------------------------------------------------------------------
# Network and backbone facts


def test_mlp_has_the_official_parameter_count_at_the_dino_width():
    net = fa.FunADNet(1536)
    assert fa.count_parameters(net) == fa.PAPER_MLP_PARAMETERS == 4_066_049
    widths = [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [1536, 1024, 128, 1]
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.2}
    adapted, scores = net(torch.randn(2, 3, 1536))
    assert adapted.shape == (2, 3, 1536) and scores.shape == (2, 3)
    assert bool(((scores > 0) & (scores < 1)).all())


def test_real_backbone_widths_follow_from_the_model():
    """ViT-B/8 (random weights, built, not run): 768-wide tokens, 8 px patches, so 28 x 28
    patches at 224 px and 1,536-value descriptors, whose MLP has 4,066,049 parameters. Built
    on the meta device: shapes without the cost of initialising 86 M values."""
    with torch.device("meta"):
        vit = vt.build_vit(vt.DEFAULT_VIT, "random")
    assert fa.count_parameters(vit) == 85_807_872  # the HF model card's 85.8 M
    assert (vit.embed_dim, vit.patch_size) == (768, 8)
    assert vit.grid(224, 224) == (28, 28)
    assert fa.count_parameters(fa.FunADNet(2 * vit.embed_dim)) == 4_066_049
    assert not any(p.requires_grad for p in vit.parameters())


def test_tokens_are_the_last_normalised_block_with_cls_repeated():
    vit = vt.build_vit(vt.DEFAULT_VIT, "random", TINY)
    images = random_images(3)
    cls, patches = vit(images)
    assert cls.shape == (3, 32) and patches.shape == (3, 64, 32)  # 8 x 8 patches at 64 px
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x = vit.net.patch_embed(((images.float() / 255) - mean) / std)
        x = vit.net._pos_embed(x)
        for block in vit.net.blocks:
            x = block(x)
        x = vit.net.norm(x)
    torch.testing.assert_close(cls, x[:, 0])
    torch.testing.assert_close(patches, x[:, 1:])
    method = funad()
    tokens = method.extract(images)
    assert tokens.grid == (8, 8) and tokens.dim == 64 and tokens.patches.dtype == torch.float16
    inputs = tokens.inputs(slice(None))
    assert inputs.shape == (3, 64, 64)
    torch.testing.assert_close(inputs[:, :, :32], tokens.cls.float()[:, None].expand(-1, 64, -1))
    torch.testing.assert_close(inputs[:, 5, 32:], tokens.patches[:, 5].float())


def test_image_side_must_be_a_patch_multiple():
    method = funad()
    with pytest.raises(UserError, match="multiple of its 8 px patches"):
        method.extract(random_images(2, size=60))


def test_random_backbone_leaves_the_global_rng_alone_and_depends_on_its_seed():
    state = torch.random.get_rng_state()
    a = vt.build_vit(vt.DEFAULT_VIT, "random:1", TINY)
    assert torch.equal(state, torch.random.get_rng_state())
    b = vt.build_vit(vt.DEFAULT_VIT, "random:1", TINY)
    c = vt.build_vit(vt.DEFAULT_VIT, "random:2", TINY)
    assert torch.equal(a.net.pos_embed, b.net.pos_embed)
    assert not torch.equal(a.net.pos_embed, c.net.pos_embed)
    assert a.weights_id == "random:seed=1"


# ------------------------------------------------------------------------------------------
# Weights: files, the hub cache, offline


def test_weight_file_round_trip_torch_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = vt.build_vit(vt.DEFAULT_VIT, "random:3", TINY)
    state = source.net.state_dict()
    pth, st = tmp_path / "vit.pth", tmp_path / "vit.safetensors"
    torch.save({**state, "head.weight": torch.zeros(10, 32)}, pth)  # a head is ignored
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    images = random_images(2)
    for path in (pth, st):
        loaded = vt.build_vit(vt.DEFAULT_VIT, str(path), TINY)
        assert loaded.weights_id.startswith("file:")
        torch.testing.assert_close(loaded(images)[1], source(images)[1], rtol=0, atol=0)


def test_bad_weight_files_give_one_line(tmp_path):
    state = vt.build_vit(vt.DEFAULT_VIT, "random", TINY).net.state_dict()
    missing = dict(state)
    missing.pop("norm.weight")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="missing key 'norm.weight'"):
        vt.build_vit(vt.DEFAULT_VIT, str(tmp_path / "missing.pth"), TINY)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "prefixed.pth")
    with pytest.raises(UserError, match="strip that prefix"):
        vt.build_vit(vt.DEFAULT_VIT, str(tmp_path / "prefixed.pth"), TINY)
    torch.save({**state, "pos_embed": torch.zeros(1, 5, 32)}, tmp_path / "shape.pth")
    with pytest.raises(UserError, match="'pos_embed' has shape"):
        vt.build_vit(vt.DEFAULT_VIT, str(tmp_path / "shape.pth"), TINY)
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    with pytest.raises(UserError, match="wrapping its weights under 'state_dict'"):
        vt.build_vit(vt.DEFAULT_VIT, str(tmp_path / "wrapped.pth"), TINY)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        vt.build_vit(vt.DEFAULT_VIT, str(tmp_path / "junk.pth"), TINY)
    with pytest.raises(UserError, match="neither 'imagenet', 'random' nor an existing file"):
        vt.build_vit(vt.DEFAULT_VIT, str(tmp_path / "absent.pth"), TINY)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline; anything that would download fails the test."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    return tmp_path / "hub"


def test_offline_without_hub_weights_is_one_line_naming_cache_and_file_option(empty_hub):
    with pytest.raises(UserError) as err:
        vt.build_vit(vt.DEFAULT_VIT, "imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert str(empty_hub / "models--timm--vit_base_patch8_224.dino") in message
    assert "backbone_weights=/path" in message
    # The method says the same at fit, before any training; backbone_weights wins over the
    # run's teacher weights.
    with pytest.raises(UserError, match="backbone_weights"):
        funad("imagenet").fit(train_set(6))
    method = funad("imagenet", backbone_weights="random:1")
    method.fit(train_set(6))
    assert method.describe()["backbone_weights_id"] == "random:seed=1"
    with pytest.raises(UserError, match="backbone_weights"):
        fa.check_backbone_weights(make_config("funad", SMALL), "imagenet")


def test_a_sweep_stops_before_any_run_when_the_vit_weights_are_missing(empty_hub, tmp_path,
                                                                         capsys):
    """The driver's weights check reaches FUN-AD's backbone: one line, exit 2, no record."""
    from bench.cli import main
    from datasets import generate_synthetic

    root = generate_synthetic(tmp_path / "syn", seed=0, size=64, n_train=6, n_test_good=2,
                              n_test_anomalous=2, categories=["brick"])
    preset = tmp_path / "p.yaml"
    preset.write_text("description: x\ndataset: synthetic\ncategories: [brick]\n"
                      "methods: [funad]\nnoise_ratios: [0.0]\nseeds: [0]\nimage_size: 64\n"
                      "resize_size: 64\nteacher_weights: imagenet\n")
    code = main(["run", "--preset", str(preset), "--data-root", str(root), "--results",
                 str(tmp_path / "res"), "--no-tracking", "--no-report"])
    err = capsys.readouterr().err
    assert code == 2 and "backbone_weights=/path" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert not list((tmp_path / "res").glob("runs/*/record.json"))


def test_failed_download_is_one_line(empty_hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(UserError, match=r"cannot get the .* weights from the Hugging Face hub "
                                        r"\(OSError\).*backbone_weights=/path"):
        vt.build_vit(vt.DEFAULT_VIT, "imagenet")


def test_hub_cache_hit_is_loaded_and_checked(empty_hub):
    from safetensors.torch import save_file

    source = vt.build_vit(vt.DEFAULT_VIT, "random:4", TINY)
    repo = empty_hub / "models--timm--vit_base_patch8_224.dino"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    blob_src = empty_hub / "tmp.safetensors"
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(blob_src))
    from datasets.images import file_sha256

    (repo / "blobs").mkdir()
    blob = repo / "blobs" / file_sha256(blob_src)
    blob_src.rename(blob)
    (snapshot / "model.safetensors").symlink_to(blob)
    loaded = vt.build_vit(vt.DEFAULT_VIT, "imagenet", TINY)
    assert loaded.weights_id == "hub:timm/vit_base_patch8_224.dino"
    torch.testing.assert_close(loaded.net.pos_embed, source.net.pos_embed, rtol=0, atol=0)
    # A blob that does not hash to its cache name is refused.
    damaged = repo / "blobs" / ("0" * 64)
    blob.rename(damaged)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(damaged)
    with pytest.raises(UserError, match="is damaged"):
        vt.build_vit(vt.DEFAULT_VIT, "imagenet", TINY)


# ------------------------------------------------------------------------------------------
# One iteration, step by step


def test_bank_selection_takes_half_of_the_low_scoring_images():
    scores = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.35, 0.8, 0.9, 1.0, 0.45, 0.6])
    # min-max normalised: below 0.5 are the scores < 0.5 here (min 0, max 1)
    candidates = {0, 1, 2, 3, 4, 8}
    seen = set()
    for seed in range(20):
        drawn, n_candidates = fa.select_bank_images(scores, 0.5, 0.5,
                                                    torch.Generator().manual_seed(seed))
        assert n_candidates == 6
        picked = drawn.tolist()
        assert len(picked) == 3 == len(set(picked))
        assert set(picked) <= candidates
        seen |= set(picked)
    assert seen == candidates  # every candidate can be drawn
    # normalisation: shifting and scaling the scores changes nothing
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, _ = fa.select_bank_images(scores, 0.5, 0.5, gen_a)
    b, _ = fa.select_bank_images(scores * 3 + 7, 0.5, 0.5, gen_b)
    assert a.tolist() == b.tolist()
    # a single candidate still gives a bank; equal scores make every image a candidate
    one, n_one = fa.select_bank_images(torch.tensor([0.0, 1.0, 1.0]), 0.5, 0.5,
                                       torch.Generator())
    assert (one.tolist(), n_one) == ([0], 1)
    _, n_all = fa.select_bank_images(torch.ones(4), 0.5, 0.5, torch.Generator())
    assert n_all == 4


def test_bank_distance_excludes_the_patch_itself():
    gen = torch.Generator().manual_seed(0)
    # Large norms: |q|^2 - 2 q.b + |b|^2 leaves a rounding residue for the self-distance, so
    # only the index rule (not the distance rule, off here) recognises the patch itself.
    bank = torch.randn(200, 8, generator=gen) * 3 + 300
    queries = bank.clone()
    d = fa.bank_distances(queries, bank, torch.arange(200), zero_distance=0.0)
    full = ((queries[:, None].double() - bank[None].double()) ** 2).sum(-1)
    full.fill_diagonal_(math.inf)
    torch.testing.assert_close(d.double(), full.min(1).values, rtol=1e-3, atol=0.5)
    # a query that is not in the bank keeps its nearest distance
    outside = torch.randn(1, 8, generator=gen)
    d_out = fa.bank_distances(outside, bank, torch.tensor([-1]), zero_distance=0.0)
    torch.testing.assert_close(d_out, ((outside - bank) ** 2).sum(-1).min().view(1))


def test_bank_distance_near_duplicates_fall_to_the_second_neighbour():
    bank = torch.tensor([[0.0, 0.0], [0.05, 0.0], [3.0, 0.0]])
    query = torch.tensor([[0.0, 0.0]])
    # not in the bank: the nearest (d^2 = 0) is below 1e-2 -> the second, also below -> 0
    assert float(fa.bank_distances(query, bank, None, 1e-2)[0]) == 0.0
    # without the zero rule the true nearest counts
    assert float(fa.bank_distances(torch.tensor([[1.0, 0.0]]), bank, None, 0.0)[0]) == pytest.approx(
        0.9025)
    # a bank with one image's patches only: the second neighbour exists, the rule applies
    far = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert float(fa.bank_distances(query, far, torch.tensor([0]), 1e-2)[0]) == pytest.approx(4.0)


def test_pseudo_labels_are_normalised_over_the_whole_batch():
    # two images of 3 patches; per image normalisation would label 1 patch per image
    dist = torch.tensor([1.0, 1.5, 2.0, 8.0, 9.0, 10.0])
    normalised, labels = fa.pseudo_labels(dist, 0.5)
    torch.testing.assert_close(normalised, (dist - 1) / 9)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    # strictly greater than the threshold
    _, at = fa.pseudo_labels(torch.tensor([0.0, 0.5, 1.0]), 0.5)
    assert at.tolist() == [0, 0, 1]
    # all equal: all zero (the code's guard), no positive
    normalised, labels = fa.pseudo_labels(torch.full((5,), 3.0), 0.5)
    assert normalised.abs().sum() == 0 and labels.sum() == 0


def test_noise_band_is_the_open_mid_interval():
    normalised = torch.tensor([0.0, 0.5, 0.500001, 0.7, 0.899999, 0.9, 1.0])
    band = fa.perturbation_band(normalised, 0.5, 0.9)
    assert band.tolist() == [False, False, True, True, True, False, False]


def test_perturbation_noise_has_the_max_position_std_and_touches_the_band_only():
    gen = torch.Generator().manual_seed(0)
    b, p, d = 6, 5, 4
    x = torch.randn(b, p, d, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    band = torch.zeros(b, p, dtype=torch.bool)
    band[0, 1] = band[3, 4] = band[5, 0] = True
    before = x.clone()
    out = fa.perturb(x, band, torch.Generator().manual_seed(7))
    assert torch.equal(x, before)  # the input is not modified
    assert torch.equal(out[~band], x[~band])
    std = np.std(x.numpy(), axis=0, ddof=1).max(axis=0)  # (d,)
    expected = torch.randn((3, d), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out[band] - x[band], expected * torch.from_numpy(std))
    # no band: an unchanged copy
    assert torch.equal(fa.perturb(x, torch.zeros(b, p, dtype=torch.bool), torch.Generator()), x)


def _bce(p, y):
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def test_balanced_bce_with_and_without_positives():
    scores = torch.tensor([0.9, 0.2, 0.6, 0.1, 0.3], requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    p, y = scores.detach().numpy(), labels.numpy()
    loss = fa.balanced_bce(scores, labels, skip_positive=False)
    assert float(loss.detach()) == pytest.approx(
        _bce(p[y == 1], y[y == 1]) + _bce(p[y == 0], y[y == 0]), rel=1e-6)
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    # the code's skip (every normalised distance 0): negatives only
    skipped = fa.balanced_bce(scores, labels, skip_positive=True)
    assert float(skipped.detach()) == pytest.approx(_bce(p[y == 0], y[y == 0]), rel=1e-6)
    # no positive at all: negatives only, finite
    none = fa.balanced_bce(scores, torch.zeros(5), skip_positive=False)
    assert float(none.detach()) == pytest.approx(_bce(p, np.zeros(5)), rel=1e-6)
    # unbalanced: one mean over every patch
    plain = fa.balanced_bce(scores, labels, skip_positive=False, balancing=False)
    assert float(plain.detach()) == pytest.approx(_bce(p, y), rel=1e-6)


def find_matching_loop(nearest: list[int]) -> tuple[list[int], list[int]]:
    """Plain loop with the official ``find_matching`` semantics (written for this test)."""
    first, second = [], []
    for i in range(len(nearest)):
        if i in second:
            continue
        if nearest[nearest[i]] == i:
            first.append(i)
            second.append(nearest[i])
    return first, second


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matching_equals_the_plain_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(150, 3, generator=gen, dtype=torch.float64)
    nearest = fa.nearest_other(features, budget_mb=0.01)  # force several chunks
    dist = ((features[:, None] - features[None]) ** 2).sum(-1)
    dist.fill_diagonal_(math.inf)
    assert nearest.tolist() == dist.argmin(1).tolist()
    i, j = fa.mutual_pairs(nearest)
    ref_i, ref_j = find_matching_loop(nearest.tolist())
    assert (i.tolist(), j.tolist()) == (ref_i, ref_j)
    assert len(ref_i) > 10
    # arbitrary neighbour maps without fixed points, mutual pairs included
    for trial in range(5):
        rng = np.random.default_rng([seed, trial])
        n = 40
        nn_map = rng.integers(0, n - 1, size=n)
        nn_map = np.where(nn_map >= np.arange(n), nn_map + 1, nn_map)
        for a in range(0, n - 1, 7):
            nn_map[a], nn_map[a + 1] = a + 1, a
        i, j = fa.mutual_pairs(torch.from_numpy(nn_map))
        assert (i.tolist(), j.tolist()) == find_matching_loop(nn_map.tolist())


def test_nearest_other_never_returns_the_row_itself_even_with_duplicates():
    features = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0], [9.0, 0.0]])
    nearest = fa.nearest_other(features)
    assert nearest.tolist()[:4] == [1, 0, 3, 2]
    assert all(k != i for i, k in enumerate(nearest.tolist()))


def test_smoothness_is_half_the_mean_pair_difference():
    scores = torch.tensor([[0.1, 0.9, 0.4], [0.5, 0.2, 0.8]], requires_grad=True)
    i, j = torch.tensor([0, 2]), torch.tensor([4, 5])
    loss = fa.smoothness_loss(scores, i, j)
    flat = scores.detach().reshape(-1)
    assert float(loss.detach()) == pytest.approx(0.5 * float((flat[i] - flat[j]).abs().mean()))
    loss.backward()
    assert scores.grad.abs().sum() > 0
    assert float(fa.smoothness_loss(scores, torch.tensor([], dtype=torch.long),
                                    torch.tensor([], dtype=torch.long))) == 0.0


# ------------------------------------------------------------------------------------------
# The method


def test_fit_is_deterministic_and_seeded():
    train = train_set(10)
    state = torch.random.get_rng_state()
    a, b, c = funad(seed=0), funad(seed=0), funad(seed=1)
    logs = []
    a.fit(train, observer=lambda e, s, p=None: logs.append((e, dict(s), p)))
    b.fit(train)
    c.fit(train)
    assert torch.equal(state, torch.random.get_rng_state())
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k])
    assert any(not torch.equal(v, c.net.state_dict()[k]) for k, v in a.net.state_dict().items())
    test = random_images(4, seed=9)
    pa, pb = a.predict(test), b.predict(test)
    assert np.array_equal(pa.scores, pb.scores) and np.array_equal(pa.maps, pb.maps)
    # observer: one call per epoch, 10 // 4 = 2 steps each (the incomplete batch is dropped)
    assert [e for e, _, _ in logs] == [0, 1]
    assert [s["steps"] for _, s, _ in logs] == [2.0, 4.0]
    for key in ("loss", "bce", "smooth", "bank_images", "candidates", "positive_fraction",
                "band_fraction", "mutual_pairs"):
        assert math.isfinite(logs[-1][1][key])
    per_sample = logs[-1][2]
    assert per_sample["image_score"].shape == (10,) and per_sample["bank_rate"].shape == (10,)
    assert 0.0 < logs[-1][1]["positive_fraction"] < 1.0


def test_max_steps_caps_training_and_the_last_state_is_kept():
    method = funad(epochs=50, max_steps=3)
    logs = []
    method.fit(train_set(8), observer=lambda e, s, p=None: logs.append(s))
    assert logs[-1]["steps"] == 3.0 and len(logs) == 2  # 2 steps per epoch
    assert method.fit_stats["epochs_run"] == 2


def test_training_moves_the_scores_and_uses_every_term():
    base = funad(epochs=1)
    train = train_set(8)
    base.fit(train)
    untrained = fa.build_net(64, 0)
    changed = any(not torch.equal(v, untrained.state_dict()[k])
                  for k, v in base.net.state_dict().items())
    assert changed
    # Each switch changes the trained weights (so each term is in the loss).
    for overrides in ({"gaussian": False}, {"smooth_weight": 0.0}, {"balancing": False},
                      {"smooth_scores": "clean"}):
        other = funad(epochs=1, **overrides)
        other.fit(train)
        assert any(not torch.equal(v, other.net.state_dict()[k])
                   for k, v in base.net.state_dict().items()), overrides


def test_predict_score_is_max_raw_patch_score_and_map_is_resized_and_blurred():
    import cv2

    method = funad(epochs=1)
    method.fit(train_set(8))
    images = random_images(3, seed=4)
    pred = method.predict(images, batch_size=2)
    tokens = method.extract(images)
    with torch.no_grad():
        _, patch = method.net(tokens.inputs(slice(None)))
    np.testing.assert_allclose(pred.scores, patch.amax(1).numpy(), rtol=1e-6)
    for k in range(3):
        grid = patch[k].view(8, 8).numpy()
        expected = ndimage.gaussian_filter(cv2.resize(grid, (64, 64)), sigma=4)
        np.testing.assert_allclose(pred.maps[k], expected, rtol=1e-4, atol=1e-6)
    assert pred.scores.dtype == np.float32 and pred.maps.shape == (3, 64, 64)


def test_state_round_trip_and_backbone_check():
    method = funad(epochs=1)
    method.fit(train_set(8))
    state = method.state_dict()
    fresh = build_method("funad", teacher_weights="random")
    fresh.load_state_dict(state)
    assert fresh.config == method.config
    images = random_images(3, seed=2)
    a, b = method.predict(images), fresh.predict(images)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    other = dict(state, backbone_weights_id="random:seed=5")
    with pytest.raises(UserError, match="saved model was trained on random:seed=5"):
        build_method("funad", teacher_weights="random").load_state_dict(other)
    with pytest.raises(UserError, match="not a funad model"):
        fresh.load_state_dict({"format": "softpatch-bank/1", "method": "softpatch"})


def test_describe_flags_a_random_backbone_and_names_the_terms():
    info = funad().describe()
    assert info["random_backbone"] is True and "tests and smoke runs" in info["note"]
    assert info["paper_backbone"] is False
    assert "patent pending" in info["licence"] and "commercial" in info["licence"]
    assert info["teacher_weights_id"] == "random:seed=0"


def test_too_few_images_for_one_batch_is_one_line():
    with pytest.raises(UserError, match="fewer than batch_size=4"):
        funad().fit(train_set(3))


@pytest.mark.parametrize("overrides, match", [
    ({"lr": float("nan")}, "lr=nan must be a finite number"),
    ({"lr": 0.0}, "lr=0.0 must lie in"),
    ({"momentum": 1.0}, "momentum"),
    ({"bank_fraction": 0.0}, "bank_fraction"),
    ({"smooth_weight": float("inf")}, "smooth_weight"),
    ({"noise_threshold": 0.4}, "must exceed label_threshold"),
    ({"batch_size": 1}, "at least 2"),
    ({"max_steps": 0}, "max_steps"),
    ({"vit_overrides": ("depth",)}, "not key=value"),
    ({"vit_overrides": ("pretrained=true",)}, "set by the harness"),
])
def test_bad_config_is_one_line(overrides, match):
    with pytest.raises(UserError, match=match):
        make_config("funad", overrides)


def test_defaults_are_the_official_values_and_the_variant_is_200_epochs():
    cfg = make_config("funad", {})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum) == (1500, 32, 2e-5, 0.2)
    assert (cfg.label_threshold, cfg.noise_threshold, cfg.smooth_weight) == (0.5, 0.9, 2.5)
    assert (cfg.bank_fraction, cfg.candidate_threshold, cfg.gaussian_sigma) == (0.5, 0.5, 4.0)
    assert cfg.vit_model == "vit_base_patch8_224.dino" and cfg.vit_overrides == ()
    method, variant = resolve_config("funad-e200")
    assert method == "funad" and variant.epochs == 200
    assert dataclasses.replace(variant, epochs=1500) == cfg
    # the command-line form of the overrides
    assert make_config("funad", {"vit_overrides": "embed_dim=32,depth=1"}).vit_overrides == (
        "embed_dim=32", "depth=1")
