"""URD: networks and parameter counts, loss terms and where their gradients go, the teacher's
BatchNorm modes, the frozen expert, the anomaly synthesiser, textures, budget, state, config."""

import io
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.errors import UserError
from datasets.mvtec import MVTEC_COUNTS
from datasets.visa import VISA_COUNTS
from methods.base import TrainSet, build_method, make_config, method_facts, resolve_config
from methods.registry_loader import BUILTIN_MODULES
from methods.synthetic_anomalies import (
    AnomalySynthesizer,
    BuiltinTextures,
    FolderTextures,
    foreground_mask,
    foreground_masks,
    perlin_noise,
    rotate_maps,
)
from methods.urd import (
    URD,
    URDConfig,
    build_urd_student,
    mask_alignment_loss,
    mask_pyramid,
    pixel_cosine_loss,
    student_loss_terms,
    teacher_loss_terms,
)

SIZE = 64


def _train_set(n=8, size=SIZE, seed=0):
    """Smooth random images (structure for the student to learn), uint8 (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g).float()
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)
    return TrainSet(images, tuple(f"img{i}" for i in range(n)))


def _urd(seed=0, **overrides):
    cfg = {"backbone": "resnet18", "batch_size": 4, "iterations": 2, **overrides}
    return build_method("urd", cfg, teacher_weights="random", seed=seed)


def _inputs(method, n=2, size=SIZE, seed=0):
    """Normalised clean and anomalous batches and the mask, as fit makes them."""
    x = _train_set(n, size, seed).images.float() / 255.0
    textures = BuiltinTextures(size, size, count=4)
    x_aug, mask = AnomalySynthesizer(textures, seed=seed)(x)
    return method._input(x), method._input(x_aug), mask


# --------------------------------------------------------------------------------------------
# Networks


def test_wrn50_parameter_counts_by_gradient():
    """The official counts (docs/urd.md), counted as the parameters that receive a gradient
    in one training step of each network."""
    method = build_method("urd", {"backbone": "wide_resnet50_2"}, teacher_weights="random")
    method.build_networks()
    xn, xn_aug, mask = _inputs(method, n=2)
    e_normal, e_aug = method.expert_features(xn, xn_aug)
    sum(method.teacher_terms(xn, xn_aug, mask, e_normal, e_aug).values()).backward()
    t_normal, t_aug = method.student_inputs(xn, xn_aug)
    sum(method.student_terms(t_normal, t_aug, e_normal).values()).backward()

    def with_grad(module):
        return sum(p.numel() for p in module.parameters() if p.grad is not None)

    student = method.student
    assert with_grad(method.teacher) == 24_862_528
    assert with_grad(student) == 119_856_640
    assert with_grad(student.ocbe) == 58_885_120
    assert with_grad(student.decoder) == 24_917_504
    assert sum(with_grad(m) for m in student.fusion_modules()) == 36_054_016
    assert not any(p.requires_grad for p in method.expert.parameters())
    # Every student parameter is used on the default path (the unused official
    # conv3x3_simattn and conv4/bn4 are not built).
    assert with_grad(student) == sum(p.numel() for p in student.parameters())
    guided = build_urd_student("wide_resnet50_2", guided_injection=True)
    assert sum(p.numel() for p in guided.guide.parameters()) == 2_360_320 + 9_439_232


def test_resnet18_networks_and_shapes():
    method = _urd()
    method.build_networks()
    assert method.expert.channels == method.teacher.channels == (64, 128, 256)
    feats = method.teacher(_train_set(2).images)
    out = method.student(feats)
    assert [tuple(f.shape) for f in out] == [tuple(f.shape) for f in feats]
    fusion = sum(p.numel() for m in method.student.fusion_modules() for p in m.parameters())
    # conv1x1 64->128, 128->256; conv3x3 128->128, 256->256; conv3x3 256->128, 512->256 (+BN)
    expected = (64 * 128 + 256) + (128 * 256 + 512) + (9 * 128 * 128 + 256) \
        + (9 * 256 * 256 + 512) + (9 * 256 * 128 + 256) + (9 * 512 * 256 + 512)
    assert fusion == expected


def test_student_init_is_xavier_normal_and_seeded():
    a = build_urd_student("resnet18", seed=3)
    b = build_urd_student("resnet18", seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    # Xavier-normal std = sqrt(2 / (fan_in + fan_out)); Kaiming fan-out (RD's) would be larger.
    conv = a.fuse_skip[1][0].weight  # 512 -> 256, 3x3
    want = math.sqrt(2.0 / (512 * 9 + 256 * 9))
    assert abs(conv.std().item() - want) < 0.05 * want
    decoder_conv = a.decoder.stage1[0].conv2.weight  # an RD decoder Conv2d, re-initialised too
    fan_in, fan_out = decoder_conv.shape[1] * 9, decoder_conv.shape[0] * 9
    assert abs(decoder_conv.std().item() - math.sqrt(2.0 / (fan_in + fan_out))) < 0.1 * math.sqrt(
        2.0 / (fan_in + fan_out))


# --------------------------------------------------------------------------------------------
# Loss terms


def test_loss_formulas():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 4, 4, generator=g)]
    b = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 4, 4, generator=g)]
    manual = sum((1 - F.cosine_similarity(x, y, dim=1)).mean() for x, y in zip(a, b))
    torch.testing.assert_close(pixel_cosine_loss(a, b), manual)
    # Teacher term (b): with T(x_aug) == E(x) the distance is 0, so the L1 is the mask's mean.
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    pyramid = mask_pyramid(mask, [(8, 8), (4, 4)])
    want = sum(m.mean() for m in pyramid)
    torch.testing.assert_close(mask_alignment_loss(a, a, mask), want)
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in pyramid)
    assert [tuple(m.shape[-2:]) for m in pyramid] == [(8, 8), (4, 4)]


def test_mask_pyramid_resizes_layer_after_layer():
    """The official loop reassigns the mask: layer l is resized from layer l-1's binary mask."""
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(1, 1, 64, 64, generator=g) > 0.7).float()
    sizes = [(16, 16), (8, 8), (4, 4)]
    cascade = []
    current = mask
    for size in sizes:
        current = (F.interpolate(current, size=size, mode="bilinear", align_corners=True)
                   >= 0.5).float()
        cascade.append(current)
    got = mask_pyramid(mask, sizes)
    for want, have in zip(cascade, got):
        torch.testing.assert_close(have, want)


def test_each_loss_term_is_finite_and_trains_only_its_network():
    method = _urd()
    method.build_networks()
    xn, xn_aug, mask = _inputs(method)
    nets = {"expert": method.expert, "teacher": method.teacher, "student": method.student}

    def grads():
        return {name: [p for p in net.parameters() if p.grad is not None]
                for name, net in nets.items()}

    def clear():
        for net in nets.values():
            net.zero_grad(set_to_none=True)

    e_normal, e_aug = method.expert_features(xn, xn_aug)
    for term in ("normal_pixel", "aug_mask", "aug_global"):
        clear()
        value = method.teacher_terms(xn, xn_aug, mask, e_normal, e_aug)[term]
        assert torch.isfinite(value) and value.ndim == 0
        value.backward()
        got = grads()
        assert got["teacher"] and any(p.grad.abs().sum() > 0 for p in got["teacher"]), term
        assert not got["student"] and not got["expert"], term
    t_normal, t_aug = method.student_inputs(xn, xn_aug)
    assert not any(f.requires_grad for f in t_normal + t_aug)
    for term in ("teacher_normal", "teacher_aug", "expert_normal", "expert_aug"):
        clear()
        value = method.student_terms(t_normal, t_aug, e_normal)[term]
        assert torch.isfinite(value) and value.ndim == 0
        value.backward()
        got = grads()
        assert len(got["student"]) == len(list(method.student.parameters())), term
        assert not got["teacher"] and not got["expert"], term


def test_student_terms_target_the_clean_images_features():
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]
    other = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]
    # S(x) = T(x) = E(x): the normal terms vanish, the aug terms compare S(x_aug) with the clean.
    terms = student_loss_terms(feats, other, feats, feats)
    assert float(terms["teacher_normal"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["expert_normal"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["teacher_aug"]) > 0.5 and float(terms["expert_aug"]) > 0.5
    t_terms = teacher_loss_terms(feats, other, feats, other, torch.zeros(2, 1, 32, 32))
    assert float(t_terms["normal_pixel"]) == pytest.approx(0.0, abs=1e-6)
    assert float(t_terms["aug_global"]) == pytest.approx(0.0, abs=1e-6)
    assert float(t_terms["aug_mask"]) > 0.5  # T(x_aug) far from E(x) where the mask is 0


def test_guided_injection_trains_its_convolutions():
    method = _urd(guided_injection=True)
    method.build_networks()
    xn, xn_aug, mask = _inputs(method)
    e_normal, _ = method.expert_features(xn, xn_aug)
    t_normal, t_aug = method.student_inputs(xn, xn_aug)
    sum(method.student_terms(t_normal, t_aug, e_normal).values()).backward()
    assert all(p.grad is not None for p in method.student.guide.parameters())
    plain = _urd()
    plain.build_networks()
    assert plain.student.guide is None


# --------------------------------------------------------------------------------------------
# Training: frozen expert, teacher BatchNorm modes, budget, loss, determinism, state


@pytest.fixture(scope="module")
def fitted():
    """One small run shared by the tests below: 6 images in batches of 4 and 2, 7 iterations
    rounded up to 4 whole epochs (8 steps)."""
    history = []
    method = _urd(iterations=7)
    method.fit(_train_set(6), observer=lambda e, s, p=None: history.append((e, dict(s))))
    return method, history


def test_a_few_steps_lower_the_loss_and_predict_is_finite(fitted):
    method, history = fitted
    assert [e for e, _ in history] == list(range(4))
    assert [s["steps"] for _, s in history] == [2.0, 4.0, 6.0, 8.0]
    assert method.describe()["trained_steps"] == 8
    first, last = history[0][1], history[-1][1]
    assert last["loss"] < first["loss"] and last["loss_student"] < 0.8 * first["loss_student"]
    for _, s in history:
        assert s["loss"] == pytest.approx(s["loss_teacher"] + s["loss_student"])
        assert s["loss_teacher"] == pytest.approx(
            sum(s[f"teacher/{k}"] for k in ("normal_pixel", "aug_mask", "aug_global")), rel=1e-5)
        assert 0.0 <= s["anomaly_fraction"] <= 1.0
    pred = method.predict(_train_set(3, seed=9).images, batch_size=2)
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, SIZE, SIZE)
    assert np.isfinite(pred.maps).all()
    np.testing.assert_array_equal(pred.scores, pred.maps.max(axis=(1, 2)))


def test_expert_never_changes_and_teacher_does(fitted):
    method, _ = fitted
    fresh = _urd()
    fresh.build_networks()
    for (name, before), after in zip(fresh.expert.state_dict().items(),
                                     method.expert.state_dict().values()):
        assert torch.equal(before, after), name
    changed = [name for (name, before), after in zip(fresh.teacher.state_dict().items(),
                                                     method.teacher.state_dict().values())
               if not torch.equal(before, after)]
    assert any(n.endswith("weight") for n in changed)
    assert any(n.endswith("running_mean") for n in changed)  # train-mode BN statistics


def test_teacher_batchnorm_is_in_train_mode_only_for_its_own_step():
    method = _urd(iterations=1, batch_size=4)
    modes = []
    original = method.build_networks

    def build_and_hook():
        original()
        method.teacher.bn1.register_forward_pre_hook(lambda m, _: modes.append(m.training))
        method.expert.bn1.register_forward_pre_hook(lambda m, _: modes.append(("E", m.training)))

    method.build_networks = build_and_hook
    method.fit(_train_set(4, size=32))
    # Per step: E(x, x_aug) once (eval), T(x) and T(x_aug) in train mode, T(x, x_aug) in eval.
    assert modes == [("E", False), True, True, False]
    modes.clear()
    method.predict(_train_set(2, size=32).images)
    assert modes == [False]


def test_budget_iterations_round_up_to_whole_epochs_and_epochs_win():
    # The official loop: bottle, 209 images, batch 16 -> 14 batches, 5,000 iterations -> 358 epochs.
    assert URD(URDConfig()).planned_epochs(209) == 358
    assert URD(URDConfig(iterations=10000)).planned_epochs(224) == 10000 // 14 + 1
    assert URD(URDConfig(epochs=200)).planned_epochs(209) == 200
    assert URD(URDConfig(iterations=7, batch_size=4)).planned_epochs(6) == 4  # the fixture
    seen = []
    _urd(iterations=50, max_steps=3, batch_size=4).fit(
        _train_set(6, size=32), observer=lambda e, s, p=None: seen.append(s["steps"]))
    assert seen == [2.0, 3.0]


def test_same_seed_same_model_other_seed_other_model():
    images = _train_set(4, size=32)
    test = _train_set(2, size=32, seed=5).images
    a, b, c = _urd(seed=0, max_steps=1), _urd(seed=0, max_steps=1), _urd(seed=1, max_steps=1)
    for m in (a, b, c):
        m.fit(images)
    np.testing.assert_array_equal(a.predict(test).maps, b.predict(test).maps)
    assert not np.allclose(a.predict(test).maps, c.predict(test).maps)


def test_state_dict_round_trip_gives_identical_predictions(fitted):
    method, _ = fitted
    test = _train_set(2, seed=5).images
    before = method.predict(test)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh = URD(teacher_weights="imagenet", seed=7)  # overwritten by the state
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    after = fresh.predict(test)
    np.testing.assert_array_equal(before.maps, after.maps)
    np.testing.assert_array_equal(before.scores, after.scores)
    assert fresh.config == method.config and fresh.seed == 0
    assert fresh.describe()["texture_source"] == method.describe()["texture_source"]
    assert fresh.describe()["teacher_weights_id"] == "random:seed=0"
    with pytest.raises(UserError, match="state holds method 'rd'"):
        fresh.load_state_dict({**method.state_dict(), "method": "rd"})


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="not a multiple of 32"):
        _urd().fit(_train_set(4, size=48))
    with pytest.raises(UserError, match="last batch of one image"):
        _urd(batch_size=4).fit(_train_set(5, size=32))
    with pytest.raises(UserError, match="last batch of one image"):  # every batch is one
        _urd(batch_size=1).fit(_train_set(2, size=32))
    with pytest.raises(RuntimeError, match="needs fit"):
        _urd().predict(_train_set(1).images)


# --------------------------------------------------------------------------------------------
# Synthetic anomalies


def _perlin_reference(res_r, res_c, angles, h, w):
    """Perlin noise pixel by pixel, written out from DRAEM's definition."""
    out = np.zeros((h, w))
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    for i in range(h):
        for j in range(w):
            u, v = i * res_r / h, j * res_c / w
            r, c = int(u), int(v)
            fu, fv = u - r, v - c

            def ramp(dr, dc, r=r, c=c, fu=fu, fv=fv):
                a = angles[r + dr, c + dc]
                return math.cos(a) * (fu - dr) + math.sin(a) * (fv - dc)

            tu, tv = fade(fu), fade(fv)
            n0 = ramp(0, 0) + tu * (ramp(1, 0) - ramp(0, 0))
            n1 = ramp(0, 1) + tu * (ramp(1, 1) - ramp(0, 1))
            out[i, j] = math.sqrt(2) * (n0 + tv * (n1 - n0))
    return out


def test_perlin_noise_matches_its_definition():
    rng = np.random.default_rng(0)
    angles = np.zeros((2, 33, 33))
    angles[0, :3, :9] = 2 * math.pi * rng.random((3, 9))
    angles[1, :33, :2] = 2 * math.pi * rng.random((33, 1 + 1))
    got = perlin_noise([2, 32], [8, 1], torch.from_numpy(angles), 32, 32).numpy()
    np.testing.assert_allclose(got[0], _perlin_reference(2, 8, angles[0], 32, 32), atol=1e-5)
    np.testing.assert_allclose(got[1], _perlin_reference(32, 1, angles[1], 32, 32), atol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        perlin_noise([3], [1], torch.zeros(1, 33, 33), 32, 32)


def test_rotation_matches_opencv_warp_affine():
    x = np.random.default_rng(1).random((32, 48)).astype(np.float32)
    for degrees in (37.0, -90.0):
        matrix = cv2.getRotationMatrix2D(((48 - 1) / 2, (32 - 1) / 2), degrees, 1.0)
        want = cv2.warpAffine(x, matrix, (48, 32), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        got = rotate_maps(torch.from_numpy(x)[None], [degrees])[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


def _object_image(size=64, dark_object=False):
    """A uniform background with a square object in the middle, uint8 (H, W, 3)."""
    rng = np.random.default_rng(0)
    image = np.full((size, size, 3), (40, 40, 40) if not dark_object else (220, 220, 220),
                    dtype=np.float64)
    q = size // 4
    image[q:3 * q, q:3 * q] = (200, 60, 30) if not dark_object else (30, 30, 30)
    image += rng.normal(0, 4, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def test_foreground_masks_find_the_object():
    size, q = 64, 16
    inside = np.zeros((size, size), dtype=bool)
    inside[q:3 * q, q:3 * q] = True
    grabcut = foreground_mask(_object_image(), "grabcut")
    otsu = foreground_mask(_object_image(dark_object=True), "otsu")  # inverse: dark side
    for mask in (grabcut, otsu):
        assert mask.dtype == bool
        assert (mask == inside).mean() > 0.97
    assert foreground_mask(_object_image(), "none").all()
    # Same image, same mask, whatever OpenCV's RNG did in between.
    cv2.setRNGSeed(123)
    np.testing.assert_array_equal(foreground_mask(_object_image(), "grabcut"), grabcut)


def test_synthesiser_is_deterministic_binary_and_inside_the_foreground():
    images = torch.from_numpy(np.stack([_object_image()] * 6)).permute(0, 3, 1, 2).contiguous()
    fg = foreground_masks(images, "grabcut")
    assert fg.shape == (6, 1, SIZE, SIZE) and fg.dtype == torch.bool
    x = images.float() / 255.0
    textures = BuiltinTextures(SIZE, SIZE, count=8)
    aug1, mask1 = AnomalySynthesizer(textures, seed=3)(x, fg)
    aug2, mask2 = AnomalySynthesizer(textures, seed=3)(x, fg)
    aug3, mask3 = AnomalySynthesizer(textures, seed=4)(x, fg)
    assert torch.equal(aug1, aug2) and torch.equal(mask1, mask2)
    assert not torch.equal(mask1, mask3)
    assert set(mask1.unique().tolist()) <= {0.0, 1.0} and mask1.shape == (6, 1, SIZE, SIZE)
    assert not (mask1.bool() & ~fg).any()  # anomalies only on the foreground
    assert torch.equal(aug1 * (1 - mask1), x * (1 - mask1))  # untouched outside the mask
    assert aug1.min() >= 0 and aug1.max() <= 1
    # Without a foreground mask the noise reaches the background too.
    _, free = AnomalySynthesizer(textures, seed=3)(x)
    assert (free.bool() & ~fg).any()
    # Over many draws: a visible share of the pixels, and beta stays below 0.8 (the pasted
    # texture always weighs more than 0.2 inside the mask).
    synth = AnomalySynthesizer(textures, seed=5)
    fractions = [synth(x)[1].mean().item() for _ in range(10)]
    assert 0.01 < float(np.mean(fractions)) < 0.5


def test_blend_uses_beta_below_0_8():
    # A black image and white textures: inside the mask the value is 1 - beta > 0.2.
    textures = BuiltinTextures(32, 32, count=2)
    for i in range(2):
        textures.texture(i)[:] = 255
    synth = AnomalySynthesizer(textures, seed=0)
    x = torch.zeros(16, 3, 32, 32)
    values = []
    for _ in range(5):
        aug, mask = synth(x)
        values += [aug[k][mask[k].expand(3, -1, -1).bool()].unique() for k in range(16)]
    values = torch.cat([v for v in values if v.numel()])
    assert values.min() > 0.2 - 1e-6 and values.max() <= 1.0
    assert values.max() - values.min() > 0.3  # beta varies


# --------------------------------------------------------------------------------------------
# Textures


def test_texture_folder_is_searched_recursively_and_named_in_provenance(tmp_path):
    (tmp_path / "banded").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "banded" / "a.jpg")
    Image.new("RGB", (20, 50), (0, 0, 255)).save(tmp_path / "b.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    textures = FolderTextures(tmp_path, 32, 32)
    assert len(textures) == 2
    got = textures.get([0, 1])
    assert got.shape == (2, 3, 32, 32) and got.dtype == torch.uint8
    # Sorted by relative path: "b.PNG" (blue) before "banded/a.jpg" (red).
    assert got[0, 2].float().mean() > 200 and got[1, 0].float().mean() > 200
    method = _urd(texture_root=str(tmp_path), max_steps=1)
    method.fit(_train_set(4, size=32))
    info = method.describe()
    assert info["texture_source"].startswith(f"folder:{tmp_path.resolve()} (2 images")
    assert info["builtin_textures"] is False


def test_builtin_textures_are_named_as_not_dtd():
    info = _urd().describe()
    assert info["builtin_textures"] is True and "not the paper's DTD" in info["texture_source"]
    a, b = BuiltinTextures(32, 32, count=6), BuiltinTextures(32, 32, count=6)
    first = a.get([0, 1, 2, 3, 4, 5])
    assert torch.equal(first, b.get([5, 4, 3, 2, 1, 0]).flip(0))  # fixed, in any order
    assert first.float().std(dim=(1, 2, 3)).min() > 1  # none is blank
    assert not torch.equal(first[0], first[1])


def test_bad_texture_folders_fail_before_training(tmp_path):
    calls = []
    method = _urd(texture_root=str(tmp_path / "missing"))
    method.build_networks = lambda: calls.append("built")
    with pytest.raises(UserError, match="is not a folder"):
        method.fit(_train_set(4, size=32))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    method = _urd(texture_root=str(tmp_path / "empty"))
    method.build_networks = lambda: calls.append("built")
    with pytest.raises(UserError, match="holds no image file"):
        method.fit(_train_set(4, size=32))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.jpg").write_bytes(b"not a jpeg")
    method = _urd(texture_root=str(tmp_path / "broken"))
    method.build_networks = lambda: calls.append("built")
    with pytest.raises(UserError, match="not a readable image"):
        method.fit(_train_set(4, size=32))
    assert calls == []


# --------------------------------------------------------------------------------------------
# Config, registration, per-category settings


def test_config_defaults_are_the_official_ones():
    cfg = URDConfig()
    assert (cfg.backbone, cfg.iterations, cfg.epochs, cfg.batch_size, cfg.lr_student,
            cfg.lr_teacher, cfg.betas, cfg.gaussian_sigma, cfg.guided_injection) == (
        "wide_resnet50_2", 5000, None, 16, 0.005, 1e-4, (0.5, 0.999), 4.0, False)
    assert cfg.max_steps is None and cfg.texture_root is None and cfg.foreground == "none"
    assert make_config("urd", {"epochs": "200", "foreground": "otsu"}).epochs == 200


@pytest.mark.parametrize("overrides, match", [
    ({"iterations": 0}, "iterations"),
    ({"epochs": 0}, "epochs"),
    ({"max_steps": 0}, "max_steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr_student": float("nan")}, "lr_student"),
    ({"lr_teacher": float("inf")}, "lr_teacher"),
    ({"lr_teacher": 0.0}, "lr_teacher"),
    ({"betas": (0.5, 1.0)}, "betas"),
    ({"betas": (float("nan"), 0.9)}, "betas"),
    ({"gaussian_sigma": -1.0}, "gaussian_sigma"),
    ({"gaussian_sigma": float("nan")}, "gaussian_sigma"),
    ({"foreground": "mask"}, "foreground"),
    ({"texture_root": " "}, "texture_root"),
    ({"backbone": "vgg"}, "backbone"),
])
def test_bad_config_values_are_user_errors(overrides, match):
    with pytest.raises(UserError, match=match):
        URDConfig(**overrides)
    with pytest.raises(UserError, match=match):
        make_config("urd", overrides)


def test_registration_variant_and_column():
    assert "methods.urd" in BUILTIN_MODULES
    method, cfg = resolve_config("urd-cdd")
    assert method == "urd" and cfg == URDConfig()
    # A sweep default `epochs: 200` sits below the variant's own value; --set is above it.
    assert resolve_config("urd-cdd", {"epochs": 200})[1].epochs == 200
    info = method_facts("urd-cdd")
    assert (info.label, info.paper_name, info.rank) == ("URD", "URD", 30)


# The official scripts' foreground lists and budgets, written out independently of the module.
OFFICIAL_MVTEC = {
    "grabcut": ["bottle", "cable", "hazelnut", "metal_nut", "pill", "toothbrush", "zipper"],
    "otsu": ["capsule", "screw"],
    "none": ["carpet", "grid", "leather", "tile", "wood", "transistor"],
}


def test_category_overrides_hold_the_official_lists():
    table = URD.category_overrides
    assert set(table) == {"mvtec", "visa"}
    mvtec, visa = table["mvtec"], table["visa"]
    assert set(mvtec) == set(MVTEC_COUNTS) and set(visa) == {"*"}
    for kind, names in OFFICIAL_MVTEC.items():
        for name in names:
            assert mvtec[name]["foreground"] == kind, name
    for name, values in mvtec.items():
        want = 10000 if name in ("cable", "transistor") else URDConfig().iterations
        assert values.get("iterations", URDConfig().iterations) == want, name
    for name in VISA_COUNTS:  # every VisA category, renamed or new ones too
        assert URD.defaults_for("visa", name) == {"foreground": "grabcut", "iterations": 10000}
    assert URD.defaults_for("visa", "my_own_part")["iterations"] == 10000
    assert resolve_config("urd", dataset="mvtec", category="cable")[1].iterations == 10000
    assert resolve_config("urd", {"iterations": 7}, dataset="mvtec",
                          category="cable")[1].iterations == 7
    for per_category in table.values():  # every entry is a valid config
        for values in per_category.values():
            make_config("urd", values)


def test_float32_by_default_and_the_precision_is_recorded():
    from methods.urd import URDConfig

    assert URDConfig().amp_bf16 is False  # bf16 is an opt-in speed switch, as for RD
    assert _urd().describe()["precision"] == "float32"
