"""ReContrast: parameter counts, detached targets, hard-mining hook, alpha schedule, optimisers,
encoder BatchNorm modes, the frozen copy, budgets, determinism and state round trip."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods
from bench.errors import UserError
from bench.sweep import expand, load_preset
from methods.backbones import build_teacher, teacher_input
from methods.base import TrainSet, build_method, make_config, resolve_config
from methods.rd import rd_loss
from methods.recontrast import (
    PartialBatchNorm2d,
    ReContrast,
    ReContrastConfig,
    alpha_at,
    build_net,
    contrast_loss,
    easy_points,
    hard_mined_cosine,
    image_scores,
)

SIZE = 64
# Parameters receiving a gradient (counted on the official models, docs/recontrast.md):
# trainable encoder, OCBE, decoder body + two sets of output heads.
REFERENCE_COUNTS = {
    "wide_resnet50_2": (24_862_528, 58_885_120, 27_673_600, 111_421_248),
    "resnet18": (2_782_784, 11_680_000, 3_876_096, 18_338_880),
}


def _images(n, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _train_set(n=4, size=SIZE, seed=0):
    # Smooth images so the decoder has structure to learn.
    images = _images(n, size // 8, seed).float()
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)
    return TrainSet(images, tuple(f"img{i}" for i in range(n)))


def _method(seed=0, **overrides):
    cfg = {"backbone": "resnet18", "iterations": 8, "batch_size": 2, **overrides}
    return build_method("recontrast", cfg, teacher_weights="random", seed=seed)


def _fit(method, train=None):
    history = []
    method.fit(train or _train_set(), observer=lambda e, s, p=None: history.append((e, dict(s))))
    return history


def _count(module):
    return sum(p.numel() for p in module.parameters() if p.grad is not None)


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backbone", ["wide_resnet50_2", "resnet18"])
def test_parameters_receiving_gradients_match_the_reference(backbone):
    net = build_net(backbone, "random", seed=0).train()
    x = teacher_input(_images(2), "cpu")
    en, fz = net.features(x)
    q_en, q_fz = net.decoder(en, fz)
    contrast_loss(en, fz, q_en, q_fz, alpha=-3.0).backward()
    encoder, ocbe, decoder, total = REFERENCE_COUNTS[backbone]
    assert _count(net.encoder) == encoder
    assert _count(net.decoder.body.ocbe) == ocbe
    assert _count(net.decoder.body.decoder) + _count(net.decoder.heads) == decoder
    assert _count(net) == total
    assert _count(net.frozen) == 0 and not any(p.requires_grad for p in net.frozen.parameters())
    # Every parameter of the trained parts exists for a reason: none is left without a gradient.
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == total


def test_forward_returns_the_official_order():
    net = build_net("resnet18", "random", seed=0).eval()
    x = teacher_input(_images(2), "cpu")
    with torch.no_grad():
        targets, preds = net(x)
        en, fz = net.features(x)
        q_en, q_fz = net.decoder(en, fz)
    for got, want in zip(targets, fz + en):
        torch.testing.assert_close(got, want)
    for got, want in zip(preds, q_en + q_fz):
        torch.testing.assert_close(got, want)
    assert [t.shape for t in targets] == [p.shape for p in preds]
    # In eval mode each half is decoded on its own: the concatenated batch changes nothing, and
    # head set 0 reads the trainable half, head set 1 the frozen half.
    with torch.no_grad():
        alone = net.decoder.body(en)
    for head, d, q in zip(net.decoder.heads[0], alone, q_en):
        torch.testing.assert_close(head(d), q, rtol=1e-4, atol=1e-5)


def test_targets_are_detached():
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 8, 8), (2, 8, 4, 4), (2, 16, 2, 2)]
    en = [torch.randn(s, generator=g, requires_grad=True) for s in shapes]
    fz = [torch.randn(s, generator=g, requires_grad=True) for s in shapes]
    q_en = [torch.randn(s, generator=g, requires_grad=True) for s in shapes]
    q_fz = [torch.randn(s, generator=g, requires_grad=True) for s in shapes]
    contrast_loss(en, fz, q_en, q_fz, alpha=-3.0).backward()
    assert all(t.grad is None for t in en + fz)
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in q_en + q_fz)


def _hand_easy_mask(target, pred, alpha):
    t, p = target.double().numpy(), pred.detach().double().numpy()
    cos = (t * p).sum(1) / np.maximum(np.linalg.norm(t, axis=1) * np.linalg.norm(p, axis=1), 1e-8)
    dist = 1.0 - cos  # (B, h, w)
    return dist < dist.mean() + alpha * dist.std(ddof=1)


@pytest.mark.parametrize("alpha", [-0.5, 0.3, 1.0])
def test_hard_mining_hook_zeroes_exactly_the_easy_points(alpha):
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 6, 5, 4), (3, 10, 3, 3)]
    targets = [torch.randn(s, generator=g) for s in shapes]
    preds = [(t + torch.randn(s, generator=g)).requires_grad_() for t, s in zip(targets, shapes)]
    plain = [p.detach().clone().requires_grad_() for p in preds]
    loss = hard_mined_cosine(targets, preds, alpha)
    reference = rd_loss(targets, plain)
    torch.testing.assert_close(loss, reference)  # the loss value itself is not masked
    loss.backward()
    reference.backward()
    for target, pred, ref in zip(targets, preds, plain):
        easy = _hand_easy_mask(target, pred, alpha)
        assert 0 < easy.sum() < easy.size  # the threshold splits the points
        np.testing.assert_array_equal(easy_points(target, pred, alpha)[:, 0].numpy(), easy)
        expected = ref.grad * torch.from_numpy(~easy).unsqueeze(1)
        torch.testing.assert_close(pred.grad, expected)


def test_alpha_schedule():
    assert [alpha_at(s, 2000) for s in (0, 50, 100, 150, 200, 201, 1999)] == [
        -3.0, -2.0, -1.0, 0.0, 1.0, 1.0, 1.0]
    assert alpha_at(200, 2000, ramp_fraction=0.2) == -1.0  # the stable recipe's slower ramp
    assert alpha_at(1, 40) == -2.0 and alpha_at(3, 40) == 0.0
    # fit follows it over the whole budget, even when max_steps stops early: 4 images, batch 2,
    # 40 iterations -> ramp over 4 steps; the observer reports the last step's alpha.
    history = _fit(_method(iterations=40, max_steps=4))
    assert [(s["steps"], s["alpha"]) for _, s in history] == [(2.0, -2.0), (4.0, 0.0)]


def test_two_adamw_optimisers_with_the_official_settings():
    method = _method()
    net = build_net("resnet18", "random", seed=0)
    decoder_opt, encoder_opt = method.optimizers(net)
    assert isinstance(decoder_opt, torch.optim.AdamW) and isinstance(encoder_opt, torch.optim.AdamW)
    (dec,), (enc,) = decoder_opt.param_groups, encoder_opt.param_groups
    assert (dec["lr"], enc["lr"]) == (2e-3, 1e-5)
    for group in (dec, enc):
        assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.9, 0.999), 1e-5, 1e-8)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(dec["params"]) == ids(net.decoder.parameters())  # OCBE, decoder and both heads
    assert ids(enc["params"]) == ids(net.encoder.parameters())
    assert not ids(net.frozen.parameters()) & (ids(dec["params"]) | ids(enc["params"]))


def test_category_overrides_are_the_official_lists():
    assert ReContrast.category_overrides == {
        "mvtec": {c: {"encoder_bn": "eval"}
                  for c in ("toothbrush", "leather", "grid", "tile", "wood", "screw")},
        "visa": {"*": {"iterations": 3000},
                 "cashew": {"encoder_bn": "eval"}, "pcb1": {"encoder_bn": "eval"}},
    }
    assert ReContrast.defaults_for("mvtec", "screw") == {"encoder_bn": "eval"}
    assert ReContrast.defaults_for("mvtec", "bottle") == {}
    assert ReContrast.defaults_for("visa", "pcb1") == {"iterations": 3000, "encoder_bn": "eval"}
    assert ReContrast.defaults_for("visa", "candle") == {"iterations": 3000}
    assert ReContrast.defaults_for("synthetic", "brick") == {}
    # A run resolves them beneath what it sets itself; a variant's choice counts as set.
    assert resolve_config("recontrast", dataset="mvtec", category="screw")[1].encoder_bn == "eval"
    assert resolve_config("recontrast", {"encoder_bn": "train"}, dataset="mvtec",
                          category="screw")[1].encoder_bn == "train"
    assert resolve_config("recontrast-stable", dataset="mvtec",
                          category="screw")[1].encoder_bn == "partial"
    assert resolve_config("recontrast-cdd", dataset="visa", category="pcb1")[1].iterations == 3000


@pytest.fixture(scope="module")
def fitted():
    """One short training run (default BatchNorm mode "train") shared by the tests below."""
    method = _method(seed=0)
    history = _fit(method)
    return method, history


def test_a_few_steps_lower_the_loss_and_predict_is_finite(fitted):
    method, history = fitted
    assert [e for e, _ in history] == [0, 1, 2, 3]
    assert [s["steps"] for _, s in history] == [2.0, 4.0, 6.0, 8.0]
    losses = [s["loss"] for _, s in history]
    assert losses[-1] < 0.8 * losses[0]
    pred = method.predict(_images(3, seed=9), batch_size=2)
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, SIZE, SIZE)
    assert pred.scores.dtype == np.float32 and pred.maps.dtype == np.float32
    assert np.isfinite(pred.maps).all()
    np.testing.assert_array_equal(pred.scores, pred.maps.max(axis=(1, 2)))


def test_the_frozen_copy_never_changes_and_the_encoder_does(fitted):
    method, _ = fitted
    # The starting point: the same weights built afresh (random:0 is deterministic).
    frozen = method.net.frozen.state_dict()
    assert _states_equal(frozen, build_teacher("resnet18", "random").state_dict())
    assert not method.net.frozen.training
    encoder = method.net.encoder.state_dict()
    assert not torch.equal(encoder["layer1.0.conv1.weight"], frozen["layer1.0.conv1.weight"])
    # BatchNorm in train mode: the running statistics follow the training batches.
    assert not torch.equal(encoder["bn1.running_mean"], frozen["bn1.running_mean"])


def test_encoder_bn_eval_keeps_running_statistics():
    method = _method(encoder_bn="eval", iterations=2)
    _fit(method)
    encoder = method.net.encoder.state_dict()
    start = build_teacher("resnet18", "random").state_dict()
    bn_stats = [k for k in encoder if k.endswith(("running_mean", "running_var"))]
    assert bn_stats and all(torch.equal(encoder[k], start[k]) for k in bn_stats)
    assert not torch.equal(encoder["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"])
    # The decoder's BatchNorm trains whatever the encoder does.
    assert not torch.equal(method.net.decoder.state_dict()["body.ocbe.fuse2.1.running_mean"],
                           torch.zeros(256))


def test_same_seed_gives_identical_maps_and_another_seed_does_not(fitted):
    reference, _ = fitted
    test = _images(2, seed=7)
    expected = reference.predict(test).maps
    same = _method(seed=0)
    _fit(same)
    np.testing.assert_array_equal(same.predict(test).maps, expected)
    other = _method(seed=1, max_steps=2)
    _fit(other)
    assert not np.array_equal(other.predict(test).maps, expected)


def test_feature_cache_changes_nothing_but_speed(fitted):
    reference, _ = fitted
    test = _images(2, seed=7)
    uncached = _method(seed=0, feature_cache=False)
    _fit(uncached)
    np.testing.assert_allclose(uncached.predict(test).maps, reference.predict(test).maps,
                               atol=1e-4)


def test_state_round_trip(fitted):
    method, _ = fitted
    test = _images(2, seed=5)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = build_method("recontrast", teacher_weights="random:9", seed=3)
    restored.load_state_dict(state)
    assert restored.config == method.config and restored.seed == 0
    np.testing.assert_array_equal(restored.predict(test).maps, method.predict(test).maps)
    assert _states_equal(restored.net.frozen.state_dict(), method.net.frozen.state_dict())
    with pytest.raises(UserError, match="state holds method 'rd'"):
        restored.load_state_dict({**state, "method": "rd"})
    with pytest.raises(UserError, match="saved model started from"):
        restored.load_state_dict({**state, "teacher_weights": "random:1"})


def test_budget_in_epochs_wins_and_max_steps_caps():
    history = _fit(_method(epochs=2, iterations=1000), _train_set(3))
    assert [s["steps"] for _, s in history] == [2.0, 4.0]  # 3 images, batch 2: 2 batches
    assert _method(epochs=2).budget(5) == 6 and _method(epochs=2, drop_last=True).budget(5) == 4
    assert _method(iterations=5).budget(5) == 5
    history = _fit(_method(iterations=3, drop_last=True), _train_set(3))
    assert [s["steps"] for _, s in history] == [1.0, 2.0, 3.0]  # max_steps: test_alpha_schedule
    with pytest.raises(UserError, match="leaves no batch"):
        _method(drop_last=True, batch_size=16).fit(_train_set(4))


def test_decoder_optimiser_reset_pauses_the_encoder():
    # Reset every 2 iterations: the encoder steps at iterations 0 and 1, then pauses for 99.
    short = _method(iterations=4, max_steps=2, decoder_optimizer_reset_every=2)
    long = _method(iterations=4, decoder_optimizer_reset_every=2)
    _fit(short)
    _fit(long)
    for (name, a), b in zip(short.net.encoder.named_parameters(), long.net.encoder.parameters()):
        assert torch.equal(a, b), name
    start = build_teacher("resnet18", "random")
    assert not torch.equal(short.net.encoder.conv1.weight, start.conv1.weight)
    assert not torch.equal(short.net.decoder.heads[0][0].weight, long.net.decoder.heads[0][0].weight)


def test_partial_norm_uses_the_floor_only_for_near_constant_channels():
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1.0, 1.0, 1e-4]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    partial = PartialBatchNorm2d.from_batchnorm(bn)
    torch.testing.assert_close(partial.var_floor, torch.tensor([5e-4, 5e-4, 1e-4]))
    assert partial.eps == 1e-6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g) * torch.tensor([1.0, 1e-3, 1e-3]).view(1, 3, 1, 1)
    x = x + 0.3
    out = partial.train()(x)
    batch = F.batch_norm(x, None, None, partial.weight, partial.bias, True, 0.0, 1e-6)
    torch.testing.assert_close(out[:, 0], batch[:, 0])  # large variance: plain batch norm
    # variance 1e-6 < floor 5e-4: batch mean removed, floor variance used
    mean1 = x[:, 1].mean()
    torch.testing.assert_close(out[:, 1], (x[:, 1] - mean1) / (5e-4 + 1e-6) ** 0.5 * 2.0 + 1.0)
    var = x.var(dim=(0, 2, 3))
    used = torch.stack([var[0], torch.tensor(5e-4), torch.tensor(1e-4)])
    torch.testing.assert_close(partial.running_var, 0.9 * bn.running_var + 0.1 * used)
    partial.eval()
    bn.eval()
    bn.eps = 1e-6
    with torch.no_grad():
        bn.running_mean.copy_(partial.running_mean)
        bn.running_var.copy_(partial.running_var)
    torch.testing.assert_close(partial(x), bn(x))


def test_stable_variant_trains_with_partial_norm_in_the_encoder():
    _, config = resolve_config("recontrast-stable", {"backbone": "resnet18", "iterations": 2,
                                                     "batch_size": 2})
    method = ReContrast(config, teacher_weights="random", seed=0)
    _fit(method)
    norms = [m for m in method.net.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, PartialBatchNorm2d) for m in norms)
    assert not any(isinstance(m, PartialBatchNorm2d) for m in method.net.frozen.modules())
    assert method.predict(_images(1)).scores.shape == (1,)
    restored = ReContrast(teacher_weights="random")
    restored.load_state_dict(method.state_dict())
    np.testing.assert_array_equal(restored.predict(_images(1)).maps,
                                  method.predict(_images(1)).maps)


def test_image_scores_max_or_top_ratio_mean():
    maps = torch.arange(2 * 10 * 10, dtype=torch.float32).reshape(2, 10, 10)
    torch.testing.assert_close(image_scores(maps), torch.tensor([99.0, 199.0]))
    # top 5 % of 100 pixels = the 5 largest
    torch.testing.assert_close(image_scores(maps, 0.05), torch.tensor([97.0, 197.0]))
    torch.testing.assert_close(image_scores(maps, 0.001), torch.tensor([99.0, 199.0]))


def test_config_defaults_are_the_official_recipe_and_bad_values_are_one_line_errors():
    cfg = ReContrastConfig()
    assert (cfg.backbone, cfg.iterations, cfg.epochs, cfg.batch_size, cfg.lr_decoder,
            cfg.lr_encoder, cfg.betas, cfg.weight_decay, cfg.adam_eps, cfg.encoder_bn,
            cfg.alpha_ramp_fraction, cfg.gaussian_sigma, cfg.score_top_ratio, cfg.drop_last,
            cfg.decoder_optimizer_reset_every, cfg.max_steps) == (
        "wide_resnet50_2", 2000, None, 16, 2e-3, 1e-5, (0.9, 0.999), 1e-5, 1e-8, "train",
        0.1, 4.0, 0.0, False, None, None)
    assert make_config("recontrast", {"encoder_bn": "eval", "epochs": "200"}).epochs == 200
    for bad in ({"lr_decoder": float("nan")}, {"lr_encoder": 0.0}, {"weight_decay": -1.0},
                {"iterations": 0}, {"epochs": 0}, {"max_steps": 0}, {"betas": (0.9, 1.0)},
                {"alpha_ramp_fraction": 0.0}, {"score_top_ratio": 1.0},
                {"gaussian_sigma": float("inf")}, {"adam_eps": -1e-8},
                {"decoder_optimizer_reset_every": 0}):
        with pytest.raises(UserError, match="recontrast config"):
            ReContrastConfig(**bad)
    with pytest.raises(UserError, match="recontrast.encoder_bn"):
        make_config("recontrast", {"encoder_bn": "frozen"})
    with pytest.raises(UserError, match="not a multiple of 32"):
        _method().fit(_train_set(size=48))


def test_variants_and_the_paper_sweep():
    assert methods.method_facts("recontrast-cdd").paper_name == "ReContrast"
    assert methods.method_facts("recontrast").rank == 20
    _, cdd = resolve_config("recontrast-cdd")
    assert cdd == ReContrastConfig()
    # paper-mvtec sets epochs=200 for every method with the field; the -cdd variant keeps the
    # official iteration budget unless the command line asks for epochs.
    preset = load_preset("paper-mvtec")
    (spec,) = expand(preset, categories=["bottle"], methods=["recontrast-cdd"], check_data=False)
    assert spec.config["epochs"] is None and spec.config["backbone"] == "wide_resnet50_2"
    (spec,) = expand(preset, categories=["bottle"], methods=["recontrast-cdd"],
                     sets=["epochs=200"], check_data=False)
    assert spec.config["epochs"] == 200


def test_float32_by_default_and_the_precision_is_recorded():
    from methods.recontrast import ReContrastConfig

    assert ReContrastConfig().amp_bf16 is False  # bf16 is an opt-in speed switch, as for RD
    assert _method().describe()["precision"] == "float32"
