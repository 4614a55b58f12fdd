"""Reverse Distillation (Deng & Li, CVPR 2022), as specified in docs/protocol.md §4.

Reference semantics: hq-deng/RD4AD (``resnet.py``, ``de_resnet.py``, ``main.py``, ``test.py``).

- :class:`RDStudent` = OCBE (multi-scale fusion + one-class embedding) + decoder. The reference's
  unused ``conv4``/``bn4`` are left out, so every parameter receives a gradient: 58,885,120
  (OCBE) + 24,917,504 (decoder) for ``wide_resnet50_2``; 11,680,000 + 3,703,168 for ``resnet18``.
- :func:`rd_loss`: per layer, each sample's whole feature map flattened to one vector,
  ``1 - cos``, batch mean, summed over the 3 layers.
- :func:`anomaly_maps`: per layer ``1 - cos`` over channels, bilinear (align_corners=True)
  upsampling to the input size, sum over layers, Gaussian filter (sigma 4, scipy's
  ``gaussian_filter`` semantics, run as a torch convolution); image score = max of the map.
- :class:`FeatureCache`: the teacher is frozen and RD uses no augmentation, so the teacher
  features of the training set are computed once and reused every epoch.

CDD (methods/cdd.py) reuses the networks, the loss, the maps and the cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UserError
from methods.backbones import (
    CHANNELS,
    STRIDES,
    Teacher,
    build_teacher,
    check_backbone,
    teacher_check,
    teacher_input,
    weights_id,
)
from methods.base import EpochObserver, Method, Prediction, TrainSet, register_method

# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class RDConfig:
    """Reverse Distillation settings; defaults are the paper's (CDD paper §5, RD4AD main.py)."""

    # Teacher backbone: CDD paper §5 "WideResNet-50 pretrained on ImageNet" (RD4AD main.py).
    backbone: Literal["wide_resnet50_2", "resnet18"] = "wide_resnet50_2"
    # Training epochs: RD4AD main.py `epochs = 200`; CDD paper §5 "trained for 200 epochs".
    epochs: int = 200
    # Optional cap on optimizer steps for small runs (harness budget; not in the paper).
    max_steps: int | None = None
    # Batch size: RD4AD main.py `batch_size = 16` (docs/protocol.md §4).
    batch_size: int = 16
    # Adam learning rate: RD4AD main.py `learning_rate = 0.005`; CDD paper §5.
    lr: float = 0.005
    # Adam betas: RD4AD main.py `betas=(0.5, 0.999)` (docs/protocol.md §4: not 0.99).
    betas: tuple[float, float] = (0.5, 0.999)
    # Gaussian smoothing of the anomaly map: RD4AD test.py `gaussian_filter(sigma=4)`; paper §5.
    gaussian_sigma: float = 4.0
    # Speed switches (harness; results are the same up to floating point):
    # compute teacher features of the training set once and reuse them every epoch.
    feature_cache: bool = True
    # where the cache lives: "auto" = the training device when it fits, else CPU.
    cache_device: Literal["auto", "device", "cpu"] = "auto"
    # Opt-in speed switch: bf16 autocast for the student on CUDA (ignored on CPU); teacher and
    # loss stay float32. Off by default: RD4AD trains in float32 (PyTorch's defaults, TF32
    # convolutions on Ampere and later), and bf16 has not been shown to match it.
    amp_bf16: bool = False
    # channels_last memory format on CUDA (ignored on CPU).
    channels_last: bool = True

    def __post_init__(self):
        check_backbone(self.backbone)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"rd config {name}={getattr(self, name)} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"rd config max_steps={self.max_steps} must be at least 1 or None")
        if self.lr <= 0 or self.gaussian_sigma < 0:
            raise UserError(f"rd config lr={self.lr}, gaussian_sigma={self.gaussian_sigma}: "
                            f"lr must be above 0 and gaussian_sigma at least 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"rd config betas={self.betas!r} must be two numbers in [0, 1), "
                            f"e.g. betas=0.5,0.999")


# --------------------------------------------------------------------------------------------
# Networks: OCBE + decoder (RD4AD resnet.py BN_layer, de_resnet.py), written against torchvision's
# block layout so that parameter counts match the reference exactly.


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


def _deconv2x2(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2, bias=False)


class _BasicBlock(nn.Module):
    """ResNet basic block; ``up=True`` makes the first conv a 2x2 stride-2 transposed conv."""

    expansion = 1

    def __init__(self, cin, planes, stride=1, shortcut=None, up=False, width_per_group=64):
        super().__init__()
        self.conv1 = _deconv2x2(cin, planes) if up else _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class _Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck; ``up=True`` makes the middle conv a 2x2 stride-2 transposed conv."""

    expansion = 4

    def __init__(self, cin, planes, stride=1, shortcut=None, up=False, width_per_group=64):
        super().__init__()
        width = planes * width_per_group // 64
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _deconv2x2(width, width) if up else _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


# Per backbone: block type, OCBE embedding blocks, decoder blocks per stage, width per group
# (RD4AD: wide_resnet50_2 -> BN_layer(Bottleneck, 3) + de_wide_resnet50_2 [3, 4, 6], width 128;
# resnet18 -> BN_layer(BasicBlock, 2) + de_resnet18 [2, 2, 2]).
_ARCH = {
    "wide_resnet50_2": (_Bottleneck, 3, (3, 4, 6), 128),
    "resnet18": (_BasicBlock, 2, (2, 2, 2), 64),
}


class OCBE(nn.Module):
    """Multi-scale feature fusion + one-class embedding (RD4AD ``BN_layer`` minus conv4/bn4).

    Input: teacher features [f1 (B, 64e, H/4), f2 (B, 128e, H/8), f3 (B, 256e, H/16)] with e the
    block expansion (4 for WRN50, 1 for ResNet-18). Output: (B, 512e, H/32, W/32).
    """

    def __init__(self, block, n_blocks: int, width_per_group: int):
        super().__init__()
        e = block.expansion
        c1, c2, c3 = 64 * e, 128 * e, 256 * e
        relu = nn.ReLU(inplace=True)
        # layer1 -> two stride-2 3x3 convs -> 1/16; layer2 -> one stride-2 3x3 conv -> 1/16.
        self.fuse1 = nn.Sequential(
            _conv3x3(c1, c2, 2), nn.BatchNorm2d(c2), relu, _conv3x3(c2, c3, 2),
            nn.BatchNorm2d(c3), relu,
        )
        self.fuse2 = nn.Sequential(_conv3x3(c2, c3, 2), nn.BatchNorm2d(c3), relu)
        cin, planes = 3 * c3, 512
        shortcut = nn.Sequential(_conv1x1(cin, planes * e, 2), nn.BatchNorm2d(planes * e))
        blocks = [block(cin, planes, 2, shortcut, width_per_group=width_per_group)]
        blocks += [
            block(planes * e, planes, width_per_group=width_per_group) for _ in range(n_blocks - 1)
        ]
        self.embed = nn.Sequential(*blocks)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = feats
        return self.embed(torch.cat([self.fuse1(f1), self.fuse2(f2), f3], dim=1))


class Decoder(nn.Module):
    """Reverse ResNet decoder (RD4AD ``de_resnet``): 1/32 embedding -> 3 upsampling stages.

    Input (B, 512e, H/32, W/32); output in teacher order
    [layer1-like (B, 64e, H/4), layer2-like (B, 128e, H/8), layer3-like (B, 256e, H/16)].
    """

    def __init__(self, block, stage_blocks: Sequence[int], width_per_group: int):
        super().__init__()
        e = block.expansion
        cin = 512 * e
        stages = []
        for planes, n in zip((256, 128, 64), stage_blocks):
            shortcut = nn.Sequential(_deconv2x2(cin, planes * e), nn.BatchNorm2d(planes * e))
            blocks = [block(cin, planes, 2, shortcut, up=True, width_per_group=width_per_group)]
            cin = planes * e
            blocks += [block(cin, planes, width_per_group=width_per_group) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        d3 = self.stage1(z)  # layer3-like, 1/16
        d2 = self.stage2(d3)  # layer2-like, 1/8
        d1 = self.stage3(d2)  # layer1-like, 1/4
        return [d1, d2, d3]


class RDStudent(nn.Module):
    """The trainable half of RD: ``decoder(ocbe(teacher_feats))``.

    Attributes: ``backbone``, ``ocbe`` (:class:`OCBE`), ``decoder`` (:class:`Decoder`).
    """

    def __init__(self, backbone: str):
        super().__init__()
        block, n_embed, stage_blocks, width = _ARCH[check_backbone(backbone)]
        self.backbone = backbone
        self.ocbe = OCBE(block, n_embed, width)
        self.decoder = Decoder(block, stage_blocks, width)
        # RD4AD's initialisation: Kaiming-normal (fan_out) for Conv2d, BN weight 1 / bias 0;
        # transposed convs keep PyTorch's default (they are not nn.Conv2d instances).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, teacher_feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Reconstruct teacher features.

        Args:
            teacher_feats: [f1 (B, C1, H/4, W/4), f2 (B, C2, H/8, W/8), f3 (B, C3, H/16, W/16)]
                as returned by :class:`~methods.backbones.Teacher`; H and W multiples of 32.

        Returns:
            Student features with exactly the same shapes, in the same order.
        """
        return self.decoder(self.ocbe(teacher_feats))


def build_student(backbone: str, seed: int | None = None) -> RDStudent:
    """A freshly initialised :class:`RDStudent` for ``backbone`` (on CPU).

    With ``seed`` the initialisation is drawn from that seed without touching the global RNG;
    without it, from the global RNG.
    """
    if seed is None:
        return RDStudent(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return RDStudent(backbone)


# --------------------------------------------------------------------------------------------
# Loss and anomaly maps


def flat_cosine(a_feats: Sequence[torch.Tensor], b_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample cosine similarity of whole flattened feature maps, summed over layers.

    Args:
        a_feats, b_feats: lists of L tensors (B, C_l, h_l, w_l), pairwise the same shapes.

    Returns:
        float32 (B,): ``sum_l cos(flatten(a_l[i]), flatten(b_l[i]))``, in [-L, L].
    """
    total = None
    for a, b in zip(a_feats, b_feats, strict=True):
        cos = F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)
        total = cos if total is None else total + cos
    return total


def rd_loss(
    teacher_feats: Sequence[torch.Tensor],
    student_feats: Sequence[torch.Tensor],
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """RD's training loss (RD4AD main.py ``loss_fucntion``).

    Args:
        teacher_feats, student_feats: lists of L tensors (B, C_l, h_l, w_l).
        reduction: ``"mean"`` -> scalar ``sum_l mean_i (1 - cos_l,i)``; ``"none"`` -> (B,)
            per-sample ``sum_l (1 - cos_l,i)`` (its mean is the ``"mean"`` value).

    Returns:
        float32 scalar or (B,), differentiable w.r.t. both inputs.
    """
    per_sample = len(teacher_feats) - flat_cosine(teacher_feats, student_feats)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian: radius ``int(truncate * sigma + 0.5)``, sums to 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return phi / phi.sum()


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of scipy's 'reflect' padding (d c b a | a b c d | d c b a), any radius."""
    i = torch.arange(-radius, n + radius, device=device)
    period = 2 * n
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - 1 - i, i)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """2-D Gaussian filter of each map, equal to ``scipy.ndimage.gaussian_filter(m, sigma)``.

    Args:
        maps: float (B, H, W), any device.
        sigma: standard deviation in pixels; 0 returns ``maps`` unchanged.
        truncate: kernel radius in sigmas (scipy's default 4.0).

    Returns:
        float32 (B, H, W) on the same device ('reflect' borders, separable convolution).
    """
    if sigma <= 0:
        return maps.float()
    b, h, w = maps.shape
    kernel = torch.as_tensor(gaussian_kernel1d(sigma, truncate), dtype=torch.float32,
                             device=maps.device)
    radius = (kernel.numel() - 1) // 2
    x = maps.float().reshape(b, 1, h, w)
    x = x.index_select(2, _reflect_index(h, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = x.index_select(3, _reflect_index(w, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x.reshape(b, h, w)


def anomaly_maps(
    teacher_feats: Sequence[torch.Tensor],
    student_feats: Sequence[torch.Tensor],
    out_size: tuple[int, int],
    sigma: float = 4.0,
) -> torch.Tensor:
    """RD anomaly maps (RD4AD test.py ``cal_anomaly_map`` with mode 'a', then Gaussian).

    Args:
        teacher_feats, student_feats: lists of L tensors (B, C_l, h_l, w_l).
        out_size: (H, W) of the input images.
        sigma: Gaussian sigma in pixels (0 = no smoothing).

    Returns:
        float32 (B, H, W): ``blur(sum_l upsample(1 - cos_channels(t_l, s_l)))``. The image
        score is ``maps.amax(dim=(1, 2))``.
    """
    total = None
    for t, s in zip(teacher_feats, student_feats, strict=True):
        dist = 1.0 - F.cosine_similarity(t.float(), s.float(), dim=1)  # (B, h, w)
        up = F.interpolate(dist.unsqueeze(1), size=tuple(out_size), mode="bilinear",
                           align_corners=True)[:, 0]
        total = up if total is None else total + up
    return gaussian_blur(total, sigma)


def check_image_size(height: int, width: int, where: str = "rd") -> None:
    """RD halves the resolution five times and upsamples back: sides must be multiples of 32."""
    if height % 32 or width % 32 or height < 32 or width < 32:
        raise UserError(
            f"{where}: image size {height}x{width} is not a multiple of 32; use e.g. 64, 128 "
            f"or 224 (--image-size)"
        )


# --------------------------------------------------------------------------------------------
# Feature cache


def feature_bytes(backbone: str, n_images: int, height: int, width: int, itemsize: int = 4) -> int:
    """Bytes the teacher features of ``n_images`` images of size (height, width) take."""
    per_image = sum(
        c * (height // s) * (width // s) for c, s in zip(CHANNELS[backbone], STRIDES)
    )
    return per_image * n_images * itemsize


class FeatureCache:
    """Teacher features of a fixed set of images, computed once (no augmentation in RD/CDD).

    Args:
        teacher: the frozen teacher, already on ``device``.
        images: uint8 (N, 3, H, W) on any device.
        device: where features are computed and where :meth:`get` returns them.
        storage: ``"auto"`` (``device`` when the features fit in half of the free GPU memory,
            else CPU), ``"device"`` or ``"cpu"``. On CPU hosts everything stays on CPU.
        batch_size: images per teacher forward while filling the cache.
        channels_last: feed the teacher channels_last input (CUDA speed switch).
        copies: how many feature sets of this size the caller will keep beside the cache,
            itself included (CDD keeps the previous global student's, and the domain students'
            outputs on part of the set: a fraction); ``"auto"`` budgets for all of them.

    Attributes:
        feats: list of 3 float32 tensors (N, C_l, H/s_l, W/s_l) on ``storage_device``.
        storage_device: where ``feats`` live.
    """

    def __init__(
        self,
        teacher: Teacher,
        images: torch.Tensor,
        device: str | torch.device,
        storage: Literal["auto", "device", "cpu"] = "auto",
        batch_size: int = 32,
        channels_last: bool = False,
        copies: float = 1,
    ):
        self.device = torch.device(device)
        self.channels_last = channels_last
        n, _, h, w = images.shape
        self.storage_device = self._choose_storage(storage, teacher.backbone, n, h, w, copies)
        pin = self.storage_device.type == "cpu" and self.device.type == "cuda"
        self.feats: list[torch.Tensor] = []
        # no_grad, not inference_mode: cached tensors later feed the student's autograd graph.
        with torch.no_grad():
            for start in range(0, n, batch_size):
                x = teacher_input(images[start:start + batch_size], self.device, channels_last)
                out = teacher.encode(x)
                if not self.feats:
                    self.feats = [
                        torch.empty((n, *f.shape[1:]), dtype=torch.float32,
                                    device=self.storage_device, pin_memory=pin)
                        for f in out
                    ]
                for buf, f in zip(self.feats, out):
                    buf[start:start + f.shape[0]].copy_(f, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _choose_storage(self, storage: str, backbone: str, n: int, h: int, w: int,
                        copies: float = 1) -> torch.device:
        if storage == "cpu" or self.device.type != "cuda":
            return torch.device("cpu")
        if storage == "device":
            return self.device
        if storage != "auto":
            raise UserError(f"cache_device {storage!r} must be 'auto', 'device' or 'cpu'")
        free, _ = torch.cuda.mem_get_info(self.device)
        # Leave at least half of the free memory for training activations.
        fits = copies * feature_bytes(backbone, n, h, w) <= free // 2
        return self.device if fits else torch.device("cpu")

    def __len__(self) -> int:
        return int(self.feats[0].shape[0]) if self.feats else 0

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.feats)

    def get(self, index: torch.Tensor) -> list[torch.Tensor]:
        """Features of images ``index`` (1-D long tensor, any device), on ``self.device``."""
        index = index.to(self.storage_device, non_blocking=True)
        out = [f.index_select(0, index).to(self.device, non_blocking=True) for f in self.feats]
        if self.channels_last:
            # index_select returns NCHW; hand the student the layout its weights use.
            out = [f.contiguous(memory_format=torch.channels_last) for f in out]
        return out


# --------------------------------------------------------------------------------------------
# Training helpers shared with CDD


def make_adam(
    params, lr: float, betas: Sequence[float], device: str | torch.device
) -> torch.optim.Adam:
    """RD's optimizer: Adam(lr, betas); fused kernels on CUDA, multi-tensor on CPU.

    Both variants implement the same update rule; they only launch fewer kernels.
    """
    cuda = torch.device(device).type == "cuda"
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True if cuda else None,
                            foreach=None if cuda else True)


def precision_name(device: str | torch.device, amp_bf16: bool) -> str:
    """What arithmetic the student runs in, for the record: ``"bf16-autocast"``,
    ``"float32+tf32-conv"`` (CUDA with cuDNN's TF32 convolutions, PyTorch's default) or
    ``"float32"``."""
    if torch.device(device).type != "cuda":
        return "float32"
    if amp_bf16:
        return "bf16-autocast"
    return "float32+tf32-conv" if torch.backends.cudnn.allow_tf32 else "float32"


def student_autocast(device: str | torch.device, amp_bf16: bool):
    """Context for student forward passes: bf16 autocast on CUDA if ``amp_bf16``, else a no-op.

    Compute losses and maps on ``.float()`` outputs (:func:`rd_loss` and :func:`anomaly_maps`
    do), so only the student's convolutions run in bf16.
    """
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=torch.device(device).type == "cuda" and amp_bf16)


# --------------------------------------------------------------------------------------------
# The method


@register_method
class ReverseDistillation(Method):
    """RD baseline: frozen teacher, OCBE + decoder student trained with :func:`rd_loss`.

    ``fit`` shuffles with a ``torch.Generator`` seeded by ``seed`` (a fresh permutation each
    epoch, last batch kept even if smaller, as RD4AD's DataLoader with ``shuffle=True`` and the
    default ``drop_last=False``). The student is in train mode during fit (BatchNorm batch
    statistics, as RD4AD) and in eval mode in ``predict``.
    """

    name = "rd"
    Config = RDConfig
    display_name = paper_name = "RD"
    column_rank = 10
    # The paper's runs: WRN50 teacher, 200 epochs, no step cap (CDD paper §5.1).
    paper_setup = {"epochs": 200, "backbone": "wide_resnet50_2", "max_steps": None}
    smoke_overrides = {"backbone": "resnet18", "epochs": 1, "max_steps": 2, "batch_size": 4}

    def __init__(self, config: RDConfig | None = None, *, teacher_weights: str = "imagenet",
                 device: str | torch.device = "cpu", seed: int = 0):
        super().__init__(config, teacher_weights=teacher_weights, device=device, seed=seed)
        self.teacher: Teacher | None = None
        self.student: RDStudent | None = None
        self._fit_precision: str | None = None

    # -- helpers ---------------------------------------------------------------------------

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def _channels_last(self) -> bool:
        return self._cuda and self.config.channels_last

    def _autocast(self):
        return student_autocast(self.device, self.config.amp_bf16)

    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self._channels_last else torch.contiguous_format

    def _build_teacher(self) -> Teacher:
        if self.teacher is None:
            teacher = build_teacher(self.config.backbone, self.teacher_weights)
            self.teacher = teacher.to(self.device, memory_format=self._memory_format())
        return self.teacher

    def _new_student(self, seed: int | None = None) -> RDStudent:
        """A fresh student drawn from ``seed`` (default: the method's seed), on the device."""
        student = build_student(self.config.backbone, seed=self.seed if seed is None else seed)
        return student.to(self.device, memory_format=self._memory_format())

    def _note_precision(self) -> None:
        """Remember the arithmetic this fit runs in (TF32 flags as they are now)."""
        self._fit_precision = precision_name(self.device, self.config.amp_bf16)

    # -- Method API ------------------------------------------------------------------------

    @classmethod
    def geometry_check(cls, config: Any, image_size: int, resize_size: int) -> None:
        """Sides must be multiples of 32 (:func:`check_image_size`), checked before a sweep."""
        check_image_size(image_size, image_size, cls.name)

    def fit(self, train: TrainSet, observer: EpochObserver | None = None) -> None:
        """Train the student on ``train.images`` (uint8 (N, 3, H, W), H and W multiples of 32).

        Calls ``observer(epoch, {"loss", "steps"})`` after each epoch (epoch counts from 0;
        ``loss`` is the mean batch loss of the epoch, ``steps`` the optimizer steps so far).
        Stops after ``config.epochs`` epochs or ``config.max_steps`` steps, whichever is first.
        """
        cfg = self.config
        n, _, h, w = train.images.shape
        check_image_size(h, w)
        if n == 0:
            raise UserError("rd: the training set is empty; check the category's train folder")
        if (h // 32) * (w // 32) == 1 and (cfg.batch_size == 1 or n % cfg.batch_size == 1):
            # BatchNorm in train mode cannot normalise one value per channel.
            raise UserError(
                f"rd: {h}x{w} images with a last batch of one image cannot train BatchNorm; "
                f"use an image size of at least 64 or another batch_size"
            )
        teacher = self._build_teacher()
        self._note_precision()
        self.student = student = self._new_student()
        student.train()
        optimizer = make_adam(student.parameters(), cfg.lr, cfg.betas, self.device)
        generator = torch.Generator().manual_seed(self.seed)
        if cfg.feature_cache:
            cache = FeatureCache(teacher, train.images, self.device, storage=cfg.cache_device,
                                 channels_last=self._channels_last)
            images = None
        else:
            cache = None
            # Decoded once, kept as uint8 on the device: no per-epoch reloading.
            images = train.images.to(self.device)
        steps = 0
        # Batches are gathered where the data lives; the permutation goes there once per epoch.
        data_device = cache.storage_device if cache is not None else self.device
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=generator).to(data_device)
            losses = []
            for start in range(0, n, cfg.batch_size):
                index = order[start:start + cfg.batch_size]
                if cache is not None:
                    t_feats = cache.get(index)
                else:
                    with torch.no_grad():
                        t_feats = teacher(images.index_select(0, index))
                with self._autocast():
                    s_feats = student(t_feats)
                loss = rd_loss(t_feats, s_feats)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # Kept on the device; one host sync per epoch instead of one per step.
                losses.append(loss.detach())
                steps += 1
                if cfg.max_steps is not None and steps >= cfg.max_steps:
                    break
            mean_loss = float(torch.stack(losses).mean())
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"rd: loss became {mean_loss} at epoch {epoch}")
            if observer is not None:
                observer(epoch, {"loss": mean_loss, "steps": float(steps)})
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        student.eval()

    def predict(self, images: torch.Tensor, batch_size: int = 32) -> Prediction:
        """Scores (N,) = max of each map; maps (N, H, W) float32 at the input size."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"rd: expected uint8 images (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        n, _, h, w = images.shape
        check_image_size(h, w)
        if self.student is None:
            raise RuntimeError("rd: predict() needs fit() or load_state_dict() first")
        teacher = self._build_teacher()
        self.student.eval()
        # Maps stay on the device until the end: one device-to-host copy instead of one a batch.
        maps = torch.empty((n, h, w), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                t_feats = teacher(images[start:start + batch_size])
                with self._autocast():
                    s_feats = self.student(t_feats)
                batch_maps = anomaly_maps(t_feats, s_feats, (h, w), self.config.gaussian_sigma)
                maps[start:start + batch_maps.shape[0]].copy_(batch_maps)
        scores = maps.amax(dim=(1, 2)) if n else torch.empty(0, device=self.device)
        return Prediction(scores=scores.cpu().numpy(), maps=maps.cpu().numpy())

    def state_dict(self) -> dict[str, Any]:
        """Student weights (CPU) + what rebuilds the teacher (its weights and id) + the seed."""
        if self.student is None:
            raise RuntimeError("rd: state_dict() needs fit() first")
        return {
            "method": self.name,
            "config": dataclasses.asdict(self.config),
            "teacher_weights": self.teacher_weights,
            "seed": self.seed,
            "teacher_weights_id": self._weights_id(),
            "precision": self._fit_precision,
            "student": {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the teacher is rebuilt, and must have the same id."""
        if state.get("method") != self.name:
            raise UserError(f"{self.name}: state holds method {state.get('method')!r}, not "
                            f"{self.name!r}")
        self.config = self.config_from_dict(state["config"])
        self.teacher_weights = state["teacher_weights"]
        self.seed = int(state["seed"])
        self._fit_precision = state.get("precision")
        self.teacher = None
        teacher = self._build_teacher()
        if teacher.weights_id != state["teacher_weights_id"]:
            raise UserError(
                f"rd: teacher weights {self.teacher_weights!r} now give {teacher.weights_id}, "
                f"but the saved model was trained with {state['teacher_weights_id']}; restore "
                f"that weight file"
            )
        student = RDStudent(self.config.backbone)
        student.load_state_dict(state["student"])
        self.student = student.to(self.device, memory_format=self._memory_format()).eval()

    @classmethod
    def weights_check(cls, config, teacher_weights):
        """The teacher: (backbone, weights), built once (a random teacher needs no check)."""
        return teacher_check(config.backbone, teacher_weights)

    def _weights_id(self) -> str:
        if self.teacher is not None:
            return self.teacher.weights_id
        return weights_id(self.config.backbone, self.teacher_weights)

    def describe(self) -> dict[str, Any]:
        """Base provenance + backbone, teacher weights id, whether it is paper-comparable and
        the precision the student ran in (that of the last fit, else the configured one)."""
        info = super().describe()
        wid = self._weights_id()
        info.update(
            backbone=self.config.backbone,
            teacher_weights_id=wid,
            precision=self._fit_precision or precision_name(self.device, self.config.amp_bf16),
            # The paper's teacher (WRN50, ImageNet); the report judges the rest (size, epochs, caps).
            paper_teacher=self.config.backbone == "wide_resnet50_2"
            and wid.startswith("imagenet:"),
        )
        return info
