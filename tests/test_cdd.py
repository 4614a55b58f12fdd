"""Tests of Cross-Domain Distillation (methods/cdd.py): schedules, domain construction,
selection, where the perturbation goes, the reduction to RD, and a tiny fit per preset.

Everything runs on CPU with a random-weight ResNet-18 teacher at 32 px.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import methods
from bench.errors import UserError
from methods.backbones import build_teacher
from methods.base import TrainSet, build_method, make_config
from methods.cdd import (
    CDDConfig,
    cdd_diagnostics,
    confidence_scores,
    consensus_select,
    construct_domains,
    cross_visits,
    high_confidence_count,
    k_at_epoch,
    lambda_schedule,
    next_select,
    other_students,
    perturb,
    r_schedule,
    select_high_confidence,
    stacked_affinity,
)
from methods.rd import build_student, flat_cosine

TINY = {"backbone": "resnet18", "epochs": 2, "batch_size": 8, "max_steps_per_stage": 1}


def _train_set(n: int = 8, size: int = 32, n_anomalous: int = 2, seed: int = 0) -> TrainSet:
    """Smooth textured 'normal' images plus a few with a bright square (injected noise)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = 127 + 60 * torch.sin(xx / 3.0) * torch.cos(yy / 4.0)
    images = base.expand(n, 3, size, size).clone() + torch.randn(n, 3, size, size, generator=g) * 8
    for i in range(n - n_anomalous, n):
        images[i, :, 8:16, 10:18] = 255
    images = images.clamp(0, 255).to(torch.uint8)
    return TrainSet(images, tuple(f"img{i:02d}" for i in range(n)))


# --------------------------------------------------------------------------------------------
# Schedules


def test_r_schedule_starts_at_zero_and_caps():
    assert r_schedule(0, 200, 0.5) == 0.0  # e = 0: empty high-confidence set
    assert r_schedule(50, 200, 0.5) == pytest.approx(0.25)
    assert r_schedule(100, 200, 0.5) == pytest.approx(0.5)
    assert r_schedule(199, 200, 0.5) == 0.5  # the cap
    assert r_schedule(150, 200, 0.7) == 0.7
    assert r_schedule(199, 200, 0.0) == 0.0


def test_lambda_schedules():
    # Eq. 16 with p = 4: 0 at e = 0, 1/2 at E/2, (1/4)^4 / ((1/4)^4 + (3/4)^4) = 1/82 at E/4.
    assert lambda_schedule(0, 200, "s_curve", 4.0) == 0.0
    assert lambda_schedule(100, 200, "s_curve", 4.0) == pytest.approx(0.5)
    assert lambda_schedule(50, 200, "s_curve", 4.0) == pytest.approx(1 / 82)
    assert lambda_schedule(200, 200, "s_curve", 4.0) == pytest.approx(1.0)
    assert lambda_schedule(150, 200, "s_curve", 4.0) == pytest.approx(81 / 82)
    assert lambda_schedule(50, 200, "linear") == pytest.approx(0.25)
    assert lambda_schedule(50, 200, "zero") == 0.0
    assert lambda_schedule(0, 200, "one") == 1.0
    values = [lambda_schedule(e, 200, "s_curve", 4.0) for e in range(200)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        lambda_schedule(1, 2, "cosine")


def test_k_schedule_equal_consecutive_stages():
    ks = [k_at_epoch(e, 200, (2, 3, 3, 2)) for e in range(200)]
    assert ks[:50] == [2] * 50 and ks[50:150] == [3] * 100 and ks[150:] == [2] * 50
    assert {k_at_epoch(e, 7, (4,)) for e in range(7)} == {4}
    # Epochs not divisible by the stages: every stage still gets its turn, in order.
    assert [k_at_epoch(e, 7, (2, 3, 4, 3, 2)) for e in range(7)] == [2, 2, 3, 4, 4, 3, 2]


# --------------------------------------------------------------------------------------------
# Domain construction


def test_high_confidence_set_is_the_top_fraction():
    conf = np.array([0.1, 0.9, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4])
    assert select_high_confidence(conf, 0.0).size == 0
    assert select_high_confidence(conf, 0.3).tolist() == [1, 3, 7]  # floor(3.0000000004) = 3
    assert select_high_confidence(conf, 0.25).tolist() == [1, 3]  # ties: lower index first
    assert high_confidence_count(0.29, 100) == 29
    assert high_confidence_count(0.5, 7) == 3


@pytest.mark.parametrize("n,r,k", [(10, 0.0, 2), (17, 0.3, 3), (40, 0.5, 4), (9, 0.5, 2)])
def test_domain_invariants(n, r, k):
    conf = np.random.default_rng(n).random(n)
    hc = select_high_confidence(conf, r)
    plan = construct_domains(n, hc, k, np.random.default_rng(7))
    parts = plan.lc_parts
    assert len(parts) == k
    for d in range(k):
        assert set(hc) <= set(plan.domain(d))  # HC in every domain (Eq. 14)
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat))  # LC parts disjoint
    assert sorted(flat.tolist() + hc.tolist()) == list(range(n))  # covering, HC apart
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1  # even split
    again = construct_domains(n, hc, k, np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again.lc_parts))  # seeded
    owner = plan.domain_of(n)
    assert (owner[hc] == -1).all() and all((owner[p] == d).all() for d, p in enumerate(parts))


def test_domains_change_with_seed_and_unguided_split_covers_everything():
    hc = np.arange(10)
    a = construct_domains(40, hc, 3, np.random.default_rng(1))
    b = construct_domains(40, hc, 3, np.random.default_rng(2))
    assert any(not np.array_equal(x, y) for x, y in zip(a.lc_parts, b.lc_parts))
    plain = construct_domains(40, hc, 3, np.random.default_rng(1), guided=False)
    assert sorted(np.concatenate(plain.lc_parts).tolist()) == list(range(40))
    assert np.array_equal(plain.domain(0), plain.lc_parts[0])


def test_cross_visits_per_domain_and_once():
    plan = construct_domains(20, np.arange(6), 3, np.random.default_rng(0))
    per_domain = cross_visits(plan, "per_domain", np.random.default_rng(0))
    assert all(np.array_equal(v, plan.domain(d)) for d, v in enumerate(per_domain))
    once = cross_visits(plan, "once", np.random.default_rng(0))
    flat = np.concatenate(once)
    assert sorted(flat.tolist()) == list(range(20))  # every sample exactly once
    for d, v in enumerate(once):
        assert set(plan.lc_parts[d]) <= set(v)
    shares = [np.intersect1d(v, plan.hc).size for v in once]
    assert max(shares) - min(shares) <= 1


# --------------------------------------------------------------------------------------------
# Confidence, affinity, selection, perturbation


def _feats(batch, gen, lead=()):
    shapes = [(16, 8, 8), (32, 4, 4), (64, 2, 2)]
    return [torch.randn(*lead, batch, *s, generator=gen) for s in shapes]


def test_confidence_is_mean_positionwise_cosine_summed_over_layers():
    g = torch.Generator().manual_seed(0)
    t, s = _feats(3, g), _feats(3, g)
    expected = torch.zeros(3)
    for a, b in zip(t, s):
        for i in range(3):
            num = (a[i] * b[i]).sum(0)
            den = a[i].norm(dim=0) * b[i].norm(dim=0)
            expected[i] += (num / den).mean()
    assert torch.allclose(confidence_scores(t, s), expected, atol=1e-5)
    assert torch.allclose(confidence_scores(t, t), torch.full((3,), 3.0), atol=1e-5)


def test_affinity_matches_flat_cosine_and_consensus_picks_argmax_of_others():
    g = torch.Generator().manual_seed(1)
    k, b = 4, 6
    stacked = _feats(b, g, lead=(k,))
    ref = _feats(b, g)
    aff = stacked_affinity(stacked, ref)  # (B, K), Eq. 17
    for h in range(k):
        assert torch.allclose(aff[:, h], flat_cosine([s[h] for s in stacked], ref), atol=1e-5)
    for own in range(k):
        own_t = torch.full((b,), own)
        pick = consensus_select(aff, own_t)  # Eq. 18
        assert (pick != own).all()
        masked = aff.clone()
        masked[:, own] = -math.inf
        assert torch.equal(pick, masked.argmax(1))
    # The own student is excluded even when it has by far the highest affinity.
    aff = torch.tensor([[9.0, 1.0, 2.0], [0.5, 9.0, 0.1]])
    assert consensus_select(aff, torch.tensor([0, 1])).tolist() == [2, 0]


def test_all_and_next_semantics():
    assert other_students(3, 0, "all") == [1, 2]
    assert other_students(3, 2, "consensual") == [0, 1]
    assert other_students(3, 2, "next") == [0]  # (k + 1) mod K
    assert next_select(torch.tensor([0, 1, 2]), 3).tolist() == [1, 2, 0]


def test_perturbation_is_gaussian_with_sigma():
    feats = [torch.zeros(64, 32, 8, 8)]
    noisy = perturb(feats, 0.2, torch.Generator().manual_seed(0))[0]
    assert abs(float(noisy.std()) - 0.2) < 0.01 and abs(float(noisy.mean())) < 0.01
    assert perturb(feats, 0.0)[0] is feats[0]


# --------------------------------------------------------------------------------------------
# Diagnostics


def test_cdd_diagnostics():
    per_sample = {
        "confidence": np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.75]),
        "in_hc": np.array([1, 1, 0, 0, 0, 1]),
        "picked": np.array([-1, -1, 1, 0, 1, -1]),
    }
    injected = [False, False, False, True, True, False]
    out = cdd_diagnostics(per_sample, injected, n_students=3)
    assert out["confidence_auroc"] == 1.0  # both injected are the least confident
    assert out["injected_in_hc"] == 0.0 and out["normal_in_hc"] == 0.75
    assert (out["pick_count_0"], out["pick_count_1"], out["pick_count_2"]) == (1.0, 2.0, 0.0)
    assert (out["injected_pick_count_0"], out["injected_pick_count_1"]) == (1.0, 1.0)
    flipped = cdd_diagnostics({**per_sample, "confidence": -per_sample["confidence"]}, injected)
    assert flipped["confidence_auroc"] == 0.0 and "pick_count_2" not in flipped
    assert math.isnan(cdd_diagnostics(per_sample, [False] * 6)["confidence_auroc"])


# --------------------------------------------------------------------------------------------
# Config and presets


def test_config_defaults_and_validation():
    cfg = CDDConfig()
    assert (cfg.epochs, cfg.r_normal, cfg.sigma_noise, cfg.lambda_p) == (200, 0.5, 0.2, 4.0)
    assert cfg.k_schedule == (2, 3, 3, 2) and cfg.lr == 0.005 and cfg.betas == (0.5, 0.999)
    assert cfg.batch_size == 16 and cfg.selection == "consensual"
    assert make_config("cdd", {"k_schedule": "2,3,4,3,2"}).k_schedule == (2, 3, 4, 3, 2)
    bad = [
        {"domain_construction": False},  # the other switches are still on
        {"pseudo_normal": False},  # F.P. without P.N.
        {"pseudo_normal": False, "feature_perturbation": False,
         "confident_distillation": False},  # nothing trains the global student
        {"k_schedule": (1,)},
        {"r_normal": 1.5},
        {"selection": "best"},
        {"feature_cache": False},  # CDD always caches; the switch would be silently ignored
    ]
    for overrides in bad:
        with pytest.raises(UserError):
            make_config("cdd", overrides)
    all_off = {s: False for s in ("domain_construction", "confidence_guided", "regularization",
                                  "pseudo_normal", "feature_perturbation",
                                  "confident_distillation")}
    assert not make_config("cdd", {**all_off, "feature_cache": False}).feature_cache  # RD's fit


def test_batch_of_one_on_32px_images_is_one_clear_error():
    m = build_method("cdd", {**TINY, "batch_size": 1}, teacher_weights="random")
    with pytest.raises(UserError, match="batch_size=1 cannot train BatchNorm"):
        m.fit(_train_set())


def test_auto_cache_budgets_for_the_kept_global_features(monkeypatch):
    """On a GPU, 'auto' keeps the cache on the device only if every copy CDD keeps fits."""
    from methods.rd import FeatureCache, feature_bytes

    need = feature_bytes("resnet18", 100, 64, 64)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * need, 8 * need))
    cache = FeatureCache.__new__(FeatureCache)
    cache.device = torch.device("cuda")
    assert cache._choose_storage("auto", "resnet18", 100, 64, 64).type == "cuda"
    assert cache._choose_storage("auto", "resnet18", 100, 64, 64, copies=2).type == "cpu"


def test_presets_cover_every_table_row():
    names = {p.name: p for p in methods.available_presets() if p.method == "cdd"}
    rows = {"t4": 6, "t5": 5, "t6": 3, "a1": 5, "a2": 4}
    for table, count in rows.items():
        assert len([n for n in names if n.startswith(f"cdd-{table}-")]) == count
    assert all(p.description for p in names.values())
    rd = make_config("cdd", names["cdd-t4-rd"].overrides)
    assert not rd.domain_construction and not rd.pseudo_normal
    row2 = make_config("cdd", names["cdd-t4-dc-pn"].overrides)
    assert (row2.domain_construction, row2.pseudo_normal, row2.confidence_guided,
            row2.regularization, row2.k_schedule) == (True, True, False, False, (2,))
    a1 = make_config("cdd", names["cdd-a1-r0.3"].overrides)
    assert a1.r_normal == 0.3 and not a1.regularization and not a1.feature_perturbation
    assert make_config("cdd", names["cdd-t6-next"].overrides).k_schedule == (3,)
    assert make_config("cdd", names["cdd-a2-linear"].overrides).lambda_schedule == "linear"


# --------------------------------------------------------------------------------------------
# Training


def test_all_switches_off_is_rd():
    train = _train_set()
    overrides = {"backbone": "resnet18", "epochs": 3, "batch_size": 8}
    logs = {}
    for name in ("rd", "cdd-t4-rd"):
        m = build_method(name, overrides, teacher_weights="random", seed=3)
        losses = []
        m.fit(train, observer=lambda e, s, p=None, out=losses: out.append(s["loss"]))
        logs[name] = (losses, m.predict(train.images[:2]).scores)
    assert len(logs["rd"][0]) == 3
    assert logs["rd"][0] == logs["cdd-t4-rd"][0]  # identical loss trajectory
    assert np.array_equal(logs["rd"][1], logs["cdd-t4-rd"][1])


def test_batched_students_forward_matches_one_by_one():
    m = build_method("cdd", {"backbone": "resnet18"}, teacher_weights="random")
    m._ds = [build_student("resnet18", seed=s).eval() for s in range(3)]
    m._template = None
    g = torch.Generator().manual_seed(0)
    t_feats = [torch.rand(2, 64, 8, 8, generator=g), torch.rand(2, 128, 4, 4, generator=g),
               torch.rand(2, 256, 2, 2, generator=g)]
    ids = [0, 2]
    stacked = m._stacked_students(ids)
    assert stacked is not None
    batched = m._students_forward(ids, stacked, t_feats)
    looped = m._students_forward(ids, None, t_feats)
    for a, b in zip(batched, looped):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_noise_only_on_global_student_input_during_cross_domain_stage():
    train = _train_set()
    m = build_method("cdd", {**TINY, "batched_students": False}, teacher_weights="random")
    teacher = build_teacher("resnet18", "random")
    with torch.no_grad():
        clean = teacher(train.images)
    stage = {"name": "setup"}
    records = []

    def wrap(method_name):
        inner = getattr(m, method_name)

        def wrapped(*args, **kwargs):
            stage["name"] = method_name
            return inner(*args, **kwargs)

        setattr(m, method_name, wrapped)

    for name in ("_previous_global_pass", "_train_domain_student", "_cross_domain_stage",
                 "_confident_stage"):
        wrap(name)

    def hook(module, args):
        feats = args[0]
        # A row is clean when it equals the teacher features of some training image.
        is_clean = all(
            min(float((f[i] - c).abs().amax()) for c in ref) < 1e-4
            for f, ref in zip(feats, clean) for i in range(f.shape[0])
        )
        records.append((stage["name"], module is m.student, is_clean))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, args: hook(mod, args) if type(mod).__name__ == "RDStudent" else None
    )
    try:
        m.fit(train)
    finally:
        handle.remove()
    cross_global = [r for r in records if r[0] == "_cross_domain_stage" and r[1]]
    assert cross_global and not any(r[2] for r in cross_global)
    others = [r for r in records if not (r[0] == "_cross_domain_stage" and r[1])]
    assert all(r[2] for r in others)
    stages = {r[0] for r in others}
    assert {"_previous_global_pass", "_train_domain_student", "_cross_domain_stage",
            "_confident_stage"} <= stages


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset", sorted(p.name for p in methods.available_presets() if p.method == "cdd")
)
def test_tiny_fit_through_every_preset(preset):
    train = _train_set()
    m = build_method(preset, TINY, teacher_weights="random", seed=0)
    logs = []
    m.fit(train, observer=lambda e, s, p=None: logs.append((e, dict(s), p)))
    assert [e for e, _, _ in logs] == [0, 1]
    for epoch, scalars, per_sample in logs:
        assert math.isfinite(scalars["loss"])
        if not m.config.domain_construction:
            continue
        assert scalars["r"] == r_schedule(epoch, 2, m.config.r_normal)
        n_hc = high_confidence_count(scalars["r"], 8)
        needs_hc = m.config.confidence_guided or m.config.confident_distillation
        assert scalars["n_hc"] == (n_hc if needs_hc else 0)
        assert int(per_sample["in_hc"].sum()) == scalars["n_hc"]
        assert per_sample["confidence"].shape == (8,)
        picked, domain = per_sample["picked"], per_sample["domain"]
        assert not ((picked >= 0) & (picked == domain)).any()  # never the own student
        if m.config.selection == "next":
            own = domain >= 0
            assert (picked[own] == (domain[own] + 1) % int(scalars["K"])).all()
    pred = m.predict(train.images[:3])
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, 32, 32)
    assert np.isfinite(pred.maps).all()
    if preset == "cdd-t4-full":
        clone = build_method("cdd", teacher_weights="random")
        clone.load_state_dict(m.state_dict())
        assert clone.config == m.config
        assert np.allclose(clone.predict(train.images[:3]).scores, pred.scores)


@pytest.mark.parametrize("extra", [{}, {"persist_ds_adam": True, "hc_in_cross": "once"}])
def test_domain_students_start_from_and_are_regularised_towards_the_previous_global(extra):
    """PROTOCOL §5's easy-to-miss points: each epoch every domain-specific student starts as a
    copy of S_glo(e-1); the regulariser's target is S_glo(e-1)'s output on the same images;
    their Adam restarts each epoch unless persist_ds_adam."""
    m = build_method("cdd", {**TINY, "epochs": 3}, teacher_weights="random", seed=0)
    m.config = make_config("cdd", {**TINY, "epochs": 3, "k_schedule": (2,), **extra})
    seen = []
    original = m._train_domain_student

    def spy(student, optimizer, domain, cache, ref, lam):
        glo = m.student
        for (name, p_ds), p_glo in zip(student.named_parameters(), glo.parameters()):
            assert torch.equal(p_ds, p_glo), name  # a fresh copy of S_glo(e-1)
        if ref is not None:
            was_training = glo.training
            glo.eval()
            with torch.no_grad():
                expected = glo(cache.get(torch.arange(len(cache))))
            glo.train(was_training)
            for got, want in zip(ref, expected):
                torch.testing.assert_close(got.to(want.device), want.float(), rtol=1e-4,
                                           atol=1e-5)
        seen.append((optimizer, lam, ref is not None))  # the object: ids get reused
        return original(student, optimizer, domain, cache, ref, lam)

    m._train_domain_student = spy
    logs = []
    m.fit(_train_set(), observer=lambda e, s, p=None: logs.append(s))
    assert len(seen) == 3 * 2 and all(math.isfinite(s["loss"]) for s in logs)
    assert any(has_ref and lam > 0 for _, lam, has_ref in seen)  # the regulariser was on
    optimizers = [opt for opt, _, _ in seen]
    same = [optimizers[d] is optimizers[d + 2] is optimizers[d + 4] for d in range(2)]
    assert same == ([True, True] if extra.get("persist_ds_adam") else [False, False])
