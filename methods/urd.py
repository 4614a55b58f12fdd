"""URD: "Unlocking the Potential of Reverse Distillation for Anomaly Detection" (AAAI 2025).

Reference semantics: hito2448/URD at 95dd027 (``train.py``, ``train_visa.py``,
``models/teacher.py``, ``models/student.py``, ``utils/perlin.py``, ``dataset/dataset_noise.py``);
the facts read from it and the choices made here are in ``docs/urd.md``. Every line here is
written for this harness.

Three networks (Expert-Teacher-Student):

- **expert** E: the frozen ImageNet backbone (:func:`~methods.backbones.build_teacher`);
- **teacher** T: a second copy of the same weights, fine-tuned
  (:func:`~methods.backbones.build_encoder`, Adam lr 1e-4, betas (0.5, 0.999)); train mode for
  its own step, eval mode when it feeds the student and at test time;
- **student** S (:class:`URDStudent`): RD's OCBE and decoder plus skip fusion that injects the
  teacher's features between the decoder stages (Adam lr 0.005, betas (0.5, 0.999)); every
  ``Conv2d`` re-initialised with xavier-normal, as the official ``self.apply(init_weight)``.

One training step on a batch x with a synthetic anomaly x_aug and its mask m
(:mod:`methods.synthetic_anomalies`):

1. E(x), E(x_aug) without gradient;
2. teacher step, T in train mode: ``L_T = sum_l [ mean_px(1 - cos_c(T(x), E(x)))
   + L1(1 - cos_c(T(x_aug), E(x)), m_l) + mean_b(1 - cos_flat(T(x_aug), E(x_aug))) ]``;
3. T in eval mode: T(x), T(x_aug) without gradient;
4. student step: ``L_S = sum_l [ g(S(T(x)), T(x)) + g(S(T(x_aug)), T(x)) + g(S(T(x)), E(x))
   + g(S(T(x_aug)), E(x)) ]`` with g RD's loss (:func:`~methods.rd.rd_loss`).

Inference: T (eval) features, S on them, RD's map (:func:`~methods.rd.anomaly_maps`: per layer
1 - cos over channels, bilinear to the input size, sum, Gaussian sigma 4); score = max. The
expert is not used at test time.

Open points and how they are settled here (also in ``docs/urd.md``):

- skip path: the official call ``student(..., skip=True, attn=True)`` runs the *plain* skip
  fusion (``forward_decoder_wogii``): the default. ``guided_injection=True`` runs the
  similarity-guided injection the paper describes (``forward_decoder_gii``).
- loss: the one at 95dd027 (after the 2025-01-21 removals); the older terms are not offered.
- budget: ``iterations`` (5,000; 10,000 for cable and transistor and on VisA, see
  :attr:`URD.category_overrides`) rounded up to whole epochs as the official loop does
  (``epochs = ceil(iterations / batches per epoch)``, every epoch run to its end); ``epochs``,
  when set, replaces it. The last step is what is evaluated: the official script's choice of the
  epoch with the best test metrics needs test labels.
- the mask target of the teacher's second term is resized layer after layer (bilinear,
  align_corners=True, binarised at 0.5, each layer from the previous layer's mask), as the
  official loop reassigns it.
- textures: a folder given by ``texture_root`` (DTD's images in the official setup), else a
  built-in procedural pool; provenance names which.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UserError
from methods.backbones import (
    CHANNELS,
    Encoder,
    Teacher,
    build_encoder,
    build_teacher,
    check_backbone,
    teacher_check,
    teacher_input,
    weights_id,
)
from methods.base import (
    EpochObserver,
    Method,
    Prediction,
    TrainSet,
    register_method,
    register_variant,
)
from methods.rd import (
    RDStudent,
    anomaly_maps,
    check_image_size,
    make_adam,
    precision_name,
    rd_loss,
    student_autocast,
)
from methods.synthetic_anomalies import (
    FOREGROUNDS,
    AnomalySynthesizer,
    describe_texture_root,
    foreground_masks,
    texture_source,
)

# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class URDConfig:
    """URD settings; defaults are the official code's (hito2448/URD at 95dd027)."""

    # Backbone of expert, teacher and student: train.py / models/resnet.py wide_resnet50_2
    # (resnet18 for CPU-sized runs).
    backbone: Literal["wide_resnet50_2", "resnet18"] = "wide_resnet50_2"
    # Training budget in optimiser steps: train.py `iteration_i = 5000` (10000 for cable and
    # transistor, train_visa.py 10000 for every VisA category: category_overrides), rounded up
    # to whole epochs as train.py's loop does.
    iterations: int = 5000
    # Alternative budget in epochs; when set it replaces `iterations` (CDD §5.2 "200 epochs").
    epochs: int | None = None
    # Optional cap on optimiser steps for small runs (harness budget; not in the paper).
    max_steps: int | None = None
    # Batch size: train.py `batch_size = 16`.
    batch_size: int = 16
    # Student Adam: train.py `optimizer_s = Adam(lr=0.005, betas=(0.5, 0.999))`.
    lr_student: float = 0.005
    # Teacher Adam: train.py `optimizer_t = Adam(lr=0.0001, betas=(0.5, 0.999))`.
    lr_teacher: float = 1e-4
    # Betas of both optimisers: train.py `betas=(0.5, 0.999)`.
    betas: tuple[float, float] = (0.5, 0.999)
    # Gaussian smoothing of the map: train.py test() `gaussian_filter(sigma=4)`.
    gaussian_sigma: float = 4.0
    # Skip path: false = train.py's `attn=True` -> forward_decoder_wogii (plain fusion, the
    # official default); true = forward_decoder_gii (similarity-guided, as the paper describes).
    guided_injection: bool = False
    # Where synthetic anomalies may go: dataset_noise.py / perlin.py get_forehead_mask with the
    # category lists of train.py and train_visa.py (GrabCut, inverse Otsu, everywhere). The
    # per-category values are URD.category_overrides; "none" for any other category.
    foreground: Literal["grabcut", "otsu", "none"] = "none"
    # Folder of texture images pasted into anomalies (searched recursively): dataset_noise.py
    # reads ./data/dtd/images/*/*.jpg (DTD). None = the harness's built-in procedural textures.
    texture_root: str | None = None
    # Speed switches (harness): channels_last on CUDA (same results up to floating point) and,
    # opt-in as for RD, bf16 autocast for the student on CUDA (expert, teacher and losses stay
    # float32); off by default because the official code trains in float32.
    amp_bf16: bool = False
    channels_last: bool = True

    def __post_init__(self):
        where = "urd config"
        check_backbone(self.backbone)
        for name in ("iterations", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{where} {name}={value!r} must be an integer of at least 1")
        for name in ("epochs", "max_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise UserError(f"{where} {name}={value!r} must be an integer of at least 1, "
                                f"or none")
        for name in ("lr_student", "lr_teacher"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise UserError(f"{where} {name}={value!r} must be a finite number above 0")
        if (len(self.betas) != 2
                or not all(_finite(b) and 0.0 <= b < 1.0 for b in self.betas)):
            raise UserError(f"{where} betas={self.betas!r} must be two numbers in [0, 1)")
        if not _finite(self.gaussian_sigma) or self.gaussian_sigma < 0:
            raise UserError(f"{where} gaussian_sigma={self.gaussian_sigma!r} must be a finite "
                            f"number of at least 0")
        if self.foreground not in FOREGROUNDS:
            raise UserError(f"{where} foreground={self.foreground!r}; use one of "
                            f"{', '.join(FOREGROUNDS)}")
        if self.texture_root is not None and (not isinstance(self.texture_root, str)
                                              or not self.texture_root.strip()):
            raise UserError(f"{where} texture_root={self.texture_root!r} must be a folder path, "
                            f"or none for the built-in textures")


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


# --------------------------------------------------------------------------------------------
# Student: RD's OCBE + decoder with the teacher's features injected between decoder stages


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class _HalfResolution(nn.Module):
    """Bilinear x0.5 resize (student.py ``nn.Upsample(scale_factor=0.5, mode='bilinear')``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)


class URDStudent(RDStudent):
    """URD's student (``models/student.py``): :class:`~methods.rd.RDStudent` plus skip fusion.

    With (c1, c2, c3) the teacher's channels and d1..d3 the decoder's stages
    (``decoder.stage1`` -> layer3-like, ``stage2`` -> layer2-like, ``stage3`` -> layer1-like):

    - ``downsample[i]``: bilinear x0.5, conv1x1 c_{i+1} -> c_{i+2}, BN, ReLU;
    - ``fuse_encoder[i]``: conv3x3 c_{i+2} -> c_{i+2}, BN, ReLU on ``T_{i+2} + downsample[i](T_{i+1})``;
    - ``fuse_skip[i]``: conv3x3 2 c_{i+2} -> c_{i+2}, BN, ReLU on the concatenation with the
      decoder feature; its output feeds the next decoder stage;
    - ``guide[i]`` (only with ``guided_injection``): conv3x3 c_{i+2} -> c_{i+2}, BN, ReLU on the
      similarity-weighted mix (student.py ``conv3x3_simattn``).

    Every ``Conv2d`` weight (OCBE and decoder included) is drawn from xavier-normal
    (student.py ``self.apply(init_weight)``); the transposed convolutions keep their default.
    """

    def __init__(self, backbone: str, guided_injection: bool = False):
        super().__init__(backbone)
        c1, c2, c3 = CHANNELS[backbone]
        self.guided_injection = bool(guided_injection)
        self.downsample = nn.ModuleList([
            nn.Sequential(_HalfResolution(), *_conv_bn_relu(cin, cout, 1))
            for cin, cout in ((c1, c2), (c2, c3))
        ])
        self.fuse_encoder = nn.ModuleList([_conv_bn_relu(c, c, 3) for c in (c2, c3)])
        self.fuse_skip = nn.ModuleList([_conv_bn_relu(2 * c, c, 3) for c in (c2, c3)])
        self.guide = (nn.ModuleList([_conv_bn_relu(c, c, 3) for c in (c2, c3)])
                      if self.guided_injection else None)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)

    def fusion_modules(self) -> list[nn.Module]:
        """The modules URD adds to RD's student (for parameter accounting)."""
        parts = [self.downsample, self.fuse_encoder, self.fuse_skip]
        return parts + ([self.guide] if self.guide is not None else [])

    def _inject(self, level: int, decoded: torch.Tensor, encoded: torch.Tensor,
                teacher_feat: torch.Tensor) -> torch.Tensor:
        """The skip feature concatenated to ``decoded`` at fusion ``level`` (0 or 1)."""
        if self.guide is None:
            return encoded  # forward_decoder_wogii
        # forward_decoder_gii: weight by cos(decoder feature, teacher feature), no gradient.
        with torch.no_grad():
            sim = F.cosine_similarity(decoded.detach().float(), teacher_feat.float(),
                                      dim=1).unsqueeze(1).to(decoded.dtype)
        return self.guide[level](encoded * sim + decoded * (1 - sim))

    def forward(self, teacher_feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Reconstruct the teacher's [layer1, layer2, layer3] features from all three of them."""
        t1, t2, t3 = teacher_feats
        a = self.decoder.stage1(self.ocbe(teacher_feats))  # layer3-like, 1/16
        e = self.fuse_encoder[1](t3 + self.downsample[1](t2))
        b = self.decoder.stage2(self.fuse_skip[1](torch.cat([a, self._inject(1, a, e, t3)], 1)))
        e = self.fuse_encoder[0](t2 + self.downsample[0](t1))
        c = self.decoder.stage3(self.fuse_skip[0](torch.cat([b, self._inject(0, b, e, t2)], 1)))
        return [c, b, a]


def build_urd_student(backbone: str, guided_injection: bool = False,
                      seed: int | None = None) -> URDStudent:
    """A fresh :class:`URDStudent` on CPU; with ``seed`` its initialisation comes from that
    seed without touching the global RNG."""
    if seed is None:
        return URDStudent(backbone, guided_injection)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return URDStudent(backbone, guided_injection)


# --------------------------------------------------------------------------------------------
# Losses (models/teacher.py::loss, models/student.py::loss)


def pixel_cosine_loss(a_feats: Sequence[torch.Tensor], b_feats: Sequence[torch.Tensor]
                      ) -> torch.Tensor:
    """``sum_l mean_{b,y,x} (1 - cos_c(a_l, b_l))`` (teacher.py ``loss_distil_p``)."""
    total = None
    for a, b in zip(a_feats, b_feats, strict=True):
        term = (1.0 - F.cosine_similarity(a.float(), b.float(), dim=1)).mean()
        total = term if total is None else total + term
    return total


def mask_pyramid(mask: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """The synthetic mask at each feature size: bilinear (align_corners=True), binarised at
    0.5, each size resized from the previous one (teacher.py ``loss_distil_aug_p`` reassigns
    the mask inside its loop)."""
    out = []
    current = mask.float()
    with torch.no_grad():
        for size in sizes:
            current = F.interpolate(current, size=tuple(size), mode="bilinear",
                                    align_corners=True)
            current = (current >= 0.5).float()
            out.append(current)
    return out


def mask_alignment_loss(t_aug: Sequence[torch.Tensor], e_normal: Sequence[torch.Tensor],
                        mask: torch.Tensor) -> torch.Tensor:
    """``sum_l L1(1 - cos_c(T_l(x_aug), E_l(x)), m_l)`` (teacher.py ``loss_distil_aug_p``): the
    teacher's distance to the *clean* image's expert features should be 1 on the anomaly and
    0 elsewhere."""
    masks = mask_pyramid(mask, [tuple(f.shape[-2:]) for f in t_aug])
    total = None
    for t, e, m in zip(t_aug, e_normal, masks, strict=True):
        dist = (1.0 - F.cosine_similarity(t.float(), e.float(), dim=1)).unsqueeze(1)
        term = F.l1_loss(dist, m)
        total = term if total is None else total + term
    return total


def teacher_loss_terms(t_normal, t_aug, e_normal, e_aug, mask) -> dict[str, torch.Tensor]:
    """The teacher's three terms (teacher.py ``loss`` at 95dd027); their sum is L_T."""
    return {
        "normal_pixel": pixel_cosine_loss(t_normal, e_normal),
        "aug_mask": mask_alignment_loss(t_aug, e_normal, mask),
        "aug_global": rd_loss(e_aug, t_aug),
    }


def student_loss_terms(s_normal, s_aug, t_normal, e_normal) -> dict[str, torch.Tensor]:
    """The student's four terms (student.py ``loss`` at 95dd027); their sum is L_S. Both
    targets are the clean image's features."""
    return {
        "teacher_normal": rd_loss(t_normal, s_normal),
        "teacher_aug": rd_loss(t_normal, s_aug),
        "expert_normal": rd_loss(e_normal, s_normal),
        "expert_aug": rd_loss(e_normal, s_aug),
    }


# --------------------------------------------------------------------------------------------
# Per-category settings of the official scripts

_MVTEC_GRABCUT = ("bottle", "cable", "hazelnut", "metal_nut", "pill", "toothbrush", "zipper")
_MVTEC_OTSU = ("capsule", "screw")
_MVTEC_NONE = ("carpet", "grid", "leather", "tile", "wood", "transistor")
_MVTEC_LONG = ("cable", "transistor")


def _mvtec_overrides() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for kind, names in (("grabcut", _MVTEC_GRABCUT), ("otsu", _MVTEC_OTSU),
                        ("none", _MVTEC_NONE)):
        for name in names:
            table[name] = {"foreground": kind}
    for name in _MVTEC_LONG:
        table[name]["iterations"] = 10000
    return dict(sorted(table.items()))


# --------------------------------------------------------------------------------------------
# The method


@register_method
class URD(Method):
    """URD with synthetic anomalies on every training image (see the module docstring).

    ``fit`` shuffles with a ``torch.Generator`` seeded by ``seed`` (a fresh permutation each
    epoch, last batch kept even if smaller, as the official DataLoader) and draws the anomalies
    from a numpy Generator seeded by ``seed``: the same seed gives the same model.
    """

    name = "urd"
    Config = URDConfig
    display_name = paper_name = "URD"
    column_rank = 30
    # What CDD ran: WRN50, ImageNet weights (CDD §5.1, §5.2); budget, resolution and skip path
    # are not stated there (docs/urd.md) and are not judged.
    paper_setup = {"backbone": "wide_resnet50_2", "max_steps": None}
    smoke_overrides = {"backbone": "resnet18", "iterations": 2, "max_steps": 2, "batch_size": 4}
    # Per-category config of the official scripts, dataset -> category -> field -> value,
    # for sweeps to apply where the user set the field neither in the preset nor with --set:
    # train.py full_category / mask_category + get_forehead_mask (Otsu for capsule and screw),
    # train.py iteration_i (10000 for cable and transistor); train_visa.py mask=True for every
    # category (GrabCut: the capsule/screw test never matches a VisA name) and 10000 iterations.
    category_overrides: ClassVar[Mapping[str, Mapping[str, Mapping[str, Any]]]] = {
        "mvtec": _mvtec_overrides(),
        # Every VisA category ("*"): train_visa.py applies GrabCut and 10,000 iterations to all.
        "visa": {"*": {"foreground": "grabcut", "iterations": 10000}},
    }

    @classmethod
    def weights_check(cls, config, teacher_weights):
        """The backbone's weights (trainable and frozen copies start from the same file)."""
        return teacher_check(config.backbone, teacher_weights)

    def __init__(self, config: URDConfig | None = None, *, teacher_weights: str = "imagenet",
                 device: str | torch.device = "cpu", seed: int = 0):
        super().__init__(config, teacher_weights=teacher_weights, device=device, seed=seed)
        self.expert: Teacher | None = None
        self.teacher: Encoder | None = None
        self.student: URDStudent | None = None
        self.texture_description: str = describe_texture_root(self.config.texture_root)
        self.trained: dict[str, int] = {}

    # -- helpers ---------------------------------------------------------------------------

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def _memory_format(self) -> torch.memory_format:
        return (torch.channels_last if self._cuda and self.config.channels_last
                else torch.contiguous_format)

    def _autocast(self):
        return student_autocast(self.device, self.config.amp_bf16)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised network input of uint8 or [0, 1] float images."""
        return teacher_input(images, self.device,
                             channels_last=self._memory_format() == torch.channels_last)

    def build_networks(self) -> None:
        """Fresh expert, teacher (both from ``teacher_weights``) and student (from ``seed``)."""
        cfg = self.config
        fmt = self._memory_format()
        self.expert = build_teacher(cfg.backbone, self.teacher_weights).to(
            self.device, memory_format=fmt)
        self.teacher = build_encoder(cfg.backbone, self.teacher_weights).to(
            self.device, memory_format=fmt)
        self.student = build_urd_student(cfg.backbone, cfg.guided_injection, seed=self.seed).to(
            self.device, memory_format=fmt)

    def teacher_terms(self, xn: torch.Tensor, xn_aug: torch.Tensor, mask: torch.Tensor,
                      e_normal, e_aug) -> dict[str, torch.Tensor]:
        """Step 2: the teacher's loss terms, the teacher in train mode (its BatchNorm uses and
        updates batch statistics, once for x and once for x_aug, as the official loop)."""
        self.teacher.train()
        return teacher_loss_terms(self.teacher.encode(xn), self.teacher.encode(xn_aug),
                                  e_normal, e_aug, mask)

    def student_inputs(self, xn: torch.Tensor, xn_aug: torch.Tensor
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Step 3: T(x), T(x_aug) in eval mode without gradient. One forward of both halves:
        in eval mode each image's features do not depend on the rest of its batch."""
        self.teacher.eval()
        with torch.no_grad():
            feats = self.teacher.encode(torch.cat([xn, xn_aug]))
        b = xn.shape[0]
        return [f[:b] for f in feats], [f[b:] for f in feats]

    def student_terms(self, t_normal, t_aug, e_normal) -> dict[str, torch.Tensor]:
        """Step 4: the student's loss terms, the student in train mode (one forward for the
        clean and one for the anomalous batch, as the official loop)."""
        self.student.train()
        with self._autocast():
            s_normal = self.student(t_normal)
            s_aug = self.student(t_aug)
        return student_loss_terms(s_normal, s_aug, t_normal, e_normal)

    def expert_features(self, xn: torch.Tensor, xn_aug: torch.Tensor
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Step 1: E(x), E(x_aug) without gradient (one forward; the expert is in eval mode)."""
        with torch.no_grad():
            feats = self.expert.encode(torch.cat([xn, xn_aug]))
        b = xn.shape[0]
        return [f[:b] for f in feats], [f[b:] for f in feats]

    def planned_epochs(self, n_images: int) -> int:
        """Whole epochs trained: ``epochs`` if set, else ``ceil(iterations / batches)``."""
        if self.config.epochs is not None:
            return self.config.epochs
        return math.ceil(self.config.iterations / math.ceil(n_images / self.config.batch_size))

    # -- Method API ------------------------------------------------------------------------

    @classmethod
    def geometry_check(cls, config: Any, image_size: int, resize_size: int) -> None:
        """Sides must be multiples of 32 (:func:`~methods.rd.check_image_size`), checked
        before a sweep starts."""
        check_image_size(image_size, image_size, cls.name)

    def fit(self, train: TrainSet, observer: EpochObserver | None = None) -> None:
        """Train teacher and student on ``train.images`` (uint8 (N, 3, H, W), sides multiples
        of 32), every image with a fresh synthetic anomaly each time it is drawn.

        Calls ``observer(epoch, scalars)`` after each epoch with the epoch means of ``loss``
        (L_T + L_S), ``loss_teacher``, ``loss_student``, each term (``teacher/<term>``,
        ``student/<term>``) and ``anomaly_fraction`` (mean share of pixels in the synthetic
        masks), and ``steps`` (optimiser steps of each network so far). Stops after the planned
        epochs (:meth:`planned_epochs`) or ``max_steps`` steps, whichever is first.
        """
        cfg = self.config
        n, _, h, w = train.images.shape
        check_image_size(h, w, where="urd")
        if n == 0:
            raise UserError("urd: the training set is empty; check the category's train folder")
        if (h // 32) * (w // 32) == 1 and (cfg.batch_size == 1 or n % cfg.batch_size == 1):
            raise UserError(
                f"urd: {h}x{w} images with a last batch of one image cannot train BatchNorm; "
                f"use an image size of at least 64 or another batch_size"
            )
        # Everything that can fail on the user's input fails before any training.
        textures = texture_source(cfg.texture_root, h, w)
        self.texture_description = textures.description
        foreground = foreground_masks(train.images, cfg.foreground).to(self.device)
        synthesize = AnomalySynthesizer(textures, seed=self.seed)
        self.build_networks()
        opt_teacher = make_adam(self.teacher.parameters(), cfg.lr_teacher, cfg.betas, self.device)
        opt_student = make_adam(self.student.parameters(), cfg.lr_student, cfg.betas, self.device)
        generator = torch.Generator().manual_seed(self.seed)
        images = train.images.to(self.device)
        epochs = self.planned_epochs(n)
        steps = 0
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            sums: dict[str, torch.Tensor] = {}
            batches = 0
            for start in range(0, n, cfg.batch_size):
                index = order[start:start + cfg.batch_size]
                x = images.index_select(0, index).float() / 255.0
                x_aug, mask = synthesize(x, foreground.index_select(0, index))
                xn, xn_aug = self._input(x), self._input(x_aug)
                e_normal, e_aug = self.expert_features(xn, xn_aug)

                t_terms = self.teacher_terms(xn, xn_aug, mask, e_normal, e_aug)
                loss_teacher = sum(t_terms.values())
                opt_teacher.zero_grad(set_to_none=True)
                loss_teacher.backward()
                opt_teacher.step()

                t_normal, t_aug = self.student_inputs(xn, xn_aug)
                s_terms = self.student_terms(t_normal, t_aug, e_normal)
                loss_student = sum(s_terms.values())
                opt_student.zero_grad(set_to_none=True)
                loss_student.backward()
                opt_student.step()

                # Kept on the device: one host sync per epoch, not one per step.
                parts = {"loss_teacher": loss_teacher, "loss_student": loss_student,
                         "anomaly_fraction": mask.mean()}
                parts.update({f"teacher/{k}": v for k, v in t_terms.items()})
                parts.update({f"student/{k}": v for k, v in s_terms.items()})
                for key, value in parts.items():
                    value = value.detach().float()
                    sums[key] = value if key not in sums else sums[key] + value
                batches += 1
                steps += 1
                if cfg.max_steps is not None and steps >= cfg.max_steps:
                    break
            scalars = {key: float(value) / batches for key, value in sums.items()}
            scalars["loss"] = scalars["loss_teacher"] + scalars["loss_student"]
            if not math.isfinite(scalars["loss"]):
                raise FloatingPointError(f"urd: loss became {scalars['loss']} at epoch {epoch}")
            scalars["steps"] = float(steps)
            if observer is not None:
                observer(epoch, scalars)
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        self.trained = {"steps": steps, "epochs": epoch + 1}
        self.teacher.eval()
        self.student.eval()

    def predict(self, images: torch.Tensor, batch_size: int = 32) -> Prediction:
        """Scores (N,) = max of each map; maps (N, H, W) float32 at the input size."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"urd: expected uint8 images (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        n, _, h, w = images.shape
        check_image_size(h, w, where="urd")
        if self.student is None or self.teacher is None:
            raise RuntimeError("urd: predict() needs fit() or load_state_dict() first")
        self.teacher.eval()
        self.student.eval()
        maps = torch.empty((n, h, w), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                t_feats = self.teacher.encode(self._input(images[start:start + batch_size]))
                with self._autocast():
                    s_feats = self.student(t_feats)
                batch_maps = anomaly_maps(t_feats, s_feats, (h, w), self.config.gaussian_sigma)
                maps[start:start + batch_maps.shape[0]].copy_(batch_maps)
        scores = maps.amax(dim=(1, 2)) if n else torch.empty(0, device=self.device)
        return Prediction(scores=scores.cpu().numpy(), maps=maps.cpu().numpy())

    def state_dict(self) -> dict[str, Any]:
        """Teacher and student weights (CPU), config, seed and provenance; the expert is not
        needed to predict and is not saved."""
        if self.student is None or self.teacher is None:
            raise RuntimeError("urd: state_dict() needs fit() first")
        return {
            "method": self.name,
            "config": dataclasses.asdict(self.config),
            "teacher_weights": self.teacher_weights,
            "seed": self.seed,
            "teacher_weights_id": self._weights_id(),
            "texture_source": self.texture_description,
            "trained": dict(self.trained),
            "teacher": {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()},
            "student": {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (teacher and student come from the state itself)."""
        if state.get("method") != self.name:
            raise UserError(f"{self.name}: state holds method {state.get('method')!r}, not "
                            f"{self.name!r}")
        self.config = cfg = self.config_from_dict(state["config"])
        self.teacher_weights = state["teacher_weights"]
        self.seed = int(state["seed"])
        self.texture_description = str(state["texture_source"])
        self.trained = dict(state.get("trained") or {})
        fmt = self._memory_format()
        # The trained teacher replaces whatever the skeleton starts with.
        teacher = build_encoder(cfg.backbone, "random")
        teacher.load_state_dict(state["teacher"])
        teacher.weights_id = str(state["teacher_weights_id"])
        self.teacher = teacher.to(self.device, memory_format=fmt).eval()
        student = URDStudent(cfg.backbone, cfg.guided_injection)
        student.load_state_dict(state["student"])
        self.student = student.to(self.device, memory_format=fmt).eval()
        self.expert = None

    def _weights_id(self) -> str:
        if self.teacher is not None:
            return self.teacher.weights_id
        return weights_id(self.config.backbone, self.teacher_weights)

    def describe(self) -> dict[str, Any]:
        """Base provenance + backbone, weights id, texture source, skip path and budget."""
        info = super().describe()
        wid = self._weights_id()
        cfg = self.config
        info.update(
            backbone=cfg.backbone,
            teacher_weights_id=wid,
            paper_teacher=cfg.backbone == "wide_resnet50_2" and wid.startswith("imagenet:"),
            texture_source=self.texture_description,
            # The built-in pool is not the paper's DTD; a folder is whatever the user named.
            builtin_textures=cfg.texture_root is None,
            foreground=cfg.foreground,
            precision=precision_name(self.device, cfg.amp_bf16),
            skip_path="guided (forward_decoder_gii)" if cfg.guided_injection
            else "plain (forward_decoder_wogii)",
            budget=(f"{cfg.epochs} epochs" if cfg.epochs is not None
                    else f"{cfg.iterations} iterations, rounded up to whole epochs"),
            reported="last step",
        )
        if self.trained:
            info["trained_steps"] = self.trained.get("steps")
            info["trained_epochs"] = self.trained.get("epochs")
        return info


# CDD's unified protocol (docs/urd.md): 256 -> 224 centre crop
# (the sweep's geometry), the last step reported, this harness's noisy split. The budget stays
# the official iterations even where a sweep's defaults say `epochs: 200`; `--set
# urd-cdd.epochs=200` gives CDD §5.2's 200 epochs.
register_variant(
    "urd-cdd", "urd", {"epochs": None},
    "URD under CDD's protocol: the official recipe and iteration budget at the sweep's "
    "256 -> 224 geometry, last step reported",
)
