"""Teacher backbones: shapes, freezing, normalisation and the three kinds of weights."""

import hashlib
import urllib.error

import pytest
import torch
import torchvision

from bench.errors import UserError
from methods import backbones
from methods.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_teacher,
    imagenet_cache_path,
    teacher_input,
    weights_id,
)


@pytest.fixture(scope="module")
def r18():
    return build_teacher("resnet18", "random")


def _images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_resnet18_feature_shapes_and_metadata(r18):
    feats = r18(_images(2, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert r18.channels == (64, 128, 256) and r18.strides == (4, 8, 16)
    assert r18.weights_id == "random:seed=0"
    assert not hasattr(r18, "layer4") and not hasattr(r18, "fc")


def test_wide_resnet50_2_feature_shapes():
    teacher = build_teacher("wide_resnet50_2", "random")
    feats = teacher(_images(1, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4)]
    assert teacher.channels == (256, 512, 1024)


def test_teacher_is_frozen_and_stays_in_eval(r18):
    assert all(not p.requires_grad for p in r18.parameters())
    r18.train()
    assert not r18.training and all(not m.training for m in r18.modules())
    x = _images(2)
    a = r18(x)
    b = r18(x)  # eval BatchNorm: no running-stat updates, identical output
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_normalisation_uint8_and_float_agree(r18):
    x = _images(2)
    norm = teacher_input(x, "cpu")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm, (x.float() / 255 - mean) / std)
    from_uint8 = r18(x)
    from_float = r18(x.float() / 255)
    from_encode = r18.encode(norm)
    for a, b, c in zip(from_uint8, from_float, from_encode):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_random_weights_are_seeded_and_leave_global_rng_alone(r18):
    state = torch.random.get_rng_state()
    again = build_teacher("resnet18", "random")
    assert torch.equal(torch.random.get_rng_state(), state)
    other = build_teacher("resnet18", "random:1")
    w0, w1, w2 = (t.conv1.weight for t in (r18, again, other))
    assert torch.equal(w0, w1) and not torch.equal(w0, w2)
    assert other.weights_id == "random:seed=1"
    assert weights_id("resnet18", "random:1") == other.weights_id
    assert torch.equal(build_teacher("resnet18", "random:0").conv1.weight, w0)
    for bad in ("random:", "random:-1", "random:x"):
        with pytest.raises(UserError, match="non-negative integer"):
            build_teacher("resnet18", bad)


def _full_state(seed=3):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


def test_weight_file_loads_and_is_identified_by_content(tmp_path, r18):
    state = _full_state()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    teacher = build_teacher("resnet18", str(path))
    assert torch.equal(teacher.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert teacher.weights_id.startswith("file:") and len(teacher.weights_id) == 5 + 12
    assert weights_id("resnet18", str(path)) == teacher.weights_id
    # Same bytes under another name -> same id; a truncated state (no layer4/fc) also loads.
    trimmed = {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}
    torch.save(trimmed, tmp_path / "trimmed.pth")
    t2 = build_teacher("resnet18", str(tmp_path / "trimmed.pth"))
    for a, b in zip(teacher(_images(1)), t2(_images(1))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            lambda s: {k: v for k, v in s.items() if k != "layer2.0.conv1.weight"},
            "missing key 'layer2.0.conv1.weight'",
        ),
        (lambda s: {**s, "head.weight": torch.zeros(1)}, "unexpected key 'head.weight'"),
        (
            lambda s: {**s, "layer1.0.bn1.weight": torch.zeros(3)},
            "'layer1.0.bn1.weight' has shape (3,), expected (64,)",
        ),
        (lambda s: {"module." + k: v for k, v in s.items()}, "strip that DataParallel prefix"),
        (lambda s: {"state_dict": s, "epoch": 3}, "wrapping its weights under 'state_dict'"),
        (lambda s: list(s.values()), "holds a list, not a state_dict"),
        (lambda s: {**s, "note": "hello"}, "entry 'note' is a str, not a tensor"),
    ],
)
def test_wrong_weight_files_are_named_in_one_line(tmp_path, corrupt, message):
    path = tmp_path / "bad.pth"
    torch.save(corrupt(_full_state()), path)
    with pytest.raises(UserError) as err:
        build_teacher("resnet18", str(path))
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_non_state_dict_pickle_is_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module: weights_only=True refuses it
    with pytest.raises(UserError, match="weights_only=True"):
        build_teacher("resnet18", str(path))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be loaded"):
        build_teacher("resnet18", str(tmp_path / "junk.pth"))


def test_unknown_weights_and_backbone(tmp_path):
    with pytest.raises(UserError, match="neither 'imagenet', 'random' nor an existing file"):
        build_teacher("resnet18", str(tmp_path / "absent.pth"))
    with pytest.raises(UserError, match="unknown backbone 'resnet50'"):
        build_teacher("resnet50", "random")


def test_imagenet_offline_names_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_cache_path("resnet18") == expected
    with pytest.raises(UserError) as err:
        build_teacher("resnet18", "imagenet")
    text = str(err.value)
    assert calls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert f"put it at {expected}" in text and "\n" not in text


def test_imagenet_uses_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download")
    )
    state = _full_state(seed=5)
    path = imagenet_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    # Not torchvision's file: its SHA-256 does not start with the prefix in the name.
    with pytest.raises(UserError, match="are not torchvision's file") as err:
        build_teacher("resnet18", "imagenet")
    assert "the name says f37072fd" in str(err.value) and "\n" not in str(err.value)
    # A file whose hash does match (this one, declared so) is loaded from the cache.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(backbones, "imagenet_sha256_prefix", lambda backbone: digest[:8])
    teacher = build_teacher("resnet18", "imagenet")
    assert teacher.weights_id == "imagenet:IMAGENET1K_V1"
    assert torch.equal(teacher.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize("content", [b"", b"not a pickle", "wrong keys"])
def test_a_broken_cached_imagenet_file_is_one_line(tmp_path, monkeypatch, content):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = imagenet_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    if content == "wrong keys":
        torch.save({"conv1.weight": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(backbones, "imagenet_sha256_prefix", lambda backbone: digest[:8])
    with pytest.raises(UserError) as err:
        build_teacher("resnet18", "imagenet")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_encoder_is_a_trainable_copy_of_the_teacher():
    from methods.backbones import build_encoder

    teacher, encoder = build_teacher("resnet18", "random:3"), build_encoder("resnet18", "random:3")
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert encoder.weights_id == teacher.weights_id == "random:seed=3"
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    encoder.eval()
    with torch.no_grad():
        for a, b in zip(encoder(images), teacher(images)):
            torch.testing.assert_close(a, b)
    encoder.train()
    loss = sum(f.mean() for f in encoder(images))
    loss.backward()
    assert encoder.layer3[0].conv1.weight.grad is not None


def test_a_method_reading_layer4_refuses_a_file_without_it(tmp_path):
    from methods.backbones import TEACHER_MODULES, load_backbone_net

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "truncated.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("layer4.")}, path)
    load_backbone_net("resnet18", str(path))  # enough for a teacher (up to layer3)
    with pytest.raises(UserError, match="missing key 'layer4"):
        load_backbone_net("resnet18", str(path), needs=(*TEACHER_MODULES, "layer4"))
