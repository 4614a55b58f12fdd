"""Tests of Cross-Domain Distillation (methods/cdd.py): schedules, domain construction,
selection and perturbation as pure functions; every ablation row's switch set; the reduction to
RD; two instrumented fits checked step by step against the paper's equations (domains, copies of
S_glo(e-1), regulariser, consensus targets, confident distillation, Adam state, K schedule,
logs, work done once per epoch); random streams, reproducibility, BatchNorm recalibration; and
a tiny fit per preset.

Everything runs on CPU with a random-weight ResNet-18 teacher at 32 px.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
    random_streams,
    select_high_confidence,
    stacked_affinity,
)
from methods.rd import FeatureCache, RDStudent, build_student, flat_cosine

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


def test_cdd_diagnostics_edge_groups_and_flag_types():
    per_sample = {
        "confidence": np.array([0.9, 0.8, 0.1, 0.6], dtype=np.float32),
        "in_hc": np.array([1, 0, 0, 1], dtype=np.uint8),
        "picked": np.array([2, 0, 2, -1], dtype=np.int32),
    }
    # One injected image: the AUROC is defined (3 of 3 normals above it), 0/1 flags count as
    # flags (not as indices), and without n_students the largest pick sets the keys.
    out = cdd_diagnostics(per_sample, [0, 0, 1, 0])
    assert out["confidence_auroc"] == 1.0
    assert out["injected_in_hc"] == 0.0 and out["normal_in_hc"] == pytest.approx(2 / 3)
    assert [k for k in out if k.startswith("pick_count_")] == [f"pick_count_{h}" for h in range(3)]
    assert (out["pick_count_0"], out["pick_count_1"], out["pick_count_2"]) == (1.0, 0.0, 2.0)
    assert (out["injected_pick_count_0"], out["injected_pick_count_2"]) == (0.0, 1.0)
    # One normal image: defined too; a group that is empty gives NaN for its share.
    one_normal = cdd_diagnostics(per_sample, [1, 1, 0, 1])
    assert one_normal["confidence_auroc"] == 0.0  # every injected image more confident
    assert math.isnan(cdd_diagnostics(per_sample, [0, 0, 0, 0])["injected_in_hc"])
    all_injected = cdd_diagnostics(per_sample, [1, 1, 1, 1])
    assert math.isnan(all_injected["normal_in_hc"]) and all_injected["injected_in_hc"] == 0.5
    assert math.isnan(all_injected["confidence_auroc"])
    # Ties count one half.
    tied = cdd_diagnostics({**per_sample, "confidence": np.ones(4)}, [0, 1, 0, 0])
    assert tied["confidence_auroc"] == 0.5


# --------------------------------------------------------------------------------------------
# Config and presets


def test_config_defaults_and_validation():
    cfg = CDDConfig()
    assert (cfg.epochs, cfg.r_normal, cfg.sigma_noise, cfg.lambda_p) == (200, 0.5, 0.2, 4.0)
    assert cfg.k_schedule == (2, 3, 3, 2) and cfg.lr == 0.005 and cfg.betas == (0.5, 0.999)
    assert cfg.batch_size == 16 and cfg.selection == "consensual"
    assert not cfg.amp_bf16 and cfg.avoid_recomputation and cfg.bn_stats == "train"
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
        {"bn_stats": "running"},
        {**{s: False for s in ("domain_construction", "confidence_guided", "regularization",
                               "pseudo_normal", "feature_perturbation",
                               "confident_distillation")}, "bn_stats": "clean"},  # RD's fit
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


# Every ablation row's configuration as the paper's tables give it: the fields that differ
# from the final CDD (docs/protocol.md §5 maps Table 4's columns D.C., Conf.G., Reg., P.N., F.P.,
# Conf.D. and its rows in order).
_SW = ("domain_construction", "confidence_guided", "regularization", "pseudo_normal",
       "feature_perturbation", "confident_distillation")


def _only(*on):
    return {s: False for s in _SW if s not in on}


TABLE_ROWS = {
    # Table 4, K = 2.
    "cdd-t4-rd": {**_only(), "k_schedule": (2,)},
    "cdd-t4-dc-pn": {**_only("domain_construction", "pseudo_normal"), "k_schedule": (2,)},
    "cdd-t4-dc-cg-pn": {**_only("domain_construction", "confidence_guided", "pseudo_normal"),
                        "k_schedule": (2,)},
    "cdd-t4-dc-cg-pn-cd": {**_only("domain_construction", "confidence_guided", "pseudo_normal",
                                   "confident_distillation"), "k_schedule": (2,)},
    "cdd-t4-dc-cg-pn-fp-cd": {"regularization": False, "k_schedule": (2,)},
    "cdd-t4-full": {"k_schedule": (2,)},
    # Table 5: full CDD, fixed or dynamic K.
    "cdd-t5-k2": {"k_schedule": (2,)},
    "cdd-t5-k3": {"k_schedule": (3,)},
    "cdd-t5-k4": {"k_schedule": (4,)},
    "cdd-t5-k2332": {},
    "cdd-t5-k23432": {"k_schedule": (2, 3, 4, 3, 2)},
    # Table 6: full CDD at K = 3, three selections.
    "cdd-t6-all": {"k_schedule": (3,), "selection": "all"},
    "cdd-t6-next": {"k_schedule": (3,), "selection": "next"},
    "cdd-t6-consensual": {"k_schedule": (3,)},
    # Table A1 (K = 2): D.C., Conf.G., P.N., Conf.D. only; r_normal varies.
    **{f"cdd-a1-r{r}": {**_only("domain_construction", "confidence_guided", "pseudo_normal",
                                "confident_distillation"), "k_schedule": (2,),
                        **({} if r == 0.5 else {"r_normal": r})}
       for r in (0.0, 0.1, 0.3, 0.5, 0.7)},
    # Table A2 (K = 2, full): lambda(e) variants.
    "cdd-a2-zero": {"k_schedule": (2,), "lambda_schedule": "zero"},
    "cdd-a2-one": {"k_schedule": (2,), "lambda_schedule": "one"},
    "cdd-a2-linear": {"k_schedule": (2,), "lambda_schedule": "linear"},
    "cdd-a2-scurve": {"k_schedule": (2,)},
}


def test_every_table_row_has_the_papers_switch_set():
    variants = {p.name: p for p in methods.available_presets() if p.method == "cdd"}
    assert set(variants) >= set(TABLE_ROWS)
    assert sorted(n for n in variants if n.startswith(("cdd-t", "cdd-a"))) == sorted(TABLE_ROWS)
    default = dataclasses.asdict(CDDConfig())
    for name, expected in TABLE_ROWS.items():
        config = dataclasses.asdict(make_config("cdd", variants[name].overrides))
        differs = {k: v for k, v in config.items() if v != default[k]}
        assert differs == expected, name
        assert variants[name].description


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


# --------------------------------------------------------------------------------------------
# Instrumented fits: Algorithm 1, step by step, against an independent reading of the paper
#
# A fit runs with hooks that record, in order, every read of the teacher cache (the batch's
# sample indices), every student forward (module, mode, grad mode, inputs, outputs) and every
# optimiser step (its loss and Adam state), plus the observer's logs. The checks below
# recompute each loss from the paper's equations with their own code (the networks' states
# come from the trace, the teacher features from a teacher built here), so a one-line change
# to how CDD builds domains, targets, weights or passes turns them red.

TRACE_N, TRACE_BATCH = 8, 4
# Full CDD, K = 2 then 3: epoch 0 (r 0, lambda 0, K 2), 1 (r 1/3, lambda 1/17, K 3),
# 2 (r 1/2, lambda 16/17, K 3); consensus among two candidates with stored D^HC outputs.
TRACE_FULL = {"epochs": 3, "k_schedule": (2, 3, 3)}
# "All" selection at K = 3 without Conf.G., Reg. or F.P., each student's Adam kept.
TRACE_ALL = {"epochs": 2, "k_schedule": (3,), "selection": "all", "confidence_guided": False,
             "regularization": False, "feature_perturbation": False, "persist_ds_adam": True}


def _cos_loss(targets, outs) -> torch.Tensor:
    """Eq. 20 / RD's loss, written out: mean over samples of sum_l (1 - cos(flat t, flat s))."""
    return sum(1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)
               for t, s in zip(targets, outs)).mean()


def _flat_affinity(a, b) -> torch.Tensor:
    """Eq. 17, written out: per sample sum_l cos(flat a_l, flat b_l)."""
    return sum(F.cosine_similarity(x.flatten(1), y.flatten(1), dim=1) for x, y in zip(a, b))


def _position_confidence(t_feats, s_feats) -> torch.Tensor:
    """Eq. 12, written out: per sample sum_l mean over positions of the channel cosine."""
    return sum(F.cosine_similarity(t, s, dim=1).flatten(1).mean(1)
               for t, s in zip(t_feats, s_feats))


def _n_batches(size: int, batch: int, tiny: bool = True) -> int:
    """Batches of one shuffled pass over ``size`` samples (last kept; at 32 px a last batch of
    one joins the previous one, or is dropped when it is alone)."""
    count = math.ceil(size / batch)
    return count - 1 if tiny and size % batch == 1 else count


class FitTrace:
    """One instrumented CDD fit on ``TRACE_N`` images at 32 px, in recorded order."""

    def __init__(self, overrides, seed=0):
        self.train = _train_set(TRACE_N)
        cfg = {**TINY, "max_steps_per_stage": None, "batch_size": TRACE_BATCH,
               "batched_students": False, **overrides}
        self.method = m = build_method("cdd", cfg, teacher_weights="random", seed=seed)
        self.config = m.config
        self.events: list[tuple] = []
        self._started: set[int] = set()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(FeatureCache, "get", self._recording_get(FeatureCache.get))
            patch.setattr(m, "_step", self._recording_step(m._step))
            hooks = [
                torch.nn.modules.module.register_module_forward_pre_hook(self._before_forward),
                torch.nn.modules.module.register_module_forward_hook(self._after_forward),
            ]
            try:
                m.fit(self.train, observer=self._observe)
            finally:
                for hook in hooks:
                    hook.remove()
        self.glo = m.student
        with torch.no_grad():
            self.teacher = build_teacher("resnet18", "random")(self.train.images)
        self._outputs_cache: dict[int, list[torch.Tensor]] = {}
        self._probe = copy.deepcopy(self.glo)  # loads each recorded state in turn
        self.epochs = self._split_epochs()

    # -- recording -----------------------------------------------------------------------

    def _recording_get(self, original):
        def get(cache, index):
            self.events.append(("get", index.detach().cpu().clone()))
            return original(cache, index)
        return get

    def _recording_step(self, original):
        def step(optimizer, loss):
            first = optimizer.param_groups[0]["params"][0]
            count = optimizer.state.get(first, {}).get("step", 0)
            group = optimizer.param_groups[0]
            self.events.append(("step", optimizer, float(loss.detach()), int(count),
                                group["lr"], tuple(group["betas"])))
            original(optimizer, loss)
        return step

    def _before_forward(self, module, args):
        if isinstance(module, RDStudent) and id(module) not in self._started:
            # A network's state when it first runs in an epoch, BatchNorm buffers included.
            self._started.add(id(module))
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.events.append(("start", module, state))

    def _after_forward(self, module, args, output):
        if isinstance(module, RDStudent):
            self.events.append((
                "forward", module, module.training, torch.is_grad_enabled(),
                [a.detach().clone() for a in args[0]], [o.detach().clone() for o in output],
                any(o.requires_grad for o in output),
            ))

    def _observe(self, epoch, scalars, per_sample=None):
        trained = []
        for event in self.events[self._mark():]:
            if event[0] == "forward" and event[2] and event[1] is not self.method.student:
                if all(event[1] is not t for t in trained):
                    trained.append(event[1])
        states = [{k: v.detach().clone() for k, v in mod.state_dict().items()} for mod in trained]
        self.events.append(("epoch", epoch, dict(scalars),
                            {k: np.array(v) for k, v in per_sample.items()}, trained, states))
        self._started.clear()

    def _mark(self) -> int:
        ends = [i for i, e in enumerate(self.events) if e[0] == "epoch"]
        return ends[-1] + 1 if ends else 0

    # -- reading the trace ---------------------------------------------------------------

    def _split_epochs(self) -> list[dict]:
        epochs, start = [], 0
        for i, event in enumerate(self.events):
            if event[0] != "epoch":
                continue
            _, epoch, scalars, per_sample, trained, states = event
            body = self.events[start:i]
            start = i + 1
            steps, last_get, forwards = [], None, []
            for ev in body:
                if ev[0] == "get":
                    last_get, forwards = ev[1], []
                elif ev[0] == "forward":
                    forwards.append(ev)
                elif ev[0] == "step":
                    steps.append({"optimizer": ev[1], "loss": ev[2], "adam_step": ev[3],
                                  "lr": ev[4], "betas": ev[5], "index": last_get,
                                  "forwards": list(forwards)})
            glo_first = next(ev for ev in body if ev[0] == "start" and ev[1] is self.method.student)
            epochs.append({
                "epoch": epoch, "scalars": scalars, "per_sample": per_sample,
                "trained": trained, "ds_states": states, "events": body,
                "prev_state": glo_first[2],
                "ds_starts": [ev for ev in body if ev[0] == "start" and ev[1] is not self.glo],
                "ds_steps": [s for s in steps if not self._is_global(s["optimizer"])],
                "glo_steps": [s for s in steps if self._is_global(s["optimizer"])],
            })
        return epochs

    def _is_global(self, optimizer) -> bool:
        return optimizer.param_groups[0]["params"][0] is next(self.method.student.parameters())

    def outputs(self, state) -> list[torch.Tensor]:
        """Eval-mode outputs on every training image of a student in ``state``."""
        key = id(state)
        if key not in self._outputs_cache:
            self._probe.load_state_dict(state)
            with torch.no_grad():
                self._outputs_cache[key] = self._probe.eval()(self.teacher)
        return self._outputs_cache[key]

    def rows(self, feats, index) -> list[torch.Tensor]:
        return [f[index] for f in feats]

    def hc(self, ep) -> np.ndarray:
        return np.flatnonzero(ep["per_sample"]["in_hc"])

    def lc(self, ep, d) -> np.ndarray:
        return np.flatnonzero(ep["per_sample"]["domain"] == d)

    def domain(self, ep, d) -> np.ndarray:
        """D_d = D^HC u D_d^LC under Conf.G., D_d^LC alone without it (Eq. 14)."""
        lc = self.lc(ep, d)
        return np.union1d(self.hc(ep), lc) if self.config.confidence_guided else lc

    def ds_passes(self, ep) -> list[list[dict]]:
        """The domain-specific steps of an epoch grouped by student, in training order."""
        passes = {id(mod): [] for mod in ep["trained"]}
        for s in ep["ds_steps"]:
            trained = [f[1] for f in s["forwards"] if f[2]]
            assert len(trained) == 1, "one train-mode forward per domain-specific step"
            passes[id(trained[0])].append(s)
        return [passes[id(mod)] for mod in ep["trained"]]

    def cross_and_confident(self, ep):
        """The global steps split into the cross-domain passes (one list per domain, in
        domain order) and the confident pass, by the batch counts each pass must have."""
        k = int(ep["scalars"]["K"])
        steps = list(ep["glo_steps"])
        passes = []
        for d in range(k):
            count = _n_batches(self.domain(ep, d).size, TRACE_BATCH)
            passes.append(steps[:count])
            steps = steps[count:]
        return passes, steps


def _same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trace_full():
    return FitTrace(TRACE_FULL)


@pytest.fixture(scope="module")
def trace_all():
    return FitTrace(TRACE_ALL)


def test_domain_students_start_as_full_copies_of_the_previous_global(trace_full, trace_all):
    for trace in (trace_full, trace_all):
        for ep in trace.epochs:
            k = int(ep["scalars"]["K"])
            assert len(ep["trained"]) == k == len(ep["ds_starts"])
            # S_glo(e-1) is the global student as the epoch finds it (= as the last one left it).
            for _, _module, state in ep["ds_starts"]:
                assert _same_state(state, ep["prev_state"])  # weights and BatchNorm buffers
                assert any("running_var" in key for key in state)
    initial = build_student("resnet18", seed=random_streams(0).init_seed).state_dict()
    assert _same_state(trace_full.epochs[0]["prev_state"], initial)  # the init stream


def test_each_domain_is_the_hc_set_plus_its_own_lc_part(trace_full, trace_all):
    for trace in (trace_full, trace_all):
        for ep in trace.epochs:
            k = int(ep["scalars"]["K"])
            per_sample = ep["per_sample"]
            hc = trace.hc(ep)
            lc = [trace.lc(ep, d) for d in range(k)]
            sizes = [part.size for part in lc]
            assert max(sizes) - min(sizes) <= 1  # an even split ...
            rest = np.setdiff1d(np.arange(TRACE_N), hc) if trace.config.confidence_guided \
                else np.arange(TRACE_N)
            assert np.array_equal(np.sort(np.concatenate(lc)), rest)  # ... of the rest
            if not trace.config.confidence_guided:
                assert (per_sample["domain"] >= 0).all()
            for d, steps in enumerate(trace.ds_passes(ep)):
                seen = np.sort(np.concatenate([s["index"].numpy() for s in steps]))
                assert np.array_equal(seen, trace.domain(ep, d))  # each sample once
                assert len(steps) == _n_batches(trace.domain(ep, d).size, TRACE_BATCH)
                assert ep["scalars"][f"domain_size_{d}"] == trace.domain(ep, d).size
    # With K = 3 and D^HC present, each domain holds D^HC and one third of the rest.
    last = trace_full.epochs[-1]
    assert trace_full.hc(last).size == 4 and int(last["scalars"]["K"]) == 3


def test_hc_set_is_the_most_confident_fraction_under_the_previous_global(trace_full, trace_all):
    for trace in (trace_full, trace_all):
        for ep in trace.epochs:
            e, cfg = ep["epoch"], trace.config
            r = min(e / cfg.epochs, cfg.r_normal)
            assert ep["scalars"]["r"] == pytest.approx(r)
            count = int(math.floor(r * TRACE_N + 1e-9))
            confidence = ep["per_sample"]["confidence"]
            if count == 0 and np.isnan(confidence).all():
                continue  # nothing reads S_glo(e-1) this epoch: the pass was skipped
            expected = _position_confidence(trace.teacher, trace.outputs(ep["prev_state"]))
            np.testing.assert_allclose(confidence, expected.numpy(), rtol=1e-5, atol=1e-5)
            assert np.ptp(confidence) > 1e-4  # one score per sample, not a batch value
            top = np.sort(np.argsort(-confidence, kind="stable")[:count])
            assert np.array_equal(trace.hc(ep), top)
            assert ep["scalars"]["n_hc"] == count
    skipped = [np.isnan(ep["per_sample"]["confidence"]).all() for ep in trace_full.epochs]
    assert skipped == [True, False, False]  # epoch 0: D^HC empty, lambda 0, K 2


def test_low_confidence_split_is_redrawn_every_epoch(trace_all):
    first, second = (ep["per_sample"]["domain"] for ep in trace_all.epochs)
    assert (first >= 0).all() and (second >= 0).all()  # no HC set: the same samples ...
    assert not np.array_equal(first, second)  # ... split anew
    a, b = (random_streams(0).domain_rng(e).permutation(40) for e in (0, 1))
    assert not np.array_equal(a, b)


def test_regulariser_targets_the_previous_global_weighted_by_lambda(trace_full):
    lambdas = []
    for ep in trace_full.epochs:
        lam = lambda_schedule(ep["epoch"], 3, "s_curve", 4.0)
        assert ep["scalars"]["lambda"] == pytest.approx(lam)  # the weight applied, logged
        lambdas.append(lam)
        previous = trace_full.outputs(ep["prev_state"])  # S_glo(e-1), eval mode
        for steps in trace_full.ds_passes(ep):
            for s in steps:
                (fwd,) = [f for f in s["forwards"] if f[2]]
                _, _, training, grad, inputs, outs, _ = fwd
                assert training and grad
                t = trace_full.rows(trace_full.teacher, s["index"])
                for x, y in zip(inputs, t):
                    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)  # clean input
                expected = _cos_loss(t, outs) + lam * _cos_loss(
                    trace_full.rows(previous, s["index"]), outs)
                assert s["loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert lambdas == pytest.approx([0.0, 1 / 17, 16 / 17])


def test_no_regulariser_and_lambda_zero_logged_without_reg(trace_all):
    for ep in trace_all.epochs:
        assert ep["scalars"]["lambda"] == 0.0 and ep["scalars"]["loss_ds_reg"] == 0.0
        for steps in trace_all.ds_passes(ep):
            for s in steps:
                (fwd,) = [f for f in s["forwards"] if f[2]]
                t = trace_all.rows(trace_all.teacher, s["index"])
                assert s["loss"] == pytest.approx(float(_cos_loss(t, fwd[5])), rel=1e-5)
    assert lambda_schedule(1, 2, "s_curve", 4.0) == 0.5  # what the schedule alone would say


def _check_cross_pass(trace, ep, d, steps, select):
    """The steps of domain d's cross-domain pass: targets from eval-mode students not trained
    on D_d, chosen by ``select``; the global student's input perturbed iff F.P."""
    k = int(ep["scalars"]["K"])
    ds_outputs = [trace.outputs(state) for state in ep["ds_states"]]
    own = ep["trained"][d]
    seen, picks = [], {}
    for s in steps:
        index = s["index"]
        seen.append(index.numpy())
        t = trace.rows(trace.teacher, index)
        targets_fwd = [f for f in s["forwards"] if f[1] is not trace.glo]
        (glo_fwd,) = [f for f in s["forwards"] if f[1] is trace.glo]
        for _, module, training, grad, inputs, _, requires_grad in targets_fwd:
            assert not training and not grad and not requires_grad  # fixed targets
            assert module is not own  # never the student trained on the sample's domain
            for x in inputs:  # clean rows of this batch
                rows = [f for f in trace.teacher if f.shape[1:] == x.shape[1:]][0][index]
                dist = (x[:, None] - rows[None]).flatten(2).abs().amax(2).amin(1)
                assert float(dist.max()) < 1e-5
        _, _, training, grad, inputs, outs, _ = glo_fwd
        assert training and grad
        noise = torch.cat([(x - y).flatten() for x, y in zip(inputs, t)])
        if trace.config.feature_perturbation:
            assert abs(float(noise.std()) - trace.config.sigma_noise) < 0.1 * 0.2
            assert abs(float(noise.mean())) < 0.01
        else:
            assert float(noise.abs().max()) < 1e-5
        others = [h for h in range(k) if h != d]
        expected, chosen = select(trace, ep, d, others, ds_outputs, index, outs)
        assert s["loss"] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
        for i, h in zip(index.tolist(), chosen):
            picks[i] = h
    return np.sort(np.concatenate(seen)) if seen else np.zeros(0, int), picks


def _select_consensual(trace, ep, d, others, ds_outputs, index, outs):
    previous = trace.rows(trace.outputs(ep["prev_state"]), index)
    aff = torch.stack([_flat_affinity(trace.rows(ds_outputs[h], index), previous)
                       for h in others], 1)  # (B, K-1), Eq. 17 against S_glo(e-1)
    best = aff.argmax(1)
    if len(others) > 1:
        top2 = aff.topk(2, dim=1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-4  # no near tie in this trace
    chosen = [others[int(b)] for b in best]  # Eq. 18
    targets = [torch.stack([ds_outputs[h][layer][i] for h, i in zip(chosen, index.tolist())])
               for layer in range(3)]
    return _cos_loss(targets, outs), chosen


def _select_all(trace, ep, d, others, ds_outputs, index, outs):
    losses = [_cos_loss(trace.rows(ds_outputs[h], index), outs) for h in others]
    mean_target = [torch.stack([trace.rows(ds_outputs[h], index)[layer] for h in others]).mean(0)
                   for layer in range(3)]
    expected = torch.stack(losses).mean()
    assert abs(float(expected - _cos_loss(mean_target, outs))) > 1e-5  # the two readings differ
    return expected, [-1] * index.numel()


def test_cross_domain_targets_consensus_over_other_eval_students(trace_full):
    for ep in trace_full.epochs:
        k = int(ep["scalars"]["K"])
        passes, _ = trace_full.cross_and_confident(ep)
        counts = np.zeros(k, dtype=int)
        for d, steps in enumerate(passes):
            seen, picks = _check_cross_pass(trace_full, ep, d, steps, _select_consensual)
            assert np.array_equal(seen, trace_full.domain(ep, d))  # all of D_d, once
            for h in picks.values():
                counts[h] += 1
            for i in trace_full.lc(ep, d):
                assert ep["per_sample"]["picked"][i] == picks[i]
        hc = trace_full.hc(ep)
        assert (ep["per_sample"]["picked"][hc] == -1).all()  # visited K times: no single pick
        for h in range(3):
            assert ep["scalars"][f"visit_pick_count_{h}"] == (counts[h] if h < k else 0)
    assert trace_full.hc(trace_full.epochs[-1]).size > 0  # HC rows came from the store


def test_selection_all_averages_the_per_student_losses(trace_all):
    for ep in trace_all.epochs:
        passes, _ = trace_all.cross_and_confident(ep)
        for d, steps in enumerate(passes):
            seen, _ = _check_cross_pass(trace_all, ep, d, steps, _select_all)
            assert np.array_equal(seen, trace_all.domain(ep, d))
        assert (ep["per_sample"]["picked"] == -1).all()


def test_confident_distillation_visits_hc_only_with_teacher_targets(trace_full, trace_all):
    for trace in (trace_full, trace_all):
        for ep in trace.epochs:
            _, confident = trace.cross_and_confident(ep)
            hc = trace.hc(ep)
            assert len(confident) == _n_batches(hc.size, TRACE_BATCH)
            if not confident:
                continue
            seen = np.sort(np.concatenate([s["index"].numpy() for s in confident]))
            assert np.array_equal(seen, hc)  # D^HC, each sample once
            for s in confident:
                (fwd,) = s["forwards"]
                _, module, training, _, inputs, outs, _ = fwd
                assert module is trace.glo and training
                t = trace.rows(trace.teacher, s["index"])
                for x, y in zip(inputs, t):
                    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)  # no noise
                assert s["loss"] == pytest.approx(float(_cos_loss(t, outs)), rel=1e-5)
    assert any(trace_full.cross_and_confident(ep)[1] for ep in trace_full.epochs)


def test_global_adam_persists_and_domain_adam_restarts(trace_full, trace_all):
    for trace in (trace_full, trace_all):
        cfg = trace.config
        glo_steps = [s for ep in trace.epochs for s in ep["glo_steps"]]
        assert len({id(s["optimizer"]) for s in glo_steps}) == 1  # one Adam for S_glo
        assert [s["adam_step"] for s in glo_steps] == list(range(len(glo_steps)))
        assert all(s["lr"] == cfg.lr and s["betas"] == cfg.betas for s in glo_steps)
        params = glo_steps[-1]["optimizer"].param_groups[0]["params"]
        assert len(params) == len(list(trace.glo.parameters()))
        assert all(a is b for a, b in zip(params, trace.glo.parameters()))
        done = np.cumsum([len(ep["glo_steps"]) for ep in trace.epochs]).tolist()
        assert [ep["scalars"]["steps"] for ep in trace.epochs] == done
        optimizers, counts = {}, {}
        for ep in trace.epochs:
            for d, steps in enumerate(trace.ds_passes(ep)):
                ids = {id(s["optimizer"]) for s in steps}
                assert len(ids) == 1
                assert all(s["lr"] == cfg.lr and s["betas"] == cfg.betas for s in steps)
                before = counts.get(d, 0) if cfg.persist_ds_adam else 0
                assert [s["adam_step"] for s in steps] == list(range(before, before + len(steps)))
                counts[d] = before + len(steps)
                if d in optimizers:
                    assert (optimizers[d] in ids) == cfg.persist_ds_adam
                optimizers[d] = ids.pop()


def test_k_schedule_is_read_at_each_epoch(trace_full, trace_all):
    assert [ep["scalars"]["K"] for ep in trace_full.epochs] == [2.0, 3.0, 3.0]
    assert [len(ep["trained"]) for ep in trace_full.epochs] == [2, 3, 3]
    assert [ep["scalars"]["K"] for ep in trace_all.epochs] == [3.0, 3.0]


def test_same_seed_gives_identical_runs_and_another_seed_differs():
    train = _train_set()
    cfg = {**TINY, "k_schedule": (3,), "batched_students": False}
    runs = []
    for seed in (0, 0, 1):
        m = build_method("cdd", cfg, teacher_weights="random", seed=seed)
        logs = []
        m.fit(train, observer=lambda e, s, p=None, out=logs: out.append((s, p)))
        runs.append((logs, m.predict(train.images[:3]).maps))
    (logs_a, maps_a), (logs_b, maps_b), (logs_c, maps_c) = runs
    assert np.array_equal(maps_a, maps_b)
    for (s_a, p_a), (s_b, p_b) in zip(logs_a, logs_b):
        np.testing.assert_array_equal(np.array(list(s_a.values())), np.array(list(s_b.values())))
        for key in p_a:
            np.testing.assert_array_equal(p_a[key], p_b[key])
    assert not np.allclose(maps_a, maps_c)
    assert any(not np.array_equal(p_a["domain"], p_c["domain"])
               for (_, p_a), (_, p_c) in zip(logs_a, logs_c))


def test_random_streams_are_reproducible_and_independent():
    a, b = random_streams(0), random_streams(0)
    assert a.init_seed == b.init_seed
    assert torch.equal(torch.randperm(50, generator=a.order), torch.randperm(50, generator=b.order))
    draws = {}
    for seed in (0, 1, 2):
        s = random_streams(seed)
        draws[seed, "init"] = torch.randn(256, generator=torch.Generator().manual_seed(s.init_seed))
        draws[seed, "order"] = torch.randn(256, generator=s.order)
        draws[seed, "noise"] = torch.randn(256, generator=s.noise)
        for e in (0, 1):
            draws[seed, f"domains{e}"] = torch.as_tensor(s.domain_rng(e).standard_normal(256))
    names = list(draws)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            corr = float(torch.corrcoef(torch.stack([draws[x], draws[y].float()]))[0, 1])
            assert abs(corr) < 0.3, (x, y)  # seeded alike, these would coincide (corr 1)


def test_clean_bn_stats_are_the_statistics_of_clean_features():
    train = _train_set()
    cfg = {**TINY, "epochs": 1, "k_schedule": (2,)}
    fitted = {}
    for mode in ("train", "clean"):
        m = build_method("cdd", {**cfg, "bn_stats": mode}, teacher_weights="random", seed=0)
        m.fit(train)
        fitted[mode] = m.student
    # The same weights (recalibration touches statistics only) ...
    weights = {k: v for k, v in fitted["clean"].state_dict().items() if "running" not in k
               and "num_batches" not in k}
    for key, value in weights.items():
        assert torch.equal(value, fitted["train"].state_dict()[key]), key
    # ... and the statistics of one train-mode pass over the clean features, averaged.
    probe = copy.deepcopy(fitted["clean"])
    for module in probe.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        probe.train()(build_teacher("resnet18", "random")(train.images))
    clean, trained = fitted["clean"].state_dict(), fitted["train"].state_dict()
    means = [k for k in clean if k.endswith("running_mean")]
    for key in means + [k.replace("mean", "var") for k in means]:
        torch.testing.assert_close(clean[key], probe.state_dict()[key], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(clean[k], trained[k], atol=1e-3) for k in means)
    momenta = {m.momentum for m in fitted["clean"].modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}


def _row_ids(trace, x) -> list[int]:
    """The training image each row of a layer-1 feature batch is the clean feature of."""
    dist = (x[:, None] - trace.teacher[0][None]).flatten(2).abs().amax(2)  # (B, N)
    best = dist.min(1)
    assert float(best.values.max()) < 1e-5, "every input row is a clean training feature"
    return best.indices.tolist()


def test_students_outputs_on_hc_are_computed_once_per_epoch(trace_full):
    for ep in trace_full.epochs:
        k, hc = int(ep["scalars"]["K"]), set(trace_full.hc(ep).tolist())
        for h, module in enumerate(ep["trained"]):
            rows = [i for f in ep["events"] if f[0] == "forward" and f[1] is module and not f[2]
                    for i in _row_ids(trace_full, f[4][0])]
            # Every HC sample once (not once per visit: K-1 times), and every LC sample of
            # another domain once, as a candidate target.
            assert sorted(i for i in rows if i in hc) == sorted(hc)
            others = [i for d in range(k) if d != h for i in trace_full.lc(ep, d).tolist()]
            assert sorted(i for i in rows if i not in hc) == sorted(others)
    assert trace_full.hc(trace_full.epochs[2]).size == 4


def test_epoch_log_matches_the_steps(trace_full, trace_all):
    def mean(values):
        return float(np.mean(values)) if values else math.nan

    for trace in (trace_full, trace_all):
        for ep in trace.epochs:
            s = ep["scalars"]
            lam = s["lambda"]
            previous = trace.outputs(ep["prev_state"])
            teacher_terms, reg_terms = [], []
            for steps in trace.ds_passes(ep):
                for step in steps:
                    (fwd,) = [f for f in step["forwards"] if f[2]]
                    t = trace.rows(trace.teacher, step["index"])
                    teacher_terms.append(float(_cos_loss(t, fwd[5])))
                    reg_terms.append(float(_cos_loss(trace.rows(previous, step["index"]), fwd[5]))
                                     if lam > 0 else 0.0)
            assert s["loss_ds_teacher"] == pytest.approx(mean(teacher_terms), rel=1e-5)
            assert s["loss_ds_reg"] == pytest.approx(mean(reg_terms), rel=1e-5, abs=1e-7)
            cross, confident = trace.cross_and_confident(ep)
            cross_losses = [step["loss"] for steps in cross for step in steps]
            hc_losses = [step["loss"] for step in confident]
            assert s["loss_cross"] == pytest.approx(mean(cross_losses), rel=1e-5)
            assert s["loss_hc"] == pytest.approx(mean(hc_losses), rel=1e-5, nan_ok=True)
            assert s["loss"] == pytest.approx(mean(cross_losses + hc_losses), rel=1e-5)
            assert s["n_hc"] == trace.hc(ep).size and s["r"] == pytest.approx(
                min(ep["epoch"] / trace.config.epochs, trace.config.r_normal))


def test_max_steps_caps_the_global_student_steps_inside_an_epoch():
    cfg = {**TINY, "epochs": 3, "batch_size": 2, "k_schedule": (2,), "max_steps_per_stage": 2,
           "max_steps": 3, "batched_students": False}
    m = build_method("cdd", cfg, teacher_weights="random")
    logs = []
    m.fit(_train_set(), observer=lambda e, s, p=None: logs.append(s))
    # Epoch 0: domain 0 gets its 2 steps, domain 1 the 1 left; then training stops.
    assert [s["steps"] for s in logs] == [3.0]
    assert math.isnan(logs[0]["loss_hc"]) and math.isfinite(logs[0]["loss_cross"])


def test_too_few_images_is_one_clear_error():
    m = build_method("cdd", TINY, teacher_weights="random")
    with pytest.raises(UserError, match="at least 2 training images"):
        m.fit(_train_set(n=1, n_anomalous=0))


@pytest.mark.parametrize("reuse", [True, False])
def test_previous_global_features_reuse_one_buffer(reuse):
    m = build_method("cdd", {**TINY, "avoid_recomputation": reuse}, teacher_weights="random")
    train = _train_set(n=3)
    cache = FeatureCache(build_teacher("resnet18", "random"), train.images, "cpu")
    glo = build_student("resnet18", seed=0)
    m._ref = None
    conf_a, first = m._previous_global_pass(glo, cache, keep=True)
    conf_b, second = m._previous_global_pass(glo, cache, keep=True)
    assert glo.training  # handed back in train mode, unchanged
    assert torch.equal(conf_a, conf_b) and all(torch.equal(a, b) for a, b in zip(first, second))
    assert all((a is b) == reuse for a, b in zip(first, second))
    assert m._previous_global_pass(glo, cache, keep=False)[1] is None


def test_max_steps_caps_the_confident_stage_too():
    cfg = {**TINY, "epochs": 3, "batch_size": 2, "k_schedule": (2,), "max_steps_per_stage": None}
    free, capped = [], []
    build_method("cdd", cfg, teacher_weights="random").fit(
        _train_set(), observer=lambda e, s, p=None: free.append(s))
    # The last epoch's confident distillation takes two or more steps; one step fewer in all
    # must come off that stage.
    assert free[-1]["n_hc"] >= 2 * cfg["batch_size"]
    total = int(free[-1]["steps"])
    build_method("cdd", {**cfg, "max_steps": total - 1}, teacher_weights="random").fit(
        _train_set(), observer=lambda e, s, p=None: capped.append(s))
    assert [s["steps"] for s in capped] == [s["steps"] for s in free[:-1]] + [total - 1]
    assert capped[-1]["loss_cross"] == pytest.approx(free[-1]["loss_cross"], rel=1e-6)


def test_every_adam_takes_the_configs_lr_and_betas():
    m = build_method("cdd", {**TINY, "lr": 0.0123, "betas": (0.4, 0.98)},
                     teacher_weights="random")
    group = m._adam(build_student("resnet18", seed=0)).param_groups[0]
    assert group["lr"] == 0.0123 and tuple(group["betas"]) == (0.4, 0.98)


def test_a_size_error_names_cdd():
    with pytest.raises(UserError, match=r"^cdd: image size 48x48"):
        build_method("cdd", TINY, teacher_weights="random").fit(_train_set(n=4, size=48))
