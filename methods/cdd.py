"""Cross-Domain Distillation (CDD) for fully unsupervised anomaly detection.

Reference: "Fence off Anomaly Interference: Cross-Domain Distillation for Fully Unsupervised
Anomaly Detection", §4 and Algorithm 1 (appendix C). No public code
exists; this module is written to be read beside the paper, with equation numbers in comments.

One epoch e of CDD (Algorithm 1), with S_glo the global student and S_glo(e-1) its state at the
start of the epoch:

1. Features of S_glo(e-1) on every training image, computed once (eval mode, no grad) and kept
   beside the teacher's :class:`~methods.rd.FeatureCache`; they give the confidence Conf_i
   (Eq. 12), the regularisation targets (Eq. 15) and the affinity reference (Eq. 17). In an
   epoch where none of these is used (D^HC empty, no regulariser weight, at most two students)
   the pass is skipped.
2. Confidence-guided domain construction: the top r(e) = min(e/E, r_normal) (Eq. 13) form the
   high-confidence set D^HC; the rest is split randomly and evenly into K disjoint parts
   D_k^LC, and D_k = D^HC u D_k^LC (Eq. 14).
3. Domain-specific distillation: K students start as copies of S_glo(e-1) and are trained on
   their domain with teacher guidance + lambda(e) x regularisation by S_glo(e-1)
   (Eqs. 15-16).
4. Cross-domain pseudo-normal distillation: for a sample of D_k the target is the output of one
   student not trained on D_k, chosen by consensus (Eqs. 17-18), and S_glo sees the teacher
   features plus Gaussian noise (Eq. 19), loss Eq. 20. With K >= 3 every student's output on
   D^HC (visited by all K domains) is computed once for the epoch and read at each visit.
5. Confident distillation: S_glo is trained on D^HC with teacher targets (Eq. 21).

Every ablation of the paper is a config switch (:class:`CDDConfig`) and every table row a preset
(``cdd-t4-*``, ``cdd-t5-*``, ``cdd-t6-*``, ``cdd-a1-*``, ``cdd-a2-*``). With every switch off,
CDD is RD: :meth:`CrossDomainDistillation.fit` then runs RD's own training loop.

Choices where the paper is silent (docs/protocol.md §5 "open"), also in ``docs/cdd.md``:

- Passes: one pass per domain per epoch for each domain-specific student, one pass per domain
  for the cross-domain stage (Algorithm 1 lines 18-26), one pass over D^HC for confident
  distillation; batches of ``batch_size`` drawn from one domain at a time, reshuffled every
  pass, the last batch kept even if smaller (as RD's DataLoader).
- An HC sample is in every domain. ``hc_in_cross="per_domain"`` (default) follows Eq. 20 and
  Algorithm 1 literally: it is visited once per domain, each time as a member of that domain
  (the domain's own student is excluded). ``"once"`` assigns each HC sample to one domain
  (random, even split) and visits it once.
- Dynamic K: the schedule splits training into equal consecutive stages, epoch e uses
  ``k_schedule[e * len // E]``; {2,3,3,2} over 200 epochs = 50 epochs each.
- Adam: one optimiser per student. The global student's Adam state persists across epochs (it
  is the continuing model, as in RD). Domain-specific students restart every epoch from
  S_glo(e-1), so by default their Adam starts fresh each epoch (old moments belong to another
  trajectory); ``persist_ds_adam=True`` keeps each slot's state instead.
- Networks used as fixed targets (S_glo(e-1), the domain-specific students during the
  cross-domain stage) run in eval mode (BatchNorm running statistics), as at inference; the
  student being trained runs in train mode, as in RD.
- Selection "all" averages the cosine loss over the K-1 other students' outputs (each is a
  target); "next" takes student (k+1) mod K for a sample of domain k.
- Without Conf.G. the domains are an even split of all samples (no HC set inside them); D^HC is
  still computed when Conf.D. needs it.
- The switches must describe a trainable model: without D.C. all other switches are off (RD),
  F.P. needs P.N., and with D.C. the global student needs P.N. or Conf.D.
- Randomness: four independent streams spawned from the seed (:func:`random_streams`).
- The global student's BatchNorm statistics are those training leaves (class docstring);
  ``bn_stats="clean"`` recomputes them on clean features after every epoch instead.
- The log's ``lambda`` is the regularisation weight applied (0 without Reg.).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from bench.errors import UserError
from methods.base import EpochObserver, TrainSet, register_method, register_variant
from methods.rd import (
    FeatureCache,
    RDConfig,
    RDStudent,
    ReverseDistillation,
    check_image_size,
    rd_loss,
)

SELECTIONS = ("consensual", "all", "next")
LAMBDA_SCHEDULES = ("s_curve", "linear", "zero", "one")
HC_IN_CROSS = ("per_domain", "once")
BN_STATS = ("train", "clean")
# The switches of Table 4, in the paper's column order.
SWITCHES = (
    "domain_construction",
    "confidence_guided",
    "regularization",
    "pseudo_normal",
    "feature_perturbation",
    "confident_distillation",
)


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class CDDConfig(RDConfig):
    """CDD settings; defaults are the paper's final CDD. RD's fields (backbone, epochs=200,
    batch_size=16, lr=0.005, betas=(0.5, 0.999), max_steps, speed switches) are inherited with
    their sources; ``lr`` and ``betas`` apply to every student's own Adam (paper §5.1)."""

    # D.C.: train K domain-specific students and aggregate them (paper §4.1, Table 4).
    domain_construction: bool = True
    # Conf.G.: put the high-confidence set into every domain (Eqs. 12-14, Table 4).
    confidence_guided: bool = True
    # Reg.: regularise domain-specific students by the previous global student (Eq. 15).
    regularization: bool = True
    # P.N.: cross-domain pseudo-normal distillation of the global student (Eqs. 17-20).
    pseudo_normal: bool = True
    # F.P.: Gaussian noise on the global student's input during cross-domain distillation (Eq. 19).
    feature_perturbation: bool = True
    # Conf.D.: confident distillation of the global student on D^HC (Eq. 21).
    confident_distillation: bool = True
    # K per equal stage of training: paper §5.3 "K varying as {2,3,3,2}" (Table 5); one value
    # = fixed K.
    k_schedule: tuple[int, ...] = (2, 3, 3, 2)
    # Pseudo-normal selection: "consensual" (Eqs. 17-18), "all" or "next" (Table 6).
    selection: Literal["consensual", "all", "next"] = "consensual"
    # Cap of the high-confidence ratio: Eq. 13 / Algorithm 1 line 3 "r_normal = 0.5".
    r_normal: float = 0.5
    # Regularisation weight lambda(e): "s_curve" (Eq. 16), "linear" e/E, "zero", "one" (Table A2).
    lambda_schedule: Literal["s_curve", "linear", "zero", "one"] = "s_curve"
    # S-curve sharpness: Eq. 16 / Algorithm 1 line 3 "p = 4.0".
    lambda_p: float = 4.0
    # Feature perturbation std: Eq. 19 / Algorithm 1 line 3 "sigma_noise = 0.2".
    sigma_noise: float = 0.2
    # Open point (docs/protocol.md §5): HC samples in the cross-domain stage, once per domain (Eq. 20
    # read literally) or once in total.
    hc_in_cross: Literal["per_domain", "once"] = "per_domain"
    # Open point: keep each domain-specific student's Adam state across epochs.
    persist_ds_adam: bool = False
    # Harness budget for smoke runs (not in the paper): optimiser steps per stage per epoch
    # (each domain-specific pass, the cross-domain pass, the confident pass). ``max_steps``
    # (inherited) caps the global student's steps in total.
    max_steps_per_stage: int | None = None
    # Speed switch: run the K-1 other students' affinity forwards as one vmapped call.
    batched_students: bool = True
    # Speed switch: compute each domain-specific student's outputs on D^HC once per epoch
    # (with K >= 3 an HC sample is visited K times), skip S_glo(e-1)'s pass in epochs where
    # nothing but the diagnostics would read it, and keep its feature buffers across epochs.
    # False recomputes all of it (same results up to float rounding; benchmarks/bench_cdd.py
    # --compare-recompute times both).
    avoid_recomputation: bool = True
    # Harness experiment (the paper is silent): "train" keeps the global student's BatchNorm
    # running statistics as training leaves them (perturbed cross-domain inputs, then clean
    # confident-distillation inputs); "clean" recomputes them after every epoch from the clean
    # teacher features of every training image.
    bn_stats: Literal["train", "clean"] = "train"

    def __post_init__(self):
        super().__post_init__()
        where = "cdd config"
        if self.selection not in SELECTIONS:
            raise UserError(f"{where} selection={self.selection!r}; use one of {SELECTIONS}")
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise UserError(
                f"{where} lambda_schedule={self.lambda_schedule!r}; use one of {LAMBDA_SCHEDULES}"
            )
        if self.hc_in_cross not in HC_IN_CROSS:
            raise UserError(f"{where} hc_in_cross={self.hc_in_cross!r}; use one of {HC_IN_CROSS}")
        if self.bn_stats not in BN_STATS:
            raise UserError(f"{where} bn_stats={self.bn_stats!r}; use one of {BN_STATS}")
        if not 0.0 <= self.r_normal <= 1.0:
            raise UserError(f"{where} r_normal={self.r_normal} must be within [0, 1]")
        if self.sigma_noise < 0 or self.lambda_p <= 0:
            raise UserError(f"{where} needs sigma_noise >= 0 and lambda_p > 0")
        if self.max_steps_per_stage is not None and self.max_steps_per_stage < 1:
            raise UserError(f"{where} max_steps_per_stage must be at least 1 or None")
        if not self.domain_construction:
            on = [s for s in SWITCHES[1:] if getattr(self, s)]
            if self.bn_stats != "train":
                on.append(f"bn_stats={self.bn_stats}")
            if on:
                raise UserError(
                    f"{where}: {', '.join(on)} need domain_construction=true; turn them off "
                    f"too (all off = RD) or turn domain_construction on"
                )
            return
        if not self.feature_cache:
            raise UserError(
                f"{where}: CDD always caches teacher features (every stage reads them several "
                f"times per epoch); feature_cache=false applies only with every switch off"
            )
        if not self.k_schedule or any(int(k) < 2 for k in self.k_schedule):
            raise UserError(
                f"{where} k_schedule={self.k_schedule} needs at least one K and every K >= 2 "
                f"(cross-domain distillation needs another domain)"
            )
        if self.feature_perturbation and not self.pseudo_normal:
            raise UserError(
                f"{where}: feature_perturbation acts during cross-domain distillation; "
                f"turn pseudo_normal on or feature_perturbation off"
            )
        if not (self.pseudo_normal or self.confident_distillation):
            raise UserError(
                f"{where}: with domain_construction the global student learns only from "
                f"pseudo_normal or confident_distillation; turn one of them on"
            )


# --------------------------------------------------------------------------------------------
# Schedules (pure)


def r_schedule(epoch: int, epochs: int, r_normal: float) -> float:
    """High-confidence ratio r(e) = min(e / E, r_normal) (Eq. 13); r(0) = 0."""
    return min(epoch / epochs, r_normal)


def lambda_schedule(epoch: int, epochs: int, kind: str = "s_curve", p: float = 4.0) -> float:
    """Regularisation weight lambda(e) (Eq. 16 and the Table A2 variants)."""
    x = epoch / epochs
    if kind == "s_curve":
        # Eq. 16: x^p / (x^p + (1 - x)^p); 0 at e = 0, 1/2 at e = E/2, 1 at e = E.
        num = x**p
        return float(num / (num + (1.0 - x) ** p))
    if kind == "linear":
        return float(x)
    if kind == "zero":
        return 0.0
    if kind == "one":
        return 1.0
    raise ValueError(f"unknown lambda schedule {kind!r}; use one of {LAMBDA_SCHEDULES}")


def k_at_epoch(epoch: int, epochs: int, schedule: Sequence[int]) -> int:
    """K for ``epoch``: the schedule's entries cover equal consecutive stages of training."""
    stage = min(len(schedule) - 1, epoch * len(schedule) // epochs)
    return int(schedule[stage])


# --------------------------------------------------------------------------------------------
# Random streams


@dataclass(frozen=True)
class RandomStreams:
    """The independent random streams of one CDD fit, all spawned from its seed.

    ``init_seed`` draws the global student's initialisation, ``order`` the batch order of every
    pass (CPU), ``noise`` the feature perturbation of Eq. 19 (on the training device) and
    ``domains`` the low-confidence split and the "once" HC shares, one child per epoch.
    """

    init_seed: int
    order: torch.Generator
    noise: torch.Generator
    domains: np.random.SeedSequence

    def domain_rng(self, epoch: int) -> np.random.Generator:
        """The epoch's own child of ``domains`` (the one ``spawn`` would give as child
        ``epoch``), so that a split never depends on what earlier epochs drew."""
        child = np.random.SeedSequence(self.domains.entropy,
                                       spawn_key=(*self.domains.spawn_key, epoch))
        return np.random.default_rng(child)


def random_streams(seed: int, device: str | torch.device = "cpu") -> RandomStreams:
    """Four non-overlapping streams from ``numpy.random.SeedSequence(seed).spawn``.

    Seeding generators with ``seed``, ``seed + 1``, ... would make run ``seed``'s second
    stream run ``seed + 1``'s first one; spawned children are independent by construction.
    """

    def torch_seed(sequence: np.random.SeedSequence) -> int:
        return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))

    init, order, noise, domains = np.random.SeedSequence(int(seed)).spawn(4)
    return RandomStreams(
        init_seed=torch_seed(init),
        order=torch.Generator().manual_seed(torch_seed(order)),
        noise=torch.Generator(device=torch.device(device)).manual_seed(torch_seed(noise)),
        domains=domains,
    )


# --------------------------------------------------------------------------------------------
# Domain construction (pure)


def high_confidence_count(r: float, n: int) -> int:
    """|D^HC| = floor(r * N), robust to float error (0.3 * 10 is 3, not 2)."""
    return int(math.floor(r * n + 1e-9))


def select_high_confidence(confidence: np.ndarray, r: float) -> np.ndarray:
    """Indices of the top floor(r * N) confidences (Algorithm 1 line 8), sorted ascending.

    Ties are broken by the lower index (stable sort), so the set is a pure function of the scores.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    count = high_confidence_count(r, confidence.shape[0])
    order = np.argsort(-confidence, kind="stable")
    return np.sort(order[:count])


@dataclass(frozen=True)
class DomainPlan:
    """The K domains of one epoch (Eq. 14).

    ``hc``: D^HC (sorted indices); ``lc_parts``: the K disjoint parts D_k^LC; ``guided``: whether
    D^HC is in every domain (Conf.G.). Without Conf.G. the parts cover every sample.
    """

    hc: np.ndarray
    lc_parts: tuple[np.ndarray, ...]
    guided: bool

    @property
    def k(self) -> int:
        return len(self.lc_parts)

    def domain(self, k: int) -> np.ndarray:
        """D_k = D^HC u D_k^LC (Eq. 14), or D_k^LC alone without Conf.G.; sorted indices."""
        if self.guided:
            return np.sort(np.concatenate([self.hc, self.lc_parts[k]]))
        return self.lc_parts[k]

    def domain_of(self, n: int) -> np.ndarray:
        """Per sample: the index of its low-confidence part, or -1 for a guided HC sample."""
        owner = np.full(n, -1, dtype=np.int64)
        for k, part in enumerate(self.lc_parts):
            owner[part] = k
        return owner


def construct_domains(
    n: int, hc: np.ndarray, k: int, rng: np.random.Generator, guided: bool = True
) -> DomainPlan:
    """Split the samples outside D^HC (all samples when not ``guided``) randomly and evenly
    into ``k`` disjoint parts (sizes differ by at most one; Algorithm 1 line 9)."""
    hc = np.sort(np.asarray(hc, dtype=np.int64))
    rest = np.setdiff1d(np.arange(n), hc) if guided else np.arange(n)
    shuffled = rest[rng.permutation(rest.shape[0])]
    parts = tuple(np.sort(p) for p in np.array_split(shuffled, k))
    return DomainPlan(hc=hc, lc_parts=parts, guided=guided)


def cross_visits(plan: DomainPlan, hc_in_cross: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Samples the cross-domain stage visits as members of each domain k (Eq. 20).

    "per_domain": all of D_k, so an HC sample is visited once per domain. "once": D_k^LC plus
    an even random share of D^HC, so every sample is visited exactly once.
    """
    if not plan.guided or hc_in_cross == "per_domain":
        return [plan.domain(k) for k in range(plan.k)]
    if hc_in_cross != "once":
        raise ValueError(f"unknown hc_in_cross {hc_in_cross!r}; use one of {HC_IN_CROSS}")
    shares = np.array_split(plan.hc[rng.permutation(plan.hc.shape[0])], plan.k)
    return [np.sort(np.concatenate([plan.lc_parts[k], shares[k]])) for k in range(plan.k)]


# --------------------------------------------------------------------------------------------
# Confidence, affinity and selection (pure tensor functions)


def confidence_scores(
    teacher_feats: Sequence[torch.Tensor], student_feats: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Conf_i (Eq. 12): per layer the mean over positions of the channel cosine between teacher
    and student, summed over layers. Returns float32 (B,); higher = more normal-looking."""
    total = None
    for t, s in zip(teacher_feats, student_feats, strict=True):
        cos = F.cosine_similarity(t.float(), s.float(), dim=1).flatten(1).mean(1)
        total = cos if total is None else total + cos
    return total


def stacked_affinity(
    stacked_feats: Sequence[torch.Tensor], ref_feats: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Aff_i(h) (Eq. 17) for several students at once.

    Args:
        stacked_feats: L tensors (H, B, C_l, h_l, w_l), the outputs of H students.
        ref_feats: L tensors (B, C_l, h_l, w_l), the previous global student's outputs.

    Returns:
        float32 (B, H): sum over layers of the cosine of the whole flattened feature maps.
    """
    total = None
    for s, r in zip(stacked_feats, ref_feats, strict=True):
        cos = F.cosine_similarity(
            s.flatten(2).float(), r.flatten(1).float().unsqueeze(0), dim=2
        )  # (H, B)
        total = cos if total is None else total + cos
    return total.transpose(0, 1)


def consensus_select(affinity: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Eq. 18: per sample the student with the highest affinity among those NOT trained on
    the sample's domain.

    Args:
        affinity: (B, K) Aff_i(h) for every student h (the own column is ignored).
        own: (B,) long, the domain the sample was visited as a member of.

    Returns:
        (B,) long student indices, never equal to ``own``.
    """
    mask = F.one_hot(own.long(), affinity.shape[1]).bool()
    return affinity.float().masked_fill(mask, float("-inf")).argmax(dim=1)


def next_select(own: torch.Tensor, k: int) -> torch.Tensor:
    """Table 6 "Next": the student of domain (k + 1) mod K."""
    return (own.long() + 1) % k


def other_students(k: int, own: int, selection: str) -> list[int]:
    """The students whose outputs a batch of domain ``own`` needs in cross-domain distillation."""
    if selection == "next":
        return [(own + 1) % k]
    return [h for h in range(k) if h != own]


def perturb(
    feats: Sequence[torch.Tensor], sigma: float, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Eq. 19: teacher features + delta, delta ~ N(0, sigma^2), drawn independently per element."""
    if sigma <= 0:
        return list(feats)
    return [
        f + sigma * torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype)
        for f in feats
    ]


# --------------------------------------------------------------------------------------------
# Diagnostics for the runner (which holds the injected flags; the method never sees them)


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank AUROC (ties count one half); NaN when one class is absent."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def cdd_diagnostics(
    per_sample: Mapping[str, np.ndarray], injected: Sequence[bool], n_students: int | None = None
) -> dict[str, float]:
    """What CDD's per-sample logs of one epoch say about the injected anomalies.

    Args:
        per_sample: the arrays :meth:`CrossDomainDistillation.fit` passes to the observer
            (``confidence``, ``in_hc``, ``picked``), in TrainSet order.
        injected: one flag per training image (the runner's split), same order.
        n_students: how many ``pick_count_*`` keys to return (default: the largest pick + 1),
            so that every epoch has the same keys.

    Returns:
        ``confidence_auroc`` (AUROC of -Conf_i for injected vs normal: 1 = every injected
        image is less confident than every normal one), ``injected_in_hc`` and ``normal_in_hc``
        (share of each group inside D^HC), ``pick_count_h`` (samples whose pseudo-normal target
        came from student h) and ``injected_pick_count_h`` (the same among injected images).
        NaN where a group is empty.
    """
    flags = np.asarray(injected, dtype=bool)
    confidence = np.asarray(per_sample["confidence"], dtype=np.float64)
    if confidence.shape[0] != flags.shape[0]:
        raise ValueError(f"{confidence.shape[0]} confidences for {flags.shape[0]} flags")
    in_hc = np.asarray(per_sample["in_hc"]).astype(bool)
    picked = np.asarray(per_sample["picked"], dtype=np.int64)
    out = {
        "confidence_auroc": _auroc(-confidence, flags),
        "injected_in_hc": float(in_hc[flags].mean()) if flags.any() else float("nan"),
        "normal_in_hc": float(in_hc[~flags].mean()) if (~flags).any() else float("nan"),
    }
    count = n_students if n_students is not None else int(picked.max(initial=-1)) + 1
    for h in range(count):
        out[f"pick_count_{h}"] = float((picked == h).sum())
        out[f"injected_pick_count_{h}"] = float(((picked == h) & flags).sum())
    return out


# --------------------------------------------------------------------------------------------
# The method


def _rows(feats: Sequence[torch.Tensor], index: torch.Tensor, device: torch.device):
    """Rows ``index`` of stored per-sample features, moved to ``device``."""
    index = index.to(feats[0].device, non_blocking=True)
    return [f.index_select(0, index).to(device, non_blocking=True) for f in feats]


@register_method
class CrossDomainDistillation(ReverseDistillation):
    """Cross-Domain Distillation (paper §4, Algorithm 1) on RD's networks, loss, maps and cache.

    ``fit`` follows the module docstring; ``predict``, ``state_dict`` and ``describe`` are RD's,
    applied to the global student (Eq. 11 is RD's anomaly map). With every switch off the method
    is RD: ``fit`` runs :meth:`ReverseDistillation.fit` unchanged (same seed, same losses).

    Open choices (docs/protocol.md §5), decided here and in ``docs/cdd.md``: one pass per domain per
    epoch; HC samples visited once per domain in the cross-domain stage
    (``hc_in_cross="per_domain"``, switchable to ``"once"``); dynamic K over equal consecutive
    stages; the global student's Adam persists, the domain-specific students' Adam restarts
    each epoch (``persist_ds_adam``); fixed-target networks run in eval mode.

    Randomness, all from ``seed`` through :func:`random_streams` (``SeedSequence(seed).spawn``,
    four independent streams): the global student's initialisation, the batch order (a CPU
    ``torch.Generator``), the perturbation noise (a generator on the training device) and the
    domain splits (a ``numpy`` generator per epoch).

    BatchNorm: the global student trains in train mode, so its running statistics (momentum
    0.1) follow the batches it is trained on: the perturbed inputs of the cross-domain stage,
    then the clean D^HC inputs of confident distillation, which come last in every epoch with
    Conf.D. These statistics serve in eval mode as S_glo(e-1) (confidence, regulariser and
    affinity targets) and at inference. Domain-specific students copy them with the weights and
    update them on their own clean batches. ``bn_stats="clean"`` recomputes the global
    student's statistics on clean features after every epoch (an experiment, see docs/cdd.md).

    Observer, after each epoch: scalars ``loss`` (mean global-student batch loss), ``steps``
    (global-student optimiser steps so far), ``r``, ``lambda`` (the regularisation weight
    applied: lambda(e), or 0 without Reg.), ``K``, ``n_hc``,
    ``domain_size_k`` and ``visit_pick_count_k`` (targets taken from student k, counted per
    visit) for k below the largest K (0 when unused),
    ``loss_ds_teacher``, ``loss_ds_reg``, ``loss_cross``, ``loss_hc`` (NaN when a stage did not
    run); per_sample arrays ``confidence`` (Eq. 12 under S_glo(e-1); NaN in an epoch where no
    training step needs S_glo(e-1), e.g. epoch 0, whose pass is skipped), ``in_hc`` (0/1) and
    ``picked`` (the student whose output was the sample's pseudo-normal target, -1 when the
    sample was not visited once with a single pick: HC samples under "per_domain", "all") and
    ``domain`` (the sample's low-confidence part k, -1 for an HC sample inside every domain).
    """

    name = "cdd"
    Config = CDDConfig
    display_name = paper_name = "CDD"
    column_rank = 90
    paper_setup = {**ReverseDistillation.paper_setup, "max_steps_per_stage": None}
    smoke_overrides = {**ReverseDistillation.smoke_overrides, "epochs": 2,
                       "max_steps_per_stage": 1}

    @classmethod
    def diagnostics(cls, per_sample, injected, config) -> dict[str, float]:
        """:func:`cdd_diagnostics`, with the same pick-count columns every epoch whatever K
        the schedule is at."""
        n_students = max(getattr(config, "k_schedule", None) or (0,)) or None
        return cdd_diagnostics(per_sample, injected, n_students)

    def fit(self, train: TrainSet, observer: EpochObserver | None = None) -> None:
        """Train the global student on ``train.images`` (uint8 (N, 3, H, W), sides % 32 == 0)."""
        cfg = self.config
        if not cfg.domain_construction:
            # Every switch is off (validated by CDDConfig): CDD reduces to RD.
            super().fit(train, observer)
            return
        n, _, h, w = train.images.shape
        check_image_size(h, w, "cdd")
        if n < 2:
            raise UserError("cdd: needs at least 2 training images; check the train folder")
        # BatchNorm in train mode cannot normalise one value per channel (32 px images).
        self._tiny = (h // 32) * (w // 32) == 1
        if self._tiny and cfg.batch_size < 2:
            raise UserError("cdd: batch_size=1 cannot train BatchNorm on 32 px images (a 1x1 "
                            "bottleneck); use batch_size >= 2 or larger images")
        teacher = self._build_teacher()
        self._note_precision()
        streams = random_streams(self.seed, self.device)
        self._order_gen, self._noise_gen = streams.order, streams.noise
        self.student = glo = self._new_student(seed=streams.init_seed)
        glo_opt = self._adam(glo)
        schedule = [self._epoch_settings(e) for e in range(cfg.epochs)]
        # S_glo(e-1)'s features and the stored outputs on D^HC sit beside the teacher's: budget
        # memory for all of them when choosing where the cache lives.
        cache = FeatureCache(teacher, train.images, self.device, storage=cfg.cache_device,
                             channels_last=self._channels_last,
                             copies=self._feature_copies(n, schedule))
        k_max = max(cfg.k_schedule)
        # Domain-specific students: copies (not new draws), so no random stream is touched.
        self._ds = [copy.deepcopy(glo) for _ in range(k_max)]
        self._ref = self._hc_feats = None  # buffers, allocated once and reused every epoch
        ds_opts: list[torch.optim.Optimizer | None] = [None] * k_max
        needs_hc = cfg.confidence_guided or cfg.confident_distillation
        steps = 0
        for epoch, (r, lam, k) in enumerate(schedule):
            rng = streams.domain_rng(epoch)
            # Step 1: S_glo(e-1)'s confidences and features, once per epoch (Eq. 12, targets).
            n_hc = high_confidence_count(r, n) if needs_hc else 0
            keep_ref = self._keeps_previous_features(k, lam)
            if n_hc or keep_ref or not cfg.avoid_recomputation:
                confidence, ref = self._previous_global_pass(glo, cache, keep_ref)
            else:
                # No training step reads S_glo(e-1) this epoch (D^HC empty, no regulariser, no
                # consensus among three or more): its confidences would feed diagnostics only.
                confidence, ref = torch.full((n,), math.nan), None
            # Step 2: domains (Eqs. 13-14).
            hc = select_high_confidence(confidence.numpy(), r) if n_hc else np.zeros(0, np.int64)
            plan = construct_domains(n, hc, k, rng, guided=cfg.confidence_guided)
            # Step 3: domain-specific students (Eqs. 15-16), each from a copy of S_glo(e-1).
            state = glo.state_dict()
            ds_losses = []
            for d in range(k):
                self._ds[d].load_state_dict(state)
                if ds_opts[d] is None or not cfg.persist_ds_adam:
                    ds_opts[d] = self._adam(self._ds[d])
                ds_losses += self._train_domain_student(
                    self._ds[d], ds_opts[d], plan.domain(d), cache, ref, lam
                )
            # Step 4: cross-domain pseudo-normal distillation (Eqs. 17-20).
            picked = torch.full((n,), -1, dtype=torch.long, device=self.device)
            pick_counts = torch.zeros(k_max, dtype=torch.long, device=self.device)
            cross_losses: list[torch.Tensor] = []
            budget = None if cfg.max_steps is None else cfg.max_steps - steps
            if cfg.pseudo_normal:
                visits = cross_visits(plan, cfg.hc_in_cross, rng)
                stored = None
                if self._stores_hc_outputs(k, plan.hc.size):
                    stored = self._hc_student_outputs(k, plan.hc, cache)
                cross_losses = self._cross_domain_stage(
                    glo, glo_opt, visits, cache, ref, stored, picked, pick_counts, budget
                )
                steps += len(cross_losses)
                if cfg.hc_in_cross == "per_domain" and plan.guided:
                    picked[torch.as_tensor(plan.hc, device=self.device)] = -1  # K visits
            # Step 5: confident distillation on D^HC (Eq. 21).
            hc_losses: list[torch.Tensor] = []
            budget = None if cfg.max_steps is None else cfg.max_steps - steps
            if cfg.confident_distillation and plan.hc.size and (budget is None or budget > 0):
                hc_losses = self._confident_stage(glo, glo_opt, plan.hc, cache, budget)
                steps += len(hc_losses)
            if cfg.bn_stats == "clean":
                self._recompute_bn_stats(glo, cache)
            scalars = self._epoch_scalars(
                r, lam, k, k_max, plan, ds_losses, cross_losses, hc_losses, pick_counts, steps
            )
            if not math.isfinite(scalars["loss"]) and (cross_losses or hc_losses):
                raise FloatingPointError(f"cdd: loss became {scalars['loss']} at epoch {epoch}")
            if observer is not None:
                in_hc = np.zeros(n, dtype=np.uint8)
                in_hc[plan.hc] = 1
                observer(epoch, scalars, {
                    "confidence": confidence.numpy().astype(np.float32),
                    "in_hc": in_hc,
                    "picked": picked.cpu().numpy().astype(np.int32),
                    "domain": plan.domain_of(n).astype(np.int32),
                })
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        glo.eval()
        # Domain-specific students and the buffers are training-time only.
        self._ds, self._template, self._ref, self._hc_feats = [], None, None, None

    # -- per-epoch plan --------------------------------------------------------------------

    def _epoch_settings(self, epoch: int) -> tuple[float, float, int]:
        """(r(e), the regularisation weight applied, K) of ``epoch``: lambda(e) of Eq. 16 (or
        its Table A2 variant) with Reg., 0 without; that weight is also what the log shows."""
        cfg = self.config
        lam = 0.0
        if cfg.regularization:
            lam = lambda_schedule(epoch, cfg.epochs, cfg.lambda_schedule, cfg.lambda_p)
        return (r_schedule(epoch, cfg.epochs, cfg.r_normal), lam,
                k_at_epoch(epoch, cfg.epochs, cfg.k_schedule))

    def _keeps_previous_features(self, k: int, lam: float) -> bool:
        """Whether an epoch needs S_glo(e-1)'s features: the regulariser's target (applied
        weight ``lam`` > 0) or the consensus affinity among more than two students."""
        cfg = self.config
        return bool(lam > 0 or (cfg.pseudo_normal and cfg.selection == "consensual" and k > 2))

    def _stores_hc_outputs(self, k: int, n_hc: int) -> bool:
        """Whether the cross-domain stage reads the domain students' outputs on D^HC from a
        per-epoch store: an HC sample is visited by all K domains (per_domain) and each visit
        needs K-1 outputs ("consensual", "all"), so with K >= 3 computing them per visit would
        repeat each one K-1 times; at K = 2, with "next" or "once" nothing repeats."""
        cfg = self.config
        return bool(cfg.avoid_recomputation and cfg.confidence_guided and k >= 3 and n_hc > 0
                    and cfg.hc_in_cross == "per_domain" and cfg.selection != "next")

    def _feature_copies(self, n: int, schedule) -> float:
        """Training-set-sized feature sets the fit keeps, the teacher cache included: +1 when
        some epoch keeps S_glo(e-1)'s features, + K_max x |D^HC|max / N for the stored outputs."""
        copies = 1.0
        if any(self._keeps_previous_features(k, lam) for _, lam, k in schedule):
            copies += 1
        cap = high_confidence_count(self.config.r_normal, n)
        if self.config.pseudo_normal and any(self._stores_hc_outputs(k, cap)
                                             for _, _, k in schedule):
            copies += max(self.config.k_schedule) * cap / n
        return copies

    # -- stages ----------------------------------------------------------------------------

    def _adam(self, student: RDStudent) -> torch.optim.Optimizer:
        cfg = self.config
        # Fused Adam on CPU too: same update rule, several times faster there than the
        # per-tensor loop, which matters with K + 1 students.
        fused = self.device.type in ("cuda", "cpu") or None
        return torch.optim.Adam(student.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                fused=fused)

    def _split(self, order: torch.Tensor, size: int) -> list[torch.Tensor]:
        """``order`` in chunks of ``size``, the last one kept. With 32 px images a chunk of
        one cannot train BatchNorm: it joins the previous chunk (or is dropped when alone)."""
        chunks = list(order.split(size))
        if self._tiny and chunks and chunks[-1].numel() == 1:
            tail = chunks.pop()
            if chunks:
                chunks[-1] = torch.cat([chunks[-1], tail])
        return chunks

    def _batches(self, index: np.ndarray, limit: int | None = None) -> list[torch.Tensor]:
        """One shuffled pass over ``index`` in batches of ``batch_size`` (last one kept; see
        :meth:`_split` for 32 px images)."""
        cfg = self.config
        if index.size == 0:
            return []
        order = torch.as_tensor(index)[torch.randperm(index.size, generator=self._order_gen)]
        batches = self._split(order, cfg.batch_size)
        caps = [c for c in (cfg.max_steps_per_stage, limit) if c is not None]
        return batches[: min(caps)] if caps else batches

    def _step(self, optimizer, loss) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def _previous_global_pass(self, glo, cache, keep: bool):
        """Conf_i (Eq. 12) of every sample under S_glo(e-1), and its features when ``keep``.

        Computed in chunks, in eval mode without gradients; the features are stored where the
        teacher cache lives (they are as large as it is), in a buffer reused every epoch.
        Returns (CPU float32 (N,), feats|None).
        """
        n = len(cache)
        chunk = max(self.config.batch_size, 32)
        if not self.config.avoid_recomputation:
            self._ref = None  # a fresh buffer every epoch, as before the buffers were reused
        glo.eval()
        conf = torch.empty(n, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for start in range(0, n, chunk):
                index = torch.arange(start, min(n, start + chunk))
                t_feats = cache.get(index)
                with self._autocast():
                    s_feats = glo(t_feats)
                conf[start:start + index.numel()] = confidence_scores(t_feats, s_feats)
                if keep:
                    if self._ref is None:
                        self._ref = [torch.empty((n, *f.shape[1:]), dtype=torch.float32,
                                                 device=cache.storage_device) for f in s_feats]
                    for buf, f in zip(self._ref, s_feats):
                        buf[start:start + f.shape[0]].copy_(f.float(), non_blocking=True)
        glo.train()
        return conf.cpu(), (self._ref if keep else None)

    def _train_domain_student(self, student, optimizer, domain, cache, ref, lam):
        """One pass over D_k with L_k^DS = teacher guidance + lambda(e) * regularisation (Eq. 15).

        Returns per-step (teacher term, regularisation term) detached losses.
        """
        student.train()
        losses = []
        for index in self._batches(domain):
            t_feats = cache.get(index)
            with self._autocast():
                s_feats = student(t_feats)
            loss_t = rd_loss(t_feats, s_feats)
            loss = loss_t
            loss_r = torch.zeros((), device=loss_t.device)
            if lam > 0:
                # Target: S_glo(e-1)'s features of the same images (stored, detached).
                loss_r = rd_loss(_rows(ref, index, self.device), s_feats)
                loss = loss_t + lam * loss_r
            self._step(optimizer, loss)
            losses.append(torch.stack([loss_t.detach(), loss_r.detach()]))
        student.eval()
        return losses

    def _stacked_students(self, ids: list[int]):
        """Stacked weights of domain-specific students ``ids`` for one vmapped forward, or None
        when they run one after another (a single student, or ``batched_students`` off)."""
        if len(ids) < 2 or not self.config.batched_students:
            return None
        if getattr(self, "_template", None) is None:
            # A weightless copy of the architecture: functional_call supplies the weights.
            self._template = copy.deepcopy(self._ds[0]).to("meta").eval()
        params, buffers = stack_module_state([self._ds[i] for i in ids])
        return params, buffers

    def _students_forward(self, ids: list[int], stacked, t_feats) -> list[torch.Tensor]:
        """Outputs of domain-specific students ``ids`` on one batch: L tensors (H, B, ...),
        in eval mode without gradients (they are fixed targets here)."""
        with torch.no_grad(), self._autocast():
            if stacked is not None:
                base = self._template

                def run(p, b, x):
                    return functional_call(base, (p, b), (x,))

                return list(vmap(run, in_dims=(0, 0, None))(*stacked, t_feats))
            outs = [self._ds[i](t_feats) for i in ids]
        return [torch.stack([o[layer] for o in outs]) for layer in range(len(outs[0]))]

    def _hc_student_outputs(self, k: int, hc: np.ndarray, cache):
        """Every domain-specific student's output on D^HC, computed once after they trained.

        Stored as float32 where the cache lives, in buffers reused every epoch. Returns
        (slot, feats): ``slot`` (N,) CPU long, the sample's row in the buffers (-1 outside
        D^HC); ``feats`` L tensors (K_max, |D^HC| max, C_l, h_l, w_l), student-major.
        """
        n = len(cache)
        ids = list(range(k))
        stacked = self._stacked_students(ids)
        chunk = max(self.config.batch_size, 32)
        for start in range(0, hc.size, chunk):
            index = torch.as_tensor(hc[start:start + chunk])
            outs = self._students_forward(ids, stacked, cache.get(index))
            if self._hc_feats is None:
                cap = high_confidence_count(self.config.r_normal, n)
                self._hc_feats = [torch.empty((len(self._ds), cap, *o.shape[2:]),
                                              dtype=torch.float32, device=cache.storage_device)
                                  for o in outs]
            for buf, o in zip(self._hc_feats, outs):
                buf[:k, start:start + o.shape[1]].copy_(o.float(), non_blocking=True)
        slot = torch.full((n,), -1, dtype=torch.long)
        slot[torch.as_tensor(hc)] = torch.arange(hc.size)
        return slot, self._hc_feats

    def _other_outputs(self, ids, stacked, index, t_feats, stored) -> list[torch.Tensor]:
        """Outputs of students ``ids`` on one batch, L tensors (H, B, ...): the rows of D^HC
        from the epoch's store when there is one, the other rows computed now."""
        if stored is None:
            return self._students_forward(ids, stacked, t_feats)
        slot_of, feats = stored
        slots = slot_of[index]
        kept = slots >= 0
        if not bool(kept.any()):
            return self._students_forward(ids, stacked, t_feats)
        where = feats[0].device
        rows = kept.nonzero().squeeze(1)
        students = torch.as_tensor(ids, device=where)[:, None]
        slot_sel = slots[rows].to(where)[None, :]
        rows = rows.to(self.device)
        outs = [torch.empty((len(ids), index.numel(), *f.shape[1:]), dtype=torch.float32,
                            device=self.device) for f in t_feats]
        for out, buf in zip(outs, feats):
            out[:, rows] = buf[students, slot_sel].to(self.device, non_blocking=True)
        fresh = (~kept).nonzero().squeeze(1).to(self.device)
        if fresh.numel():
            computed = self._students_forward(ids, stacked,
                                              [f.index_select(0, fresh) for f in t_feats])
            for out, f in zip(outs, computed):
                out[:, fresh] = f.float()
        return outs

    def _cross_domain_stage(self, glo, optimizer, visits, cache, ref, stored, picked,
                            pick_counts, budget):
        """Eqs. 17-20: one pass per domain; each batch is distilled from the selected students'
        outputs, with the global student's input perturbed (Eq. 19).

        ``stored``: the students' outputs on D^HC (:meth:`_hc_student_outputs`) or None.
        ``picked`` (N,) and ``pick_counts`` (K_max,) are device tensors updated in place.
        """
        cfg = self.config
        k = len(visits)
        glo.train()
        losses = []
        for own in range(k):
            limit = None if budget is None else budget - len(losses)
            if limit is not None and limit <= 0:
                break
            ids = other_students(k, own, cfg.selection)
            stacked = self._stacked_students(ids)  # once per domain: the students are frozen
            # slot_of[h] = position of student h among ``ids`` (-1 for the excluded one).
            slot_of = torch.full((k,), -1, dtype=torch.long, device=self.device)
            slot_of[ids] = torch.arange(len(ids), device=self.device)
            for index in self._batches(visits[own], limit):
                t_feats = cache.get(index)
                outs = self._other_outputs(ids, stacked, index, t_feats, stored)  # L x (H, B..)
                b = index.numel()
                own_t = torch.full((b,), own, dtype=torch.long, device=self.device)
                if cfg.selection == "all":
                    choice = None
                elif cfg.selection == "next":
                    choice = next_select(own_t, k)
                elif len(ids) == 1:
                    choice = torch.full_like(own_t, ids[0])  # K = 2: one candidate
                else:
                    aff = torch.full((b, k), float("-inf"), device=self.device)
                    aff[:, ids] = stacked_affinity(outs, _rows(ref, index, self.device))  # Eq. 17
                    choice = consensus_select(aff, own_t)  # Eq. 18
                x = t_feats
                if cfg.feature_perturbation:
                    x = perturb(t_feats, cfg.sigma_noise, self._noise_gen)  # Eq. 19
                with self._autocast():
                    s_feats = glo(x)
                if choice is None:
                    # "All": every other student's output is a target; mean of their losses.
                    loss = torch.stack([
                        rd_loss([o[j] for o in outs], s_feats) for j in range(len(ids))
                    ]).mean()
                else:
                    rows = torch.arange(b, device=self.device)
                    targets = [o[slot_of[choice], rows] for o in outs]  # F_pseudo, no grad
                    loss = rd_loss(targets, s_feats)  # Eq. 20
                    picked[index.to(self.device)] = choice
                    pick_counts += torch.bincount(choice, minlength=pick_counts.numel())
                self._step(optimizer, loss)
                losses.append(loss.detach())
        return losses

    def _confident_stage(self, glo, optimizer, hc, cache, budget):
        """Eq. 21: distil the global student from the teacher on D^HC (no perturbation)."""
        glo.train()
        losses = []
        for index in self._batches(hc, budget):
            t_feats = cache.get(index)
            with self._autocast():
                s_feats = glo(t_feats)
            loss = rd_loss(t_feats, s_feats)
            self._step(optimizer, loss)
            losses.append(loss.detach())
        return losses

    def _recompute_bn_stats(self, glo, cache) -> None:
        """``bn_stats="clean"``: replace the global student's BatchNorm running statistics by
        those of the clean teacher features of every training image (train-mode forwards
        without gradients; momentum None = the average over the chunks); weights untouched."""
        norms = [m for m in glo.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        glo.train()
        chunk = max(self.config.batch_size, 32)
        with torch.no_grad():
            for index in self._split(torch.arange(len(cache)), chunk):
                with self._autocast():
                    glo(cache.get(index))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum

    def _epoch_scalars(self, r, lam, k, k_max, plan, ds_losses, cross_losses, hc_losses,
                       pick_counts, steps) -> dict[str, float]:
        """Per-epoch scalars; one host sync for all the losses of the epoch."""

        def mean(values):
            return float(torch.stack(values).float().mean()) if values else float("nan")

        counts = pick_counts.tolist()
        ds = torch.stack(ds_losses).float().mean(0).tolist() if ds_losses else [math.nan] * 2
        scalars = {
            "loss": mean(cross_losses + hc_losses),
            "steps": float(steps),
            "r": float(r),
            "lambda": float(lam),
            "K": float(k),
            "n_hc": float(plan.hc.size),
            "loss_ds_teacher": ds[0],
            "loss_ds_reg": ds[1],
            "loss_cross": mean(cross_losses),
            "loss_hc": mean(hc_losses),
        }
        for d in range(k_max):
            scalars[f"domain_size_{d}"] = float(plan.domain(d).size) if d < k else 0.0
            # Per visit (an HC sample is visited by each domain's student): not the per-sample
            # ``pick_count_h`` of cdd_diagnostics, hence the different name.
            scalars[f"visit_pick_count_{d}"] = float(counts[d])
        return scalars


# --------------------------------------------------------------------------------------------
# Variants: every row of Tables 4, 5, 6, A1 and A2 (docs/protocol.md §5 maps the rows).

_OFF = {s: False for s in SWITCHES}
_FULL = {s: True for s in SWITCHES}


def _register_variants() -> None:
    k2 = {"k_schedule": (2,)}
    # Table 4 (K = 2), in row order; the last row is full CDD with K = 2.
    t4 = [
        ("rd", "RD (no switch)", {}),
        ("dc-pn", "D.C. + P.N.", {"domain_construction": True, "pseudo_normal": True}),
        ("dc-cg-pn", "D.C. + Conf.G. + P.N.",
         {"domain_construction": True, "confidence_guided": True, "pseudo_normal": True}),
        ("dc-cg-pn-cd", "D.C. + Conf.G. + P.N. + Conf.D.",
         {"domain_construction": True, "confidence_guided": True, "pseudo_normal": True,
          "confident_distillation": True}),
        ("dc-cg-pn-fp-cd", "D.C. + Conf.G. + P.N. + F.P. + Conf.D.",
         {**_FULL, "regularization": False}),
        ("full", "all six designs (+ Reg.)", dict(_FULL)),
    ]
    for i, (tag, what, switches) in enumerate(t4, start=1):
        register_variant(f"cdd-t4-{tag}", "cdd", {**_OFF, **switches, **k2},
                        f"Table 4 row {i} (K=2): {what}")
    # Table 5: the full method with fixed K or a dynamic schedule.
    for tag, schedule in (("k2", (2,)), ("k3", (3,)), ("k4", (4,)), ("k2332", (2, 3, 3, 2)),
                          ("k23432", (2, 3, 4, 3, 2))):
        label = schedule[0] if len(schedule) == 1 else "{" + ",".join(map(str, schedule)) + "}"
        register_variant(f"cdd-t5-{tag}", "cdd", {"k_schedule": schedule},
                        f"Table 5 row K={label}: full CDD")
    # Table 6 (K = 3): pseudo-normal selection strategies.
    for tag in ("all", "next", "consensual"):
        register_variant(f"cdd-t6-{tag}", "cdd", {"k_schedule": (3,), "selection": tag},
                        f"Table 6 row {tag.capitalize()} (K=3): full CDD")
    # Table A1 (K = 2): r_normal with D.C., Conf.G., P.N., Conf.D. only.
    a1 = {**_OFF, "domain_construction": True, "confidence_guided": True,
          "pseudo_normal": True, "confident_distillation": True, **k2}
    for r in (0.0, 0.1, 0.3, 0.5, 0.7):
        register_variant(f"cdd-a1-r{r}", "cdd", {**a1, "r_normal": r},
                        f"Table A1 row r_normal={r} (K=2): D.C. + Conf.G. + P.N. + Conf.D.")
    # Table A2 (K = 2, its S-curve row equals Table 4's full row): lambda(e) variants.
    for tag, kind, what in (("zero", "zero", "0"), ("one", "one", "1"),
                            ("linear", "linear", "e/E"), ("scurve", "s_curve", "S-curve")):
        register_variant(f"cdd-a2-{tag}", "cdd", {**k2, "lambda_schedule": kind},
                        f"Table A2 row lambda(e)={what} (K=2): full CDD")


_register_variants()
