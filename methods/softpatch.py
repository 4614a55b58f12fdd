"""SoftPatch and PatchCore: memory-bank anomaly detection on frozen teacher patch features.

SoftPatch (Jiang et al., NeurIPS 2022; reference code TencentYoutuResearch/AnomalyDetection-
SoftPatch, ``src/softpatch.py``, ``src/sampler.py``, ``src/common.py``, ``main.py``) is PatchCore
(Roth et al., CVPR 2022) with patch-level denoising for noisy training sets:

1. Patch features: layer2 and layer3 of an ImageNet WideResNet-50; every position is replaced
   by its 3x3 neighbourhood (zero padded), layer3 is bilinearly resized to the layer2 grid, each
   layer's neighbourhood vector is average-pooled to ``pretrain_embed_dimension`` and the
   concatenation to ``target_embed_dimension`` (1024) values (:func:`patch_features`).
2. Noise discriminator: features are randomly projected to 128 dimensions; for every spatial
   position, the patches of all training images at that position are scored by an outlier
   detector (LOF by default, or nearest-neighbour distance, or Mahalanobis distance).
3. Denoising: patches scoring above the (1 - 0.15) quantile over the whole training set are
   excluded from the memory bank.
4. Greedy coreset (10 %) of the remaining patches in the projected space; the bank keeps their
   full features and, as soft weights, their outlier scores.
5. Scoring: a test patch's score is its squared L2 distance to the nearest bank patch times that
   bank patch's soft weight; the image score is the maximum patch score; the anomaly map is the
   patch-score grid resized bilinearly to the input and smoothed with a Gaussian (sigma 4).

PatchCore is the same code path with the discriminator, the removal and the weights off.
Where this module departs from the reference code, and why, is in ``docs/softpatch.md``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import UserError
from methods import coreset as cs
from methods.backbones import build_teacher, check_backbone, teacher_check, weights_id
from methods.base import (
    EpochObserver,
    Method,
    Prediction,
    TrainSet,
    check_image_batch,
    register_method,
)

STATE_FORMAT = "softpatch-bank/1"
# Config fields that change speed and memory, never a result: a saved bank loads whatever they are.
_RESULT_NEUTRAL_FIELDS = ("batch_size", "budget_mb")


@dataclass(frozen=True)
class SoftPatchConfig:
    """SoftPatch hyperparameters; defaults are the reference code's (file named per field)."""

    backbone: str = "wide_resnet50_2"  # main.py --backbone_names wideresnet50
    layers: tuple[int, ...] = (2, 3)  # main.py --layers_to_extract_from layer2 layer3
    patchsize: int = 3  # softpatch.py load(patchsize=3), stride 1
    pretrain_embed_dimension: int = 1024  # softpatch.py load()
    target_embed_dimension: int = 1024  # softpatch.py load()
    coreset_ratio: float = 0.1  # main.py --sampling_ratio 0.1
    coreset_init: Literal["approx", "exact"] = "approx"  # main.py approx_greedy_coreset
    coreset_starts: int = 10  # sampler.py number_of_starting_points
    projection_dim: int = 128  # sampler.py dimension_to_project_features_to
    noise_discriminator: Literal["lof", "nearest", "gaussian", "none"] = "lof"  # --weight_method
    # softpatch.py load(lof_k=5): main.py's --lof_k 6 is passed as LOF_k and never arrives.
    lof_k: int = 5
    denoise_ratio: float = 0.15  # main.py --threshold 0.15 (fraction of patches removed)
    soft_weight: bool = True  # main.py: soft weights on unless --without_soft_weight
    num_nn: int = 1  # softpatch.py load(anomaly_score_num_nn=1)
    squared_distance: bool = True  # common.py FaissNN: IndexFlatL2 returns squared L2
    sigma: float = 4.0  # common.py RescaleSegmentor.smoothing
    batch_size: int = 32  # images per feature-extraction batch (throughput only)
    budget_mb: float = 256.0  # largest distance block in the chunked searches (memory only)


@dataclass(frozen=True)
class PatchCoreConfig(SoftPatchConfig):
    """PatchCore = SoftPatch without denoising (patchcore-inspection's IM224 settings)."""

    noise_discriminator: Literal["lof", "nearest", "gaussian", "none"] = "none"
    denoise_ratio: float = 0.0
    soft_weight: bool = False


def check_config(config: SoftPatchConfig, method: str) -> None:
    """Raise a one-line UserError for a config that cannot run."""

    def bad(field: str, why: str) -> UserError:
        return UserError(f"{method}: config field {field!r} = {getattr(config, field)!r} {why}")

    check_backbone(config.backbone)
    if not config.layers or any(layer not in (1, 2, 3) for layer in config.layers):
        raise bad("layers", "must name teacher layers among 1, 2, 3 (e.g. 2,3)")
    if config.patchsize < 1 or config.patchsize % 2 == 0:
        raise bad("patchsize", "must be an odd number >= 1")
    for field in ("pretrain_embed_dimension", "target_embed_dimension", "projection_dim",
                  "coreset_starts", "lof_k", "num_nn", "batch_size"):
        if getattr(config, field) < 1:
            raise bad(field, "must be >= 1")
    if not 0.0 < config.coreset_ratio <= 1.0:
        raise bad("coreset_ratio", "must be in (0, 1]")
    if not 0.0 <= config.denoise_ratio < 1.0:
        raise bad("denoise_ratio", "must be in [0, 1)")
    if config.sigma < 0 or config.budget_mb <= 0:
        raise bad("sigma" if config.sigma < 0 else "budget_mb", "must be positive")
    if config.noise_discriminator == "none" and (config.denoise_ratio > 0 or config.soft_weight):
        raise bad(
            "noise_discriminator",
            "cannot drive denoise_ratio > 0 or soft_weight; pick lof, nearest or gaussian, "
            "or set denoise_ratio=0 and soft_weight=false",
        )


def patch_features(
    feats: list[torch.Tensor], patchsize: int, pretrain_dim: int, target_dim: int
) -> torch.Tensor:
    """Locally aggregated patch features (B, h, w, target_dim) on the first map's grid.

    Each map (B, C, h_l, w_l) becomes its zero-padded ``patchsize`` x ``patchsize``
    neighbourhoods (B, C*p*p, h_l, w_l), ordered (channel, row, column); each position's vector
    is adaptive-average-pooled to ``pretrain_dim``; maps coarser than the first are resized
    bilinearly (align_corners=False) to its grid; the layers are concatenated and pooled again
    to ``target_dim``. This is PatchCore's Preprocessing + Aggregator.
    """
    batch, _, height, width = feats[0].shape
    pad = (patchsize - 1) // 2
    pooled = []
    for feat in feats:
        h, w = feat.shape[-2:]
        hood = F.unfold(feat, kernel_size=patchsize, padding=pad)  # (B, C*p*p, h*w)
        vectors = hood.transpose(1, 2).reshape(batch * h * w, 1, -1)
        layer = F.adaptive_avg_pool1d(vectors, pretrain_dim).view(batch, h, w, pretrain_dim)
        if (h, w) != (height, width):
            # Channel pooling and spatial resizing are both linear and act on different axes,
            # so pooling first (at the coarse grid) equals the reference's resize-then-pool
            # with a quarter of the memory for layer3.
            layer = F.interpolate(
                layer.permute(0, 3, 1, 2), size=(height, width), mode="bilinear",
                align_corners=False,
            ).permute(0, 2, 3, 1)
        pooled.append(layer.reshape(batch * height * width, 1, pretrain_dim))
    stacked = torch.cat(pooled, dim=2)  # (BHW, 1, n_layers * pretrain_dim)
    return F.adaptive_avg_pool1d(stacked, target_dim).view(batch, height, width, target_dim)


@register_method
class SoftPatch(Method):
    """SoftPatch: PatchCore memory bank with patch-level denoising and soft re-weighting.

    After :meth:`fit`: ``bank`` (K, D) float32 on the method's device, ``bank_weight`` (K,)
    soft weights or None, and ``fit_stats`` (the scalars given to the observer).
    """

    name = "softpatch"
    Config = SoftPatchConfig
    display_name = paper_name = "SoftPatch"
    column_rank = 40
    paper_setup = {"backbone": "wide_resnet50_2"}
    smoke_overrides = {"backbone": "resnet18", "coreset_starts": 2}

    def __init__(
        self,
        config: Any = None,
        *,
        teacher_weights: str = "imagenet",
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        super().__init__(config, teacher_weights=teacher_weights, device=device, seed=seed)
        check_config(self.config, self.name)
        self._teacher = None
        self.bank: torch.Tensor | None = None
        self.bank_weight: torch.Tensor | None = None
        self._bank_sq_norms: torch.Tensor | None = None
        self.fit_stats: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------
    # Features

    @property
    def teacher(self):
        """The frozen backbone, built on first use (so a loaded state needs no extra work)."""
        if self._teacher is None:
            self._teacher = build_teacher(self.config.backbone, self.teacher_weights).to(
                self.device
            )
        return self._teacher

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features (B, h, w, D) of uint8 images (B, 3, H, W), on the method's device."""
        feats = self.teacher(images)
        cfg = self.config
        chosen = [feats[layer - 1] for layer in cfg.layers]
        return patch_features(
            chosen, cfg.patchsize, cfg.pretrain_embed_dimension, cfg.target_embed_dimension
        )

    def _clock(self) -> float:
        """Wall time after the device's queued work (stage timings are real on CUDA too)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _batches(self, n: int, size: int):
        for start in range(0, n, size):
            yield start, min(n, start + size)

    # ---------------------------------------------------------------------------------------
    # Fit

    @torch.no_grad()
    def fit(self, train: TrainSet, observer: EpochObserver | None = None) -> None:
        """Build the (denoised, soft-weighted) coreset memory bank of ``train``."""
        cfg = self.config
        n_images = len(train)
        if n_images == 0:
            raise UserError(f"{self.name}: the training set is empty; check the category folder")
        denoise = cfg.noise_discriminator != "none"
        if denoise and n_images < 2:
            raise UserError(
                f"{self.name}: the noise discriminator compares patches across training images "
                f"and needs at least 2, got {n_images}; add images or use patchcore"
            )
        generator = torch.Generator().manual_seed(self.seed)
        timer = self._clock()
        projected, n_per_image = self._projected_features(train.images, generator)
        n_patches = projected.shape[0]
        feature_s = self._clock() - timer

        timer = self._clock()
        stats: dict[str, float] = {}
        removed = weights = per_sample = None
        if denoise:
            removed, weights, per_sample, stats["noise_score_mean"] = self._discriminate(
                projected, n_images, n_per_image)
        discriminator_s = self._clock() - timer

        timer = self._clock()
        selected = self._coreset(projected, removed, generator)
        coreset_s = self._clock() - timer
        del projected

        timer = self._clock()
        bank = self._gather_bank(train.images, selected, n_per_image)
        self._set_bank(bank, None if weights is None else weights[selected])
        gather_s = self._clock() - timer
        if cfg.num_nn > bank.shape[0]:  # say so now, not after the test set is loaded
            raise UserError(
                f"{self.name}: num_nn={cfg.num_nn} exceeds the memory bank ({bank.shape[0]} "
                f"patches); lower num_nn or raise coreset_ratio"
            )

        n_kept = n_patches - (int(removed.sum()) if removed is not None else 0)
        stats.update(
            n_patches=float(n_patches),
            removed_patches=float(n_patches - n_kept),
            bank_size=float(bank.shape[0]),
            feature_s=feature_s + gather_s,
            discriminator_s=discriminator_s,
            coreset_s=coreset_s,
        )
        if self.bank_weight is not None:
            stats["bank_weight_mean"] = float(self.bank_weight.mean())
        self.fit_stats = stats
        if observer is not None:
            observer(0, dict(stats), per_sample)

    def _projected_features(self, images: torch.Tensor, generator: torch.Generator):
        """Pass 1: the projected features of every patch, image-major (full features would be
        ~3 GB for VisA), and the patches per image. PatchCore projects only when it reduces
        the dimension."""
        cfg = self.config
        dim = cfg.target_embed_dimension
        projection = None
        if cfg.projection_dim < dim:
            projection = cs.random_projection(
                dim, cfg.projection_dim, generator=generator, device=self.device
            )
        projected, grid = [], None
        for start, stop in self._batches(len(images), cfg.batch_size):
            emb = self.embed(images[start:stop])
            grid = tuple(emb.shape[1:3])
            flat = emb.reshape(-1, dim)
            projected.append(flat @ projection if projection is not None else flat.clone())
        return torch.cat(projected), grid[0] * grid[1]

    def _discriminate(self, projected: torch.Tensor, n_images: int, n_per_image: int):
        """The noise discriminator, each position against the same position in all images:
        (removed patch mask, soft weights or None, per-sample logs, mean score)."""
        cfg = self.config
        by_position = projected.view(n_images, n_per_image, -1).transpose(0, 1)
        scores = cs.noise_scores(
            cfg.noise_discriminator, by_position, lof_k=cfg.lof_k, budget_mb=cfg.budget_mb
        ).T.reshape(-1)  # image-major, like the features
        removed = cs.noisy_patch_mask(scores, cfg.denoise_ratio)
        weights = scores.clamp(min=0) if cfg.soft_weight else None
        per_sample = {
            "patch_noise_mean": scores.view(n_images, -1).mean(1).float().cpu().numpy(),
            "patch_noise_max": scores.view(n_images, -1).amax(1).float().cpu().numpy(),
            "removed_fraction": removed.view(n_images, -1).float().mean(1).cpu().numpy(),
        }
        return removed, weights, per_sample, float(scores.mean())

    def _coreset(self, projected: torch.Tensor, removed: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        """Greedy coreset among the kept patches, in the projected space: sorted indices."""
        cfg = self.config
        n_patches = projected.shape[0]
        n_kept = n_patches - (int(removed.sum()) if removed is not None else 0)
        candidates = None if removed is None else ~removed
        if cfg.coreset_ratio >= 1.0:
            selected = torch.arange(n_patches, device=self.device)
            if candidates is not None:
                selected = selected[candidates]
        else:
            # Bank size from all patches, as the reference's sampler counts them.
            n_bank = min(n_kept, max(1, int(n_patches * cfg.coreset_ratio)))
            selected = cs.greedy_coreset(
                projected, n_bank, init=cfg.coreset_init, num_starts=cfg.coreset_starts,
                candidates=candidates, generator=generator,
            )
        return selected.sort().values

    def _gather_bank(self, images: torch.Tensor, selected: torch.Tensor,
                     n_per_image: int) -> torch.Tensor:
        """Pass 2: full features of the selected patches only (memory bounded by the bank)."""
        cfg = self.config
        dim = cfg.target_embed_dimension
        image_of = torch.div(selected, n_per_image, rounding_mode="floor")
        bank = torch.empty(selected.numel(), dim, device=self.device)
        for start, stop in self._batches(len(images), cfg.batch_size):
            rows = ((image_of >= start) & (image_of < stop)).nonzero().flatten()
            if rows.numel() == 0:
                continue
            emb = self.embed(images[start:stop]).reshape(-1, dim)
            bank[rows] = emb.index_select(0, selected[rows] - start * n_per_image)
        return bank

    def _set_bank(self, bank: torch.Tensor, weight: torch.Tensor | None) -> None:
        self.bank = bank.to(self.device, torch.float32)
        self.bank_weight = None if weight is None else weight.to(self.device, torch.float32)
        self._bank_sq_norms = (self.bank * self.bank).sum(1)  # reused by every search

    # ---------------------------------------------------------------------------------------
    # Predict

    @torch.no_grad()
    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Weighted nearest-neighbour scores (B, h, w) of uint8 images, on the device."""
        if self.bank is None:
            raise RuntimeError(f"{self.name}: predict called before fit or load_state_dict")
        cfg = self.config
        if cfg.num_nn > self.bank.shape[0]:
            raise UserError(
                f"{self.name}: num_nn={cfg.num_nn} exceeds the memory bank "
                f"({self.bank.shape[0]} patches); lower num_nn or raise coreset_ratio"
            )
        emb = self.embed(images)
        batch, height, width, dim = emb.shape
        dist, idx = cs.nearest_neighbors(
            emb.reshape(-1, dim), self.bank, cfg.num_nn, squared=cfg.squared_distance,
            bank_sq_norms=self._bank_sq_norms, budget_mb=cfg.budget_mb,
        )
        scores = dist.mean(1)
        if self.bank_weight is not None:
            # The weight of the nearest bank patch (the reference only supports num_nn = 1).
            scores = scores * self.bank_weight[idx[:, 0]]
        return scores.view(batch, height, width)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int | None = None) -> Prediction:
        """Image scores (max weighted patch score) and smoothed maps at the input size.

        ``batch_size`` defaults to the config's, so lowering it to fit a small GPU bounds
        inference as well as fitting.
        """
        check_image_batch(images, f"{self.name}.predict")
        if self.bank is None:
            raise RuntimeError(f"{self.name}: predict called before fit or load_state_dict")
        out_size = tuple(images.shape[-2:])
        scores, maps = [], []
        step = max(1, int(batch_size or self.config.batch_size))
        for start, stop in self._batches(images.shape[0], step):
            grid = self.patch_scores(images[start:stop])
            scores.append(grid.flatten(1).amax(1).float().cpu())
            upsampled = F.interpolate(
                grid[:, None], size=out_size, mode="bilinear", align_corners=False
            )[:, 0]
            maps.append(cs.gaussian_blur(upsampled, self.config.sigma).float().cpu())
        return Prediction(
            scores=torch.cat(scores).numpy().astype(np.float32),
            maps=torch.cat(maps).numpy().astype(np.float32),
        )

    # ---------------------------------------------------------------------------------------
    # State

    @classmethod
    def weights_check(cls, config, teacher_weights):
        """The teacher: (backbone, weights), built once (a random teacher needs no check)."""
        return teacher_check(config.backbone, teacher_weights)

    def _teacher_id(self) -> str:
        if self._teacher is not None:
            return self._teacher.weights_id
        return weights_id(self.config.backbone, self.teacher_weights)

    def state_dict(self) -> dict[str, Any]:
        """The memory bank, its soft weights and what they were computed with (CPU tensors)."""
        if self.bank is None:
            raise RuntimeError(f"{self.name}: state_dict called before fit")
        return {
            "format": STATE_FORMAT,
            "method": self.name,
            "config": dataclasses.asdict(self.config),
            "teacher_weights_id": self._teacher_id(),
            "bank": self.bank.detach().cpu(),
            "bank_weight": None if self.bank_weight is None else self.bank_weight.detach().cpu(),
            "fit_stats": dict(self.fit_stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a bank saved by :meth:`state_dict` of the same method, config and teacher."""
        if state.get("format") != STATE_FORMAT or state.get("method") != self.name:
            raise UserError(
                f"{self.name}: the saved state is not a {self.name} memory bank "
                f"(format {state.get('format')!r}, method {state.get('method')!r})"
            )
        mine = dataclasses.asdict(self.config)
        for key, value in mine.items():
            if key in _RESULT_NEUTRAL_FIELDS:
                continue
            saved = state["config"].get(key)
            if (list(saved) if isinstance(saved, (list, tuple)) else saved) != (
                list(value) if isinstance(value, tuple) else value
            ):
                raise UserError(
                    f"{self.name}: the saved state has config {key}={saved!r}, this method "
                    f"{key}={value!r}; build the method with the saved config"
                )
        if state["teacher_weights_id"] != self._teacher_id():
            raise UserError(
                f"{self.name}: the saved bank was computed with teacher "
                f"{state['teacher_weights_id']}, this method uses {self._teacher_id()}; "
                f"pass the same teacher weights"
            )
        self._set_bank(state["bank"], state.get("bank_weight"))
        self.fit_stats = dict(state.get("fit_stats", {}))

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            backbone=self.config.backbone,
            teacher_weights_id=self._teacher_id(),
            layers=list(self.config.layers),
            bank_size=None if self.bank is None else int(self.bank.shape[0]),
        )
        return info


@register_method
class PatchCore(SoftPatch):
    """PatchCore: the SoftPatch code path with no discriminator, removal or soft weights."""

    name = "patchcore"
    Config = PatchCoreConfig
    display_name = "PatchCore"
    paper_name = None  # not a column of the CDD paper
    column_rank = 50
