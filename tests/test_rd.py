"""Reverse Distillation: parameter counts, loss, maps against scipy, cache, fit/predict/state."""

import io

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from bench.errors import UserError
from methods.backbones import build_teacher
from methods.base import TrainSet, build_method, make_config
from methods.rd import (
    FeatureCache,
    RDConfig,
    ReverseDistillation,
    anomaly_maps,
    build_student,
    flat_cosine,
    gaussian_blur,
    precision_name,
    rd_loss,
)

SIZE = 32  # training tests run at 32 px (1x1 bottleneck) to keep CPU time low
REFERENCE_COUNTS = {
    "wide_resnet50_2": (58_885_120, 24_917_504),
    "resnet18": (11_680_000, 3_703_168),
}


def _images(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _train_set(n=8, size=32, seed=0):
    # Smooth-ish synthetic images so the student has structure to learn.
    images = _images(n, size // 8, seed).float()
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)
    return TrainSet(images, tuple(f"img{i}" for i in range(n)))


def _rd(seed=0, **overrides):
    cfg = {"backbone": "resnet18", "epochs": 1, "batch_size": 4, **overrides}
    return build_method("rd", cfg, teacher_weights="random", seed=seed)


@pytest.mark.parametrize("backbone", ["wide_resnet50_2", "resnet18"])
def test_parameter_counts_match_the_reference(backbone):
    student = build_student(backbone)
    ocbe = sum(p.numel() for p in student.ocbe.parameters() if p.requires_grad)
    decoder = sum(p.numel() for p in student.decoder.parameters() if p.requires_grad)
    assert (ocbe, decoder) == REFERENCE_COUNTS[backbone]
    assert sum(p.numel() for p in student.parameters()) == ocbe + decoder


def test_every_parameter_receives_a_gradient():
    teacher = build_teacher("resnet18", "random")
    student = build_student("resnet18", seed=0)
    feats = teacher(_images(2))
    rd_loss(feats, student(feats)).backward()
    with_grad = sum(p.numel() for p in student.parameters() if p.grad is not None)
    assert with_grad == sum(REFERENCE_COUNTS["resnet18"])
    assert all(p.grad.abs().sum() > 0 for p in student.parameters())


def test_student_output_shapes_match_the_teacher():
    for backbone in ("resnet18", "wide_resnet50_2"):
        teacher = build_teacher(backbone, "random")
        student = build_student(backbone, seed=0).eval()
        with torch.no_grad():
            feats = teacher(_images(1))
            out = student(feats)
        assert [f.shape for f in out] == [f.shape for f in feats]


def _bn(module, x):
    return F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias)


@pytest.mark.parametrize("up", [False, True])
def test_residual_blocks_compute_the_resnet_formula(up):
    """relu(main path + shortcut), with the main path's convs, norms and ReLUs in order."""
    from methods.rd import _BasicBlock, _Bottleneck, _conv1x1, _deconv2x2

    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    for block_type in (_BasicBlock, _Bottleneck):
        out_ch = 4 * block_type.expansion
        shortcut = torch.nn.Sequential(
            _deconv2x2(8, out_ch) if up else _conv1x1(8, out_ch, 2), torch.nn.BatchNorm2d(out_ch))
        block = block_type(8, 4, 2, shortcut, up=up, width_per_group=128).eval()
        for m in block.modules():  # non-trivial statistics, so that each norm matters
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
        with torch.no_grad():
            if block_type is _BasicBlock:
                main = F.relu(_bn(block.bn1, block.conv1(x)))
                main = _bn(block.bn2, block.conv2(main))
                assert block.conv1.out_channels == 4
            else:
                main = F.relu(_bn(block.bn1, block.conv1(x)))
                main = F.relu(_bn(block.bn2, block.conv2(main)))
                main = _bn(block.bn3, block.conv3(main))
                assert block.conv1.out_channels == 8  # width = planes * 128 / 64
            expected = F.relu(main + shortcut(x))
            torch.testing.assert_close(block(x), expected)
            assert isinstance(block.conv2 if block_type is _Bottleneck else block.conv1,
                              torch.nn.ConvTranspose2d) == up


def test_student_seed_is_reproducible_and_isolated():
    state = torch.random.get_rng_state()
    a, b = build_student("resnet18", seed=4), build_student("resnet18", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_loss_and_flat_cosine_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(3, c, s, s, generator=g) for c, s in ((4, 8), (8, 4), (16, 2))]
    s = [torch.randn(x.shape, generator=g) for x in t]
    expected = sum(
        (1 - F.cosine_similarity(a.reshape(3, -1), b.reshape(3, -1), dim=1)).mean()
        for a, b in zip(t, s)
    )
    torch.testing.assert_close(rd_loss(t, s), expected)
    per_sample = rd_loss(t, s, reduction="none")
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample.mean(), expected)
    torch.testing.assert_close(flat_cosine(t, s), 3 - per_sample)
    torch.testing.assert_close(rd_loss(t, t), torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape, sigma", [((2, 64, 64), 4.0), ((1, 10, 13), 4.0), ((3, 20, 7), 1.5)])
def test_gaussian_blur_matches_scipy(shape, sigma):
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    ours = gaussian_blur(maps, sigma).numpy()
    for i in range(shape[0]):
        ref = scipy.ndimage.gaussian_filter(maps[i].double().numpy(), sigma=sigma)
        np.testing.assert_allclose(ours[i], ref, atol=1e-6)


def test_anomaly_maps_match_a_numpy_reference():
    g = torch.Generator().manual_seed(2)
    t = [torch.randn(2, c, s, s, generator=g) for c, s in ((4, 16), (8, 8), (16, 4))]
    s = [torch.randn(x.shape, generator=g) for x in t]
    ours = anomaly_maps(t, s, (64, 64), sigma=4.0)
    assert ours.shape == (2, 64, 64) and ours.dtype == torch.float32
    for i in range(2):
        total = np.zeros((64, 64))
        for a, b in zip(t, s):
            a_i, b_i = a[i].double().numpy(), b[i].double().numpy()
            cos = (a_i * b_i).sum(0) / np.maximum(
                np.linalg.norm(a_i, axis=0) * np.linalg.norm(b_i, axis=0), 1e-8
            )
            dist = torch.from_numpy(1 - cos)[None, None]
            total += F.interpolate(dist, size=(64, 64), mode="bilinear", align_corners=True)[
                0, 0
            ].numpy()
        ref = scipy.ndimage.gaussian_filter(total, sigma=4)
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-5)


def test_feature_cache_holds_teacher_features():
    teacher = build_teacher("resnet18", "random")
    images = _images(5)
    cache = FeatureCache(teacher, images, "cpu", batch_size=2)
    assert len(cache) == 5 and cache.storage_device.type == "cpu"
    assert cache.nbytes == 5 * (64 * 16 * 16 + 128 * 8 * 8 + 256 * 4 * 4) * 4
    index = torch.tensor([4, 0, 2])
    # Batches of 2 against one of 3: oneDNN may pick another convolution algorithm per batch
    # size, so agreement is to float32 rounding, not bit for bit.
    for got, want in zip(cache.get(index), teacher(images[index])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_config_defaults_are_the_papers():
    cfg = RDConfig()
    assert (cfg.backbone, cfg.epochs, cfg.batch_size, cfg.lr, cfg.betas, cfg.gaussian_sigma) == (
        "wide_resnet50_2", 200, 16, 0.005, (0.5, 0.999), 4.0
    )
    assert cfg.max_steps is None and cfg.feature_cache
    assert make_config("rd", {"betas": "0.9,0.99", "max_steps": "3"}).betas == (0.9, 0.99)
    with pytest.raises(UserError, match="rd.backbone"):
        make_config("rd", {"backbone": "vgg"})
    with pytest.raises(UserError, match="unknown backbone 'vgg'"):
        RDConfig(backbone="vgg")
    with pytest.raises(UserError, match="max_steps"):
        RDConfig(max_steps=0)


@pytest.fixture(scope="module")
def fitted():
    """One small training run shared by the tests below (CPU time is scarce)."""
    history = []
    method = _rd(seed=0, epochs=4)
    method.fit(_train_set(4), observer=lambda e, s, p=None: history.append((e, s)))
    return method, history


def test_fit_decreases_the_loss_and_predict_is_finite_at_input_size(fitted):
    method, history = fitted
    assert [e for e, _ in history] == [0, 1, 2, 3]
    assert [s["steps"] for _, s in history] == [1.0, 2.0, 3.0, 4.0]
    losses = [s["loss"] for _, s in history]
    assert losses[-1] < 0.8 * losses[0]
    pred = method.predict(_images(3, size=SIZE, seed=9), batch_size=2)
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, SIZE, SIZE)
    assert pred.scores.dtype == np.float32 and pred.maps.dtype == np.float32
    assert np.isfinite(pred.maps).all() and np.isfinite(pred.scores).all()
    np.testing.assert_array_equal(pred.scores, pred.maps.max(axis=(1, 2)))


def test_max_steps_stops_early():
    steps = []
    _rd(epochs=50, max_steps=3, batch_size=2).fit(
        _train_set(4), observer=lambda e, s, p=None: steps.append(s["steps"])
    )
    assert steps == [2.0, 3.0]  # 4 images / batch 2 = 2 steps per epoch, stop mid-epoch 2


def test_same_seed_gives_identical_predictions_and_cache_changes_nothing(fitted):
    reference, _ = fitted
    test = _images(2, size=SIZE, seed=7)
    expected = reference.predict(test).maps
    same = _rd(seed=0, epochs=4)
    same.fit(_train_set(4))
    np.testing.assert_array_equal(same.predict(test).maps, expected)
    uncached = _rd(seed=0, epochs=4, feature_cache=False)
    uncached.fit(_train_set(4))
    np.testing.assert_allclose(uncached.predict(test).maps, expected, atol=1e-4)
    other = _rd(seed=1, epochs=4, max_steps=1)
    other.fit(_train_set(4))
    assert not np.allclose(other.predict(test).maps, expected)


def test_state_dict_round_trip_gives_identical_predictions(fitted):
    method, _ = fitted
    test = _images(2, size=SIZE, seed=5)
    before = method.predict(test)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = ReverseDistillation(teacher_weights="imagenet", seed=5)  # overwritten by the state
    fresh.load_state_dict(state)
    after = fresh.predict(test)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps, after.maps)
    assert fresh.describe()["teacher_weights_id"] == "random:seed=0"
    assert fresh.config == method.config


def test_state_refuses_a_changed_weight_file(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save(build_teacher("resnet18", "random:1").state_dict(), path)
    method = build_method("rd", {"backbone": "resnet18", "max_steps": 1, "batch_size": 4},
                          teacher_weights=str(path))
    method.fit(_train_set(4))
    state = method.state_dict()
    torch.save(build_teacher("resnet18", "random:2").state_dict(), path)
    with pytest.raises(UserError, match="restore that weight file"):
        ReverseDistillation().load_state_dict(state)


def test_describe_marks_provenance():
    info = _rd(seed=2).describe()
    assert info["method"] == "rd" and info["backbone"] == "resnet18"
    # The random teacher's seed is named by its weights, not the training seed.
    assert info["teacher_weights"] == "random" and info["teacher_weights_id"] == "random:seed=0"
    assert info["paper_teacher"] is False
    assert ReverseDistillation().describe()["paper_teacher"] is True


def test_float32_by_default_and_the_record_names_the_precision(fitted, monkeypatch):
    assert RDConfig().amp_bf16 is False  # bf16 is an opt-in speed switch
    method, _ = fitted
    assert method.describe()["precision"] == "float32"
    assert precision_name("cpu", True) == "float32"  # autocast acts on CUDA only
    assert precision_name("cuda", True) == "bf16-autocast"
    assert precision_name("cuda", False) == "float32+tf32-conv"  # PyTorch's default
    assert ReverseDistillation(device="cuda").describe()["precision"] == "float32+tf32-conv"
    bf16 = ReverseDistillation(RDConfig(amp_bf16=True), device="cuda")
    assert bf16.describe()["precision"] == "bf16-autocast"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert precision_name("cuda", False) == "float32"
    # A restored model reports the precision it was trained in, not the one it runs in now.
    assert method.state_dict()["precision"] == "float32"
    state = {**method.state_dict(), "precision": "bf16-autocast"}
    restored = ReverseDistillation()
    restored.load_state_dict(state)
    assert restored.describe()["precision"] == "bf16-autocast"


def test_bad_image_sizes_are_user_errors():
    with pytest.raises(UserError, match="not a multiple of 32"):
        _rd().fit(_train_set(4, size=48))
    with pytest.raises(UserError, match="not a multiple of 32"):
        _rd().predict(_images(1, size=40))
    with pytest.raises(UserError, match="last batch of one image"):
        _rd(batch_size=4).fit(_train_set(5, size=32))
    with pytest.raises(UserError, match="last batch of one image"):  # every batch is one
        _rd(batch_size=1).fit(_train_set(2, size=32))


def test_an_empty_training_set_is_refused_and_a_single_image_trains():
    with pytest.raises(UserError, match="training set is empty"):
        _rd().fit(TrainSet(torch.zeros((0, 3, 64, 64), dtype=torch.uint8), ()))
    method = _rd(max_steps=1)
    method.fit(_train_set(1, size=64))
    assert method.predict(_images(1)).scores.shape == (1,)


def test_weights_check_reads_the_configs_backbone(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_teacher("resnet18", "random:1").state_dict(), path)
    assert ReverseDistillation.weights_check(make_config("rd", {}), "random") is None
    key, load = ReverseDistillation.weights_check(make_config("rd", {"backbone": "resnet18"}),
                                                  str(path))
    assert key[1] == "resnet18"
    load()  # the file fits the backbone
    _, load_wrong = ReverseDistillation.weights_check(
        make_config("rd", {"backbone": "wide_resnet50_2"}), str(path))
    with pytest.raises(UserError):
        load_wrong()


@pytest.mark.parametrize("betas", [(1.5, 0.9), (0.5, -0.1), (0.5, 1.0)])
def test_betas_outside_adams_range_are_refused_with_the_config(betas):
    with pytest.raises(UserError, match=r"betas=.* must be two numbers in \[0, 1\)"):
        make_config("rd", {"betas": betas})
    with pytest.raises(UserError, match="betas"):
        make_config("cdd", {"betas": betas})
