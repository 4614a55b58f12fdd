"""FUN-AD (Im, Son & Hong, WACV 2025): fully unsupervised anomaly detection with noisy data.

Reference semantics: HY-Vision-Lab/FUNAD at 66e0230 (``feature_extract.py``, ``model.py``,
``self_train_ad.py``), run as its README's first command (``-b 32 --k_number 2 --epoch 1500
--balancing --gaussian --kl --weight 2.5 --oto_loss mae``, no synthetic anomalies). That code
carries no licence; FUN-AD is limited to non-commercial use and has a patent application
pending (its README), so users must check its terms. The code below is this harness's own;
no line of the reference is reused.

1. Features, once per image: a frozen DINO ViT-B/8 (timm ``vit_base_patch8_224.dino``), the last
   block's normalised tokens; every patch is described by [CLS token, patch token] (2 x 768 =
   1,536 values at 28 x 28 patches for 224 px). Widths and grid follow from the model
   (:mod:`methods.vit`).
2. A per-patch MLP (:class:`FunADNet`): adaptor Linear(D, D) + LeakyReLU(0.2), discriminator
   D -> 1024 -> 128 -> 1 with LeakyReLU(0.2) and a sigmoid; 4,066,049 parameters at D = 1,536.
3. Every iteration (batch of 32 images, RMSprop lr 2e-5, momentum 0.2):
   a. iteratively rebuilt memory bank: score every training image (max patch score), min-max
      normalise over the training set, draw half of the images below 0.5 without replacement;
      all their adapted patches form the bank (:func:`select_bank_images`);
   b. pseudo-labels: each batch patch's squared L2 distance to its nearest bank patch, the patch
      itself excluded (:func:`bank_distances`), min-max normalised over the batch, > 0.5;
   c. Gaussian perturbation of the raw input of the patches whose normalised distance lies in
      (0.5, 0.9), noise std per dimension = max over positions of the std across the batch
      (:func:`perturb`);
   d. loss = balanced BCE on the perturbed input's scores (:func:`balanced_bce`) + 2.5 x the
      mutual-neighbour smoothness (:func:`mutual_pairs`, :func:`smoothness_loss`).
4. Inference uses no bank: image score = max of the raw patch scores; map = patch scores
   resized bilinearly to the image, Gaussian sigma 4.

Where this departs from the reference code, and why, is in ``docs/funad.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UserError
from methods import coreset as cs
from methods.backbones import random_teacher_seed
from methods.base import (
    EpochObserver,
    Method,
    Prediction,
    TrainSet,
    check_image_batch,
    register_method,
    register_variant,
)
from methods.rd import gaussian_blur
from methods.vit import DEFAULT_VIT, ViTTokens, build_vit, parse_overrides, vit_weights_id

STATE_FORMAT = "funad/1"
# Discriminator widths after the adaptor: model.py localnet (Linear(D,1024), Linear(1024,128)).
HIDDEN_DIMS = (1024, 128)
LEAKY_SLOPE = 0.2  # model.py nn.LeakyReLU(.2)
# Parameters of the MLP at the DINO ViT-B/8 width (2 x 768): model.py localnet(1536).
PAPER_MLP_PARAMETERS = 4_066_049
LICENCE_NOTE = ("FUN-AD (HY-Vision-Lab/FUNAD): no licence file, commercial use excluded, patent "
                "pending; check its terms before use")
# Config fields that change speed or memory only: a saved model loads whatever they are.
_RESULT_NEUTRAL_FIELDS = ("feature_batch_size", "score_batch_size", "budget_mb")


@dataclass(frozen=True)
class FunADConfig:
    """FUN-AD settings; defaults are the official code's (README command, self_train_ad.py)."""

    # Backbone: feature_extract.py torch.hub 'dino_vitb8'; timm's port of the same DINO weights.
    vit_model: str = DEFAULT_VIT
    # timm architecture overrides "key=value" (harness: a tiny random ViT for tests and smoke
    # runs, e.g. embed_dim=32,depth=1,num_heads=2); empty for the real model.
    vit_overrides: tuple[str, ...] = ()
    # Backbone weights (harness): "" = the run's teacher weights ('imagenet' = the model's hub
    # weights, i.e. DINO's); else 'imagenet', 'random', 'random:N' or a state_dict file.
    backbone_weights: str = ""
    # Epochs: README command `--epoch 1500` (argparse default 200 = variant funad-e200).
    epochs: int = 1500
    # Optional cap on optimiser steps for small runs (harness budget; not in the code).
    max_steps: int | None = None
    # Images per batch: README `-b 32`; DataLoader(shuffle=True, drop_last=True).
    batch_size: int = 32
    # RMSprop: self_train_ad.py `lr=2e-5` (argparse default), `momentum=0.2`.
    lr: float = 2e-5
    momentum: float = 0.2
    # Bank candidates: self_train_ad.py `_idx = np.where(_s_stack < 0.5)` (normalised scores).
    candidate_threshold: float = 0.5
    # Share of the candidates drawn into the bank: argparse `--random 0.5`.
    bank_fraction: float = 0.5
    # Squared distances below this count as the patch itself: `distance[distance < 1e-2] = 0`.
    zero_distance: float = 1e-2
    # Pseudo-label threshold on the normalised distance: argparse `--threshold 0.5`.
    label_threshold: float = 0.5
    # Gaussian perturbation of the mid band: README `--gaussian`; upper edge `--noise_threshold`.
    gaussian: bool = True
    noise_threshold: float = 0.9
    # BCE over positives and negatives separately: README `--balancing`.
    balancing: bool = True
    # Mutual-neighbour smoothness weight: README `--kl --weight 2.5 --oto_loss mae` (0 = off).
    smooth_weight: float = 2.5
    # Scores the smoothness term sees. The code perturbs the batch in place (the perturbed copy
    # shares the batch's storage), so both terms see the perturbed input: "perturbed". "clean"
    # runs a second forward on the unperturbed input (the evident intent; docs/funad.md).
    smooth_scores: Literal["perturbed", "clean"] = "perturbed"
    # Gaussian smoothing of the map: self_train_ad.py `gaussian_filter(_map, sigma=4)`.
    gaussian_sigma: float = 4.0
    # Speed and memory switches (harness; results equal up to floating point):
    # storage of the backbone tokens (the code keeps float32 .npy files).
    feature_dtype: Literal["float16", "float32"] = "float16"
    # images per backbone forward while extracting features and in predict().
    feature_batch_size: int = 32
    # images per chunk when the whole training set is scored for the bank (code: 32).
    score_batch_size: int = 64
    # largest distance block of the chunked exact nearest-neighbour searches, in MiB.
    budget_mb: float = 256.0

    def __post_init__(self):
        def bad(name: str, why: str) -> UserError:
            return UserError(f"funad config {name}={getattr(self, name)!r} {why}")

        if not self.vit_model:
            raise bad("vit_model", "must name a timm ViT, e.g. " + DEFAULT_VIT)
        parse_overrides(self.vit_overrides)
        for name in ("epochs", "batch_size", "feature_batch_size", "score_batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.batch_size < 2:
            raise bad("batch_size", "must be at least 2 (the noise std is taken across the "
                      "batch)")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", "must be at least 1 or None")
        floats = {
            # name: (low, high, low inclusive, high inclusive)
            "lr": (0.0, math.inf, False, False),
            "momentum": (0.0, 1.0, True, False),
            "candidate_threshold": (0.0, 1.0, False, True),
            "bank_fraction": (0.0, 1.0, False, True),
            "zero_distance": (0.0, math.inf, True, False),
            "label_threshold": (0.0, 1.0, True, False),
            "noise_threshold": (0.0, 1.0, True, True),
            "smooth_weight": (0.0, math.inf, True, False),
            "gaussian_sigma": (0.0, math.inf, True, False),
            "budget_mb": (0.0, math.inf, False, False),
        }
        for name, (low, high, low_in, high_in) in floats.items():
            value = getattr(self, name)
            if not math.isfinite(value):
                raise bad(name, "must be a finite number")
            if value < low or (value == low and not low_in) or value > high or (
                value == high and not high_in
            ):
                lo, hi = "[" if low_in else "(", "]" if high_in else ")"
                raise bad(name, f"must lie in {lo}{low:g}, {high:g}{hi}")
        if self.gaussian and self.noise_threshold <= self.label_threshold:
            raise bad("noise_threshold", f"must exceed label_threshold={self.label_threshold} "
                      "(the perturbed band is (label_threshold, noise_threshold)); or set "
                      "gaussian=false")


# --------------------------------------------------------------------------------------------
# Network


class FunADNet(nn.Module):
    """model.py ``localnet``: per-patch adaptor + discriminator.

    ``forward(x)`` on (..., D) inputs returns (adapted features (..., D), scores (...) in [0, 1]).
    """

    def __init__(self, in_dim: int, hidden: tuple[int, int] = HIDDEN_DIMS):
        super().__init__()
        self.in_dim = int(in_dim)
        self.adaptor = nn.Sequential(nn.Linear(in_dim, in_dim), nn.LeakyReLU(LEAKY_SLOPE))
        self.discriminator = nn.Sequential(
            nn.Linear(in_dim, hidden[0]), nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(hidden[0], hidden[1]), nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(hidden[1], 1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        adapted = self.adaptor(x)
        return adapted, self.discriminator(adapted).squeeze(-1)


def build_net(in_dim: int, seed: int) -> FunADNet:
    """A FunADNet with torch's default initialisation drawn from ``seed`` (global RNG untouched;
    the reference builds it unseeded, before its per-category ``fix_seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FunADNet(in_dim)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# The steps of one iteration, as functions of tensors (tested one by one).


def min_max(values: torch.Tensor) -> torch.Tensor:
    """(v - min) / (max - min); all zeros when max == min (the code's guard for distances)."""
    low, high = values.min(), values.max()
    if bool(high == low):
        return torch.zeros_like(values)
    return (values - low) / (high - low)


def select_bank_images(image_scores: torch.Tensor, candidate_threshold: float, fraction: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Indices of the training images whose patches form this iteration's memory bank.

    Images with min-max normalised score below ``candidate_threshold`` are candidates;
    ``int(fraction * candidates)`` of them are drawn without replacement (at least one, see
    docs/funad.md). Returns (drawn indices (CPU, long, in drawing order), number of candidates).
    """
    scores = image_scores.detach().float().cpu()
    candidates = (min_max(scores) < candidate_threshold).nonzero().flatten()
    count = max(1, int(candidates.numel() * fraction))
    order = torch.randperm(candidates.numel(), generator=generator)[:count]
    return candidates[order], int(candidates.numel())


def bank_distances(queries: torch.Tensor, bank: torch.Tensor, self_rows: torch.Tensor | None,
                   zero_distance: float, *, bank_sq_norms: torch.Tensor | None = None,
                   budget_mb: float = cs.DEFAULT_BUDGET_MB) -> torch.Tensor:
    """Squared L2 distance (Q,) of each query to its nearest bank row other than itself.

    As the code: the two nearest rows are searched (exactly, chunked on the queries' device);
    distances below ``zero_distance`` become 0, and a first distance of 0 is replaced by the
    second. ``self_rows`` (Q,) names each query's own bank row (-1 when its image is not in the
    bank); that row counts as distance 0 whatever the rounding, so the patch never matches
    itself.
    """
    k = min(2, bank.shape[0])
    dist, idx = cs.nearest_neighbors(queries, bank, k, squared=True, bank_sq_norms=bank_sq_norms,
                                     budget_mb=budget_mb)
    if self_rows is not None:
        dist = dist.masked_fill(idx == self_rows[:, None], 0.0)
    dist = dist.masked_fill(dist < zero_distance, 0.0)
    if k == 1:
        return dist[:, 0]
    return torch.where(dist[:, 0] == 0, dist[:, 1], dist[:, 0])


def pseudo_labels(distances: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances min-max normalised over the batch, labels = normalised > threshold as float)."""
    normalised = min_max(distances)
    return normalised, (normalised > threshold).float()


def perturbation_band(normalised: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Patches whose normalised distance lies strictly between ``low`` and ``high``."""
    return (normalised > low) & (normalised < high)


def perturb(x: torch.Tensor, band: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A copy of the batch inputs ``x`` (B, P, D) with Gaussian noise on the ``band`` (B, P)
    patches; the std of dimension d is the max over the P positions of the (unbiased) std of
    x[:, p, d] across the B images. ``generator`` lives on ``x``'s device."""
    out = x.clone()
    n_band = int(band.sum())
    if n_band == 0:
        return out
    std = x.std(dim=0).amax(dim=0)  # (D,)
    noise = torch.randn((n_band, x.shape[-1]), generator=generator, device=x.device,
                        dtype=x.dtype)
    out[band] += noise * std
    return out


def balanced_bce(scores: torch.Tensor, labels: torch.Tensor, skip_positive: bool,
                 balancing: bool = True) -> torch.Tensor:
    """BCE of ``scores`` against ``labels``; balanced = mean over the positives + mean over the
    negatives (each term skipped when it has no patch; the code skips the positive one when every
    normalised distance is 0, ``skip_positive``). Unbalanced: one mean over every patch."""
    scores, labels = scores.reshape(-1), labels.reshape(-1)
    if not balancing:
        return F.binary_cross_entropy(scores, labels)
    positive = labels > 0.5
    loss = scores.new_zeros(())
    if not skip_positive and bool(positive.any()):
        loss = loss + F.binary_cross_entropy(scores[positive], labels[positive])
    if bool((~positive).any()):
        loss = loss + F.binary_cross_entropy(scores[~positive], labels[~positive])
    return loss


def nearest_other(features: torch.Tensor, budget_mb: float = cs.DEFAULT_BUDGET_MB
                  ) -> torch.Tensor:
    """Index (n,) of each row's nearest other row (squared L2, exact, chunked), self excluded
    by index (the code takes the second of two neighbours, assuming the first is the row)."""
    _, idx = cs.nearest_neighbors(features, features, 2, squared=True, budget_mb=budget_mb)
    rows = torch.arange(features.shape[0], device=features.device)
    return torch.where(idx[:, 0] == rows, idx[:, 1], idx[:, 0])


def mutual_pairs(nearest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest-neighbour pairs (i, j), each once, i < j, in increasing i.

    The vectorised form of the code's ``find_matching`` loop (which keeps i when
    ``nearest[nearest[i]] == i`` and i was not already taken as a partner).
    """
    rows = torch.arange(nearest.shape[0], device=nearest.device)
    first = (nearest[nearest] == rows) & (rows < nearest)
    return rows[first], nearest[first]


def smoothness_loss(scores: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """0.5 [L1(s_j, m) + L1(s_i, m)] with m = (s_i + s_j) / 2 over the pairs (``--oto_loss
    mae``; equals 0.5 mean |s_i - s_j|); 0 without pairs. No stop-gradient, as the code."""
    flat = scores.reshape(-1)
    if i.numel() == 0:
        return flat.new_zeros(())
    a, b = flat[i], flat[j]
    mid = (a + b) / 2
    return 0.5 * (F.l1_loss(b, mid) + F.l1_loss(a, mid))


@dataclass(frozen=True)
class PatchTokens:
    """Backbone tokens of a set of images: class (N, E) and patches (N, P, E), stored once."""

    cls: torch.Tensor
    patches: torch.Tensor
    grid: tuple[int, int]

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    @property
    def dim(self) -> int:
        """Width of one patch descriptor, 2 E."""
        return 2 * int(self.patches.shape[-1])

    def inputs(self, index: torch.Tensor | slice) -> torch.Tensor:
        """float32 descriptors [CLS, patch] (n, P, 2E) of the images ``index``."""
        patches = self.patches[index].float()
        cls = self.cls[index].float()[:, None, :].expand(-1, patches.shape[1], -1)
        return torch.cat([cls, patches], dim=-1)


# --------------------------------------------------------------------------------------------
# The method


@register_method
class FunAD(Method):
    """FUN-AD: a per-patch MLP trained with an iteratively rebuilt memory bank (module doc).

    ``fit`` extracts the backbone tokens of every training image once and trains on them
    (:meth:`fit_features`). Randomness, all from ``seed``: the MLP's initialisation, the batch
    order and the bank draws (CPU ``torch.Generator``), the perturbation noise (a generator on
    the training device).

    Observer, after each epoch: scalars ``loss`` (mean total loss of the epoch's iterations),
    ``bce``, ``smooth``, ``steps``, ``bank_images``, ``candidates``, ``positive_fraction``
    (pseudo-positive share of the batch patches), ``band_fraction`` (perturbed share) and
    ``mutual_pairs`` (pairs per batch), all means over the epoch; per-sample arrays
    ``image_score`` (normalised image score at the epoch's last bank rebuild) and ``bank_rate``
    (share of the epoch's iterations in which the image was in the bank).
    """

    name = "funad"
    Config = FunADConfig
    display_name = paper_name = "FUN-AD"
    column_rank = 70
    # The paper's backbone and no step cap; the epoch budget CDD ran is open (1,500 or 200).
    paper_setup = {"vit_model": DEFAULT_VIT, "vit_overrides": (), "max_steps": None}
    smoke_overrides = {"vit_overrides": ("embed_dim=32", "depth=1", "num_heads=2"),
                       "epochs": 1, "max_steps": 2, "batch_size": 4}

    @classmethod
    def weights_check(cls, config: FunADConfig, teacher_weights: str):
        """The ViT's weights (random ones need no check): :func:`check_backbone_weights`."""
        weights = config.backbone_weights or teacher_weights
        if random_teacher_seed(weights) is not None:
            return None
        key = ("timm", config.vit_model, weights, tuple(config.vit_overrides))
        return key, lambda: check_backbone_weights(config, teacher_weights)

    def __init__(self, config: FunADConfig | None = None, *, teacher_weights: str = "imagenet",
                 device: str | torch.device = "cpu", seed: int = 0):
        super().__init__(config, teacher_weights=teacher_weights, device=device, seed=seed)
        self.backbone: ViTTokens | None = None
        self.net: FunADNet | None = None
        self.fit_stats: dict[str, Any] = {}
        self._last_image_score = None  # normalised image scores at the latest bank rebuild
        # Seconds per training stage, summed over iterations, when set to a dict (benchmarks).
        self.stage_seconds: dict[str, float] | None = None

    # -- backbone and features -------------------------------------------------------------

    @property
    def backbone_weights(self) -> str:
        """The weights the backbone is built from: the config's, else the run's teacher's."""
        return self.config.backbone_weights or self.teacher_weights

    def _backbone_id(self) -> str:
        if self.backbone is not None:
            return self.backbone.weights_id
        return vit_weights_id(self.config.vit_model, self.backbone_weights)

    def _build_backbone(self) -> ViTTokens:
        if self.backbone is None:
            cfg = self.config
            vit = build_vit(cfg.vit_model, self.backbone_weights, cfg.vit_overrides)
            self.backbone = vit.to(self.device)
        return self.backbone

    def extract(self, images: torch.Tensor) -> PatchTokens:
        """Backbone tokens of uint8 images (N, 3, H, W), stored in ``feature_dtype`` on the
        method's device."""
        check_image_batch(images, f"{self.name}.extract")
        backbone = self._build_backbone()
        grid = backbone.grid(images.shape[-2], images.shape[-1])
        dtype = getattr(torch, self.config.feature_dtype)
        n, step = images.shape[0], self.config.feature_batch_size
        n_patches = grid[0] * grid[1]
        cls = torch.empty((n, backbone.embed_dim), dtype=dtype, device=self.device)
        patches = torch.empty((n, n_patches, backbone.embed_dim), dtype=dtype, device=self.device)
        for start in range(0, n, step):
            c, p = backbone(images[start:start + step])
            cls[start:start + c.shape[0]] = c.to(dtype)
            patches[start:start + c.shape[0]] = p.to(dtype)
        return PatchTokens(cls, patches, grid)

    # -- training --------------------------------------------------------------------------

    def fit(self, train: TrainSet, observer: EpochObserver | None = None) -> None:
        """Extract the training images' tokens once, then :meth:`fit_features`."""
        if len(train) == 0:
            raise UserError(f"{self.name}: the training set is empty; check the train folder")
        self._check_batch(len(train))
        self.fit_features(self.extract(train.images), observer)

    def _check_batch(self, n: int) -> None:
        if n < self.config.batch_size:
            raise UserError(
                f"{self.name}: {n} training images are fewer than batch_size="
                f"{self.config.batch_size}; the batches drop the incomplete last one (as the "
                f"official code), so nothing would train; set batch_size to at most {n}"
            )

    def fit_features(self, tokens: PatchTokens, observer: EpochObserver | None = None) -> None:
        """Train the MLP on stored tokens (what :meth:`fit` does after the extraction).

        Stops after ``epochs`` epochs or ``max_steps`` steps, whichever is first; the last
        state is kept (no checkpoint is chosen on test data).
        """
        cfg = self.config
        n, n_patches, dim = len(tokens), tokens.patches.shape[1], tokens.dim
        self._check_batch(n)
        self.net = net = build_net(dim, self.seed).to(self.device)
        optimizer = torch.optim.RMSprop(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        order_gen = torch.Generator().manual_seed(self.seed)
        noise_gen = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        adapted = torch.empty((n, n_patches, dim), dtype=torch.float32, device=self.device)
        patch_pos = torch.arange(n_patches, device=self.device)
        steps, per_epoch = 0, n // cfg.batch_size
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=order_gen)
            sums: dict[str, float] = {}
            in_bank = torch.zeros(n)
            done = 0
            for b in range(per_epoch):
                index = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                stats = self._iteration(net, optimizer, tokens, adapted, index, patch_pos,
                                        order_gen, noise_gen, in_bank)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                done += 1
                steps += 1
                if cfg.max_steps is not None and steps >= cfg.max_steps:
                    break
            scalars = {key: value / done for key, value in sums.items()}
            if not math.isfinite(scalars["loss"]):
                raise FloatingPointError(f"{self.name}: loss became {scalars['loss']} at epoch "
                                         f"{epoch}")
            scalars["steps"] = float(steps)
            self.fit_stats = {"epochs_run": epoch + 1, **scalars,
                              "grid": list(tokens.grid), "feature_dim": dim}
            if observer is not None:
                per_sample = {"image_score": self._last_image_score,
                              "bank_rate": (in_bank / done).numpy()}
                observer(epoch, scalars, per_sample)
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        net.eval()

    @torch.no_grad()
    def _score_all(self, net: FunADNet, tokens: PatchTokens, adapted: torch.Tensor
                   ) -> torch.Tensor:
        """Adapted features of every training patch (into ``adapted``) and each image's max
        patch score (N,), with the current weights."""
        n, step = len(tokens), self.config.score_batch_size
        scores = torch.empty(n, device=self.device)
        for start in range(0, n, step):
            feats, patch_scores = net(tokens.inputs(slice(start, start + step)))
            adapted[start:start + feats.shape[0]] = feats
            scores[start:start + feats.shape[0]] = patch_scores.amax(dim=1)
        return scores

    def _iteration(self, net, optimizer, tokens, adapted, index, patch_pos, order_gen,
                   noise_gen, in_bank) -> dict[str, float]:
        """One optimiser step on the images ``index`` (CPU long (B,)); returns its scalars."""
        cfg = self.config
        n_patches, dim = adapted.shape[1], adapted.shape[2]
        net.eval()  # no dropout or BatchNorm: the mode changes nothing, as in the code
        with self._stage("score_pass"):
            # (a) the memory bank from this iteration's weights
            image_scores = self._score_all(net, tokens, adapted)
            drawn, n_candidates = select_bank_images(image_scores, cfg.candidate_threshold,
                                                     cfg.bank_fraction, order_gen)
            self._last_image_score = min_max(image_scores.float().cpu()).numpy()
            in_bank[drawn] += 1
            drawn_dev = drawn.to(self.device)
            bank = adapted.index_select(0, drawn_dev).reshape(-1, dim)
        with self._stage("bank_search"), torch.no_grad():
            # (b) pseudo-labels from the batch's adapted features (the same rows and weights)
            index_dev = index.to(self.device)
            queries = adapted.index_select(0, index_dev).reshape(-1, dim)
            slot = torch.full((adapted.shape[0],), -1, dtype=torch.long, device=self.device)
            slot[drawn_dev] = torch.arange(drawn.numel(), device=self.device)
            batch_slot = slot[index_dev][:, None]
            self_rows = torch.where(batch_slot >= 0, batch_slot * n_patches + patch_pos, -1)
            dist = bank_distances(queries, bank, self_rows.reshape(-1), cfg.zero_distance,
                                  budget_mb=cfg.budget_mb)
            normalised, labels = pseudo_labels(dist, cfg.label_threshold)
            skip_positive = not bool((normalised != 0).any())
            del bank
        with self._stage("matching"), torch.no_grad():
            # mutual nearest neighbours among the batch's own adapted patches
            pairs = (mutual_pairs(nearest_other(queries, cfg.budget_mb))
                     if cfg.smooth_weight > 0 else None)
            del queries
        with self._stage("step"):
            # (c) perturbation of the raw descriptors in the mid band
            x = tokens.inputs(index_dev)
            band = torch.zeros(normalised.shape, dtype=torch.bool, device=self.device)
            x_train = x
            if cfg.gaussian:
                band = perturbation_band(normalised, cfg.label_threshold, cfg.noise_threshold)
                x_train = perturb(x, band.view(x.shape[:2]), noise_gen)
            # (d) loss and step
            net.train()
            _, scores = net(x_train)
            bce = balanced_bce(scores, labels, skip_positive, cfg.balancing)
            smooth = scores.new_zeros(())
            if pairs is not None:
                smooth_scores = scores
                if cfg.smooth_scores == "clean" and cfg.gaussian:
                    smooth_scores = net(x)[1]
                smooth = smoothness_loss(smooth_scores, *pairs)
            loss = bce + cfg.smooth_weight * smooth
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scalars = {
                "loss": float(loss.detach()),
                "bce": float(bce.detach()),
                "smooth": float(smooth.detach()),
                "bank_images": float(drawn.numel()),
                "candidates": float(n_candidates),
                "positive_fraction": float(labels.mean()),
                "band_fraction": float(band.float().mean()),
                "mutual_pairs": float(0 if pairs is None else pairs[0].numel()),
            }
        return scalars

    @contextlib.contextmanager
    def _stage(self, name: str):
        """Add the stage's wall time (device work included) to ``stage_seconds`` when that is a
        dict (benchmarks/bench_funad.py); no synchronisation otherwise."""
        if self.stage_seconds is None:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - start

    # -- inference -------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int | None = None) -> Prediction:
        """Scores (N,) = max raw patch score; maps (N, H, W) = patch scores resized bilinearly
        (cv2.resize, i.e. align_corners=False) to the image, then Gaussian ``gaussian_sigma``."""
        check_image_batch(images, f"{self.name}.predict")
        if self.net is None:
            raise RuntimeError(f"{self.name}: predict() needs fit() or load_state_dict() first")
        self.net.eval()
        n, _, h, w = images.shape
        step = max(1, int(batch_size or self.config.feature_batch_size))
        scores = torch.empty(n, dtype=torch.float32, device=self.device)
        maps = torch.empty((n, h, w), dtype=torch.float32, device=self.device)
        for start in range(0, n, step):
            tokens = self.extract(images[start:start + step])
            _, patch_scores = self.net(tokens.inputs(slice(None)))
            scores[start:start + len(tokens)] = patch_scores.amax(dim=1)
            grid = patch_scores.view(len(tokens), 1, *tokens.grid)
            upsampled = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            maps[start:start + len(tokens)] = gaussian_blur(upsampled[:, 0],
                                                            self.config.gaussian_sigma)
        return Prediction(scores=scores.cpu().numpy(), maps=maps.cpu().numpy())

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """MLP weights (CPU) + config, seed and the backbone's weights id."""
        if self.net is None:
            raise RuntimeError(f"{self.name}: state_dict() needs fit() first")
        return {
            "format": STATE_FORMAT,
            "method": self.name,
            "config": dataclasses.asdict(self.config),
            "teacher_weights": self.teacher_weights,
            "seed": self.seed,
            "backbone_weights_id": self._backbone_id(),
            "in_dim": self.net.in_dim,
            "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "fit_stats": dict(self.fit_stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the backbone must resolve to the same weights id."""
        if state.get("format") != STATE_FORMAT or state.get("method") != self.name:
            raise UserError(f"{self.name}: the saved state is not a {self.name} model (format "
                            f"{state.get('format')!r}, method {state.get('method')!r})")
        self.config = self.config_from_dict(state["config"])
        self.teacher_weights = str(state["teacher_weights"])
        self.seed = int(state["seed"])
        self.backbone = None
        if self._backbone_id() != state["backbone_weights_id"]:
            raise UserError(
                f"{self.name}: backbone weights {self.backbone_weights!r} now give "
                f"{self._backbone_id()}, but the saved model was trained on "
                f"{state['backbone_weights_id']}; restore those weights"
            )
        net = FunADNet(int(state["in_dim"]))
        net.load_state_dict(state["net"])
        self.net = net.to(self.device).eval()
        self.fit_stats = dict(state.get("fit_stats", {}))

    def describe(self) -> dict[str, Any]:
        """Base provenance + backbone, its weights id, whether it is random, and FUN-AD's terms."""
        info = super().describe()
        cfg = self.config
        wid = self._backbone_id()
        random_backbone = wid.startswith("random:")
        info.update(
            backbone=cfg.vit_model,
            backbone_overrides=list(cfg.vit_overrides),
            backbone_weights=self.backbone_weights,
            backbone_weights_id=wid,
            teacher_weights_id=wid,
            random_backbone=random_backbone,
            paper_backbone=cfg.vit_model == DEFAULT_VIT and not cfg.vit_overrides
            and wid.startswith("hub:"),
            mlp_parameters=None if self.net is None else count_parameters(self.net),
            licence=LICENCE_NOTE,
        )
        if random_backbone:
            info["note"] = ("randomly initialised backbone: for tests and smoke runs only, not "
                            "comparable with any published FUN-AD number")
        if self.fit_stats.get("grid"):
            info["feature_grid"] = list(self.fit_stats["grid"])
            info["feature_dim"] = self.fit_stats.get("feature_dim")
        return info


def check_backbone_weights(config: FunADConfig, teacher_weights: str) -> None:
    """Build the backbone a run would use and drop it: offline hub weights, a file of the wrong
    network or a broken cache show here as one line, before anything trains."""
    weights = config.backbone_weights or teacher_weights
    if random_teacher_seed(weights) is None:
        build_vit(config.vit_model, weights, config.vit_overrides)


# --------------------------------------------------------------------------------------------
# Variants

register_variant(
    "funad-e200", "funad", {"epochs": 200},
    "FUN-AD with the script's argparse default of 200 epochs (the README runs 1,500); one "
    "reading of CDD's '200 epochs' (CDD §5.2)",
    label="FUN-AD (200 ep.)",
)
