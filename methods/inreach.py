"""InReaCh: Inter-Realization Channels (McIntosh & Albu, ICCV 2023), training-free.

Reference code: DeclanMcIntosh/InReaCh at a0d54ba (``InReaCh.py``, ``FeatureDescriptors.py``,
``utils.py``, ``model.py``, ``mvtec_loader.py``). The method, as that code runs it:

1. Patch descriptors (:meth:`InReaCh.embed`): the outputs of 13 residual blocks of an ImageNet
   WideResNet-50 (all of layer1 and layer2, layer3 without its first block, the first block of
   layer4), each turned into 3x3 neighbourhoods, resized to the first block's grid (56 x 56 at
   224 px), pooled to 1024 values per block and again to 1024 across blocks: PatchCore's
   aggregation, :func:`methods.softpatch.patch_features`.
2. Positional channels (:func:`transpose_mse`): if the mean training image differs from its
   transpose (MSE >= 1000 on the 0-255 scale, an aligned object rather than a texture), two
   channels (column and row index x 5 / grid size) are appended to every descriptor.
3. Associations (:func:`associate`): the first ``assoc_depth`` training images are seeds; every
   later image's patches are matched to every earlier seed by exact mutual nearest neighbours;
   each patch keeps its nearest seed and is dropped if that match is not mutual.
4. Channels (:func:`channel_members`, :func:`filter_channels`): matches are grouped by (patch
   position, seed); a channel is that seed patch plus its matched patches. Channels with more
   than 3 members are kept, then their members within 5 spherical standard deviations of the
   channel mean, then the channels that still have more than 3 members. Every kept member is a
   bank patch; there is no coreset.
5. Scoring: squared L2 distance of each test patch to its nearest bank patch, the patch grid
   upsampled by nearest neighbour to the image, a Gaussian of sigma 13; the image score is the
   maximum of the smoothed map.

The reference code does three things its paper's description does not suggest; each is a switch
whose default replicates the code (``docs/inreach.md`` gives the reading behind each):

- ``channel_indices``: ``gen_assoc`` stores [image patch, seed patch] but ``gen_channels`` reads
  the columns the other way round, so a channel holds the seed's patch at the *image's* position
  and the image's patch at the *seed's* position (``official``); ``matched`` pairs the patches
  that were actually matched.
- ``colour``: images are read by OpenCV (BGR) and normalised with the ImageNet mean in a
  permuted order, (0.456, 0.406, 0.485) (``official_bgr``); ``rgb`` is the usual ImageNet input.
- ``batchnorm``: the network is never put in eval mode and sees one image at a time, so every
  BatchNorm layer normalises with that image's own statistics (``per_image``); ``running`` uses
  the stored ImageNet statistics.

Memory: the training descriptors are kept once, in float16 by default (``feature_dtype``), on the
device when they fit; ``store_mb`` caps them and a category that needs more stops with one line
naming that field. Every pairwise-distance computation is chunked to ``budget_mb``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from bench.errors import UserError
from methods import coreset as cs
from methods.backbones import (
    IMAGENET_STD,
    TEACHER_MODULES,
    check_backbone,
    load_backbone_net,
    teacher_check,
    teacher_input,
    weights_id,
)
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
from methods.softpatch import patch_features

STATE_FORMAT = "inreach-bank/1"
# Config fields that change speed and memory, never a result: a saved bank loads whatever they are.
_RESULT_NEUTRAL_FIELDS = ("batch_size", "budget_mb", "store", "store_mb")

# Block outputs read from each backbone (torchvision module names). WideResNet-50: the 13 nodes
# of InReaCh.py __main__ (``layer*.*.relu_2`` is the block's output ReLU, i.e. the block's
# output). ResNet-18 stands in for CPU-sized runs with the same rule: every block of layer1 and
# layer2, layer3 without its first block, the first block of layer4.
BLOCKS = {
    "wide_resnet50_2": (
        "layer1.0", "layer1.1", "layer1.2",
        "layer2.0", "layer2.1", "layer2.2", "layer2.3",
        "layer3.1", "layer3.2", "layer3.3", "layer3.4", "layer3.5",
        "layer4.0",
    ),
    "resnet18": ("layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.1", "layer4.0"),
}
# FeatureDescriptors.py image_net_norm: the ImageNet mean in the order (G, B, R) of RGB, applied
# to BGR channels; the std is ImageNet's in RGB order.
OFFICIAL_MEAN = (0.456, 0.406, 0.485)
REFERENCE_SIZE = 224  # the image size sigma = 13 was set for (mvtec_loader.py crop 224)


@dataclass(frozen=True)
class InReaChConfig:
    """InReaCh settings; defaults are the reference code's (file named per field)."""

    backbone: str = "wide_resnet50_2"  # model.py load_wide_resnet_50 (torchvision WRN50-2)
    patchsize: int = 3  # FeatureDescriptors.py Feautre_Descriptor(agg_size=3, agg_stride=1)
    pretrain_embed_dimension: int = 1024  # Feautre_Descriptor(pretrain_embed_dimension=1024)
    target_embed_dimension: int = 1024  # Feautre_Descriptor(target_embed_dimension=1024)
    assoc_depth: int = 10  # InReaCh.__init__(assoc_depth=10): number of seed images
    min_channel_length: int = 3  # InReaCh.__init__(min_channel_length=3): keep if > 3 members
    max_channel_std: float = 5.0  # InReaCh __main__ max_channel_std=5: member within 5 x std
    # utils.py positional_test_and_alignment: "auto" runs the transpose test; "on"/"off" force
    # the positional channels (harness switch).
    positional: Literal["auto", "on", "off"] = "auto"
    pos_embed_thresh: float = 1000.0  # InReaCh.__init__(pos_embed_thresh=1000)
    pos_embed_weight: float = 5.0  # InReaCh.__init__(pos_embed_weight=5.0)
    sigma: float = 13.0  # InReaCh.__init__(filter_size=13), passed to gaussian_filter as sigma
    # "fixed": sigma pixels at any image size (the code); "image_size": sigma x H / 224 (open
    # point: the code only runs at 224).
    sigma_scaling: Literal["fixed", "image_size"] = "fixed"
    # InReaCh.py gen_assoc/gen_channels: "official" = the code's swapped columns, "matched" =
    # the matched pairs (the paper's description).
    channel_indices: Literal["official", "matched"] = "official"
    # mvtec_loader.py cv2.imread (BGR) + FeatureDescriptors.py image_net_norm (permuted mean):
    # "official_bgr"; "rgb" = torchvision's ImageNet normalisation.
    colour: Literal["official_bgr", "rgb"] = "official_bgr"
    # model.py never calls eval(), and images go through one at a time: "per_image" BatchNorm
    # statistics; "running" = the ImageNet running statistics (eval mode).
    batchnorm: Literal["per_image", "running"] = "per_image"
    # Storage of the training descriptors and of the bank (the code: float32). Distances are
    # always computed in float32.
    feature_dtype: Literal["float16", "float32"] = "float16"
    # Where the training descriptors live during fit: "auto" = the device when they take less
    # than half of its free memory, else host memory (harness; results do not depend on it).
    store: Literal["auto", "device", "cpu"] = "auto"
    store_mb: float = 8192.0  # largest training descriptor store fit accepts (harness)
    batch_size: int = 8  # images per backbone forward (throughput only; the code uses 1)
    budget_mb: float = 256.0  # largest distance block in the chunked searches (memory only)

    def __post_init__(self):
        check_backbone(self.backbone)

        def bad(field: str, why: str) -> UserError:
            return UserError(f"inreach config {field}={getattr(self, field)!r} {why}")

        choices = {
            "positional": ("auto", "on", "off"),
            "sigma_scaling": ("fixed", "image_size"),
            "channel_indices": ("official", "matched"),
            "colour": ("official_bgr", "rgb"),
            "batchnorm": ("per_image", "running"),
            "feature_dtype": ("float16", "float32"),
            "store": ("auto", "device", "cpu"),
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise bad(field, f"must be one of {', '.join(allowed)}")
        for field in ("patchsize", "pretrain_embed_dimension", "target_embed_dimension",
                      "assoc_depth", "min_channel_length", "batch_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(field, "must be an integer")
        for field in ("max_channel_std", "pos_embed_thresh", "pos_embed_weight", "sigma",
                      "store_mb", "budget_mb"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(field, "must be a number")
            if not math.isfinite(value):
                raise bad(field, "must be finite")
        if self.patchsize < 1 or self.patchsize % 2 == 0:
            raise bad("patchsize", "must be an odd number >= 1")
        for field in ("pretrain_embed_dimension", "target_embed_dimension", "assoc_depth",
                      "batch_size"):
            if getattr(self, field) < 1:
                raise bad(field, "must be >= 1")
        if self.min_channel_length < 0:
            raise bad("min_channel_length", "must be >= 0")
        for field in ("max_channel_std", "store_mb", "budget_mb"):
            if getattr(self, field) <= 0:
                raise bad(field, "must be > 0")
        for field in ("pos_embed_thresh", "pos_embed_weight", "sigma"):
            if getattr(self, field) < 0:
                raise bad(field, "must be >= 0")


# --------------------------------------------------------------------------------------------
# Backbone and input


class PerImageBatchNorm(nn.Module):
    """A BatchNorm2d that normalises every image with its own per-channel statistics.

    What a BatchNorm layer in training mode computes for a batch of one image (biased variance,
    the layer's affine weight and bias, its eps), for any batch size: the reference code's
    features, batched. Running statistics are neither used nor updated.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.bn.weight, bias=self.bn.bias, eps=self.bn.eps)


def _use_per_image_batchnorm(net: nn.Module) -> None:
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, PerImageBatchNorm(child))


def build_block_extractor(
    backbone: str, weights: str, batchnorm: str = "per_image"
) -> tuple[nn.Module, str]:
    """A frozen module mapping normalised images to the dict {block name: output} of
    :data:`BLOCKS` (layers after the last block are not run), and the weights' provenance id."""
    net, wid = load_backbone_net(backbone, weights, needs=(*TEACHER_MODULES, "layer4"))
    if batchnorm == "per_image":
        _use_per_image_batchnorm(net)
    extractor = create_feature_extractor(
        net, return_nodes={b: b for b in BLOCKS[backbone]},
        # instance_norm's input checks cannot be traced symbolically: keep the layer whole.
        tracer_kwargs={"leaf_modules": [PerImageBatchNorm]},
    )
    extractor.eval()
    for param in extractor.parameters():
        param.requires_grad_(False)
    return extractor, wid


def backbone_input(images: torch.Tensor, device: torch.device, colour: str) -> torch.Tensor:
    """Normalised float32 input (B, 3, H, W) on ``device`` from uint8 RGB images.

    ``official_bgr`` reproduces the reference: channels reversed to OpenCV's BGR order, then
    ``(x / 255 - (0.456, 0.406, 0.485)) / (0.229, 0.224, 0.225)`` per channel as loaded.
    """
    if colour == "rgb":
        return teacher_input(images, device)
    x = images.to(device).flip(1).float().div_(255.0)
    mean = torch.tensor(OFFICIAL_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def transpose_mse(images: torch.Tensor, batch_size: int = 64) -> float:
    """The reference's positional test statistic (utils.py test_for_positional_class_transpose).

    The mean image of uint8 images (N, 3, H, W) is compared with its transpose: both cast to
    float16 and the mean squared difference taken in float16, on the reference's (H, W, BGR)
    layout, so the value (and its float16 rounding) is the reference's. Large for aligned
    objects, small for textures and for images symmetric about the diagonal.
    """
    n, _, height, width = images.shape
    if height != width:
        raise UserError(f"inreach: the positional test needs square images, got {height}x{width}")
    total = torch.zeros(images.shape[1:], dtype=torch.float64)
    for start in range(0, n, batch_size):  # integer sums in float64 are exact
        total += images[start:start + batch_size].to(torch.float64).sum(0)
    mean = (total / n).numpy()[::-1].transpose(1, 2, 0)  # (H, W, BGR) as cv2 loads it
    mean16 = mean.astype(np.float16)
    flipped16 = np.transpose(mean, (1, 0, 2)).astype(np.float16)
    return float(np.mean(np.square(mean16 - flipped16)))


def positional_channels(batch: int, height: int, width: int, weight: float,
                        device: torch.device) -> torch.Tensor:
    """(B, h, w, 2): column index x weight / w and row index x weight / h at every position
    (FeatureDescriptors.py generate_descriptors; the reference divides both by the grid side,
    the same thing on square grids)."""
    cols = torch.arange(width, device=device, dtype=torch.float32) * (weight / width)
    rows = torch.arange(height, device=device, dtype=torch.float32) * (weight / height)
    grid = torch.stack(
        [cols[None, :].expand(height, width), rows[:, None].expand(height, width)], dim=-1
    )
    return grid[None].expand(batch, height, width, 2)


# --------------------------------------------------------------------------------------------
# Associations


def mutual_nearest_neighbors(
    seed: torch.Tensor, images: torch.Tensor, *, budget_mb: float = cs.DEFAULT_BUDGET_MB
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image patch's nearest seed patch, and whether the match is mutual.

    Args:
        seed: (S, D) float, one seed image's patches.
        images: (B, P, D) float, the patches of B images, each matched to the seed on its own.
        budget_mb: bound on one (B, P, s) distance block; the seed's rows are chunked to fit.

    Returns:
        ``nearest`` (B, P) long: the seed patch nearest to each image patch; ``sq_dist`` (B, P):
        its squared L2 distance; ``mutual`` (B, P) bool: that seed patch's nearest patch in the
        same image is this one. Ties go to the lowest index (the reference's chunked ``>=``
        gives them to a later chunk, whose size depends on free GPU memory).
    """
    batch, n_patches, _ = images.shape
    n_seed = seed.shape[0]
    img_sq = (images * images).sum(-1, keepdim=True)  # (B, P, 1)
    seed_sq = (seed * seed).sum(-1)  # (S,)
    # Two (B, P, s) blocks live at once: the distances (built in place) and a comparison.
    step = min(n_seed, cs.rows_per_chunk(2.0 * batch * n_patches * images.element_size(), budget_mb))
    best_d = torch.full((batch, n_patches), float("inf"), dtype=images.dtype, device=images.device)
    best_i = torch.zeros((batch, n_patches), dtype=torch.long, device=images.device)
    seed_to_image = torch.empty((batch, n_seed), dtype=torch.long, device=images.device)
    for s0 in range(0, n_seed, step):
        block = seed[s0:s0 + step]
        d2 = (images @ block.T).mul_(-2.0).add_(img_sq).add_(seed_sq[s0:s0 + step]).clamp_(min=0)
        values, index = d2.min(dim=2)  # first minimum within the block
        better = values < best_d  # strict: an earlier block keeps its ties
        best_d = torch.where(better, values, best_d)
        best_i = torch.where(better, index + s0, best_i)
        seed_to_image[:, s0:s0 + block.shape[0]] = d2.argmin(dim=1)
    back = torch.gather(seed_to_image, 1, best_i)
    mutual = back == torch.arange(n_patches, device=images.device)[None, :]
    return best_i, best_d, mutual


@dataclass
class Associations:
    """Each training patch's best seed match (arrays (N, P), image-major, CPU).

    ``seed``: the seed image it matched best (-1 where no seed precedes the image: image 0);
    ``seed_patch``: the seed patch it matched; ``sq_dist``: that match's squared distance;
    ``mutual``: whether that best match is mutual (only those become channel members).
    """

    seed: np.ndarray
    seed_patch: np.ndarray
    sq_dist: np.ndarray
    mutual: np.ndarray


def associate(
    store: torch.Tensor,
    n_seeds: int,
    device: torch.device,
    *,
    budget_mb: float = cs.DEFAULT_BUDGET_MB,
) -> Associations:
    """Best-seed mutual-nearest-neighbour associations of every training patch.

    ``store`` (N, P, D): all training descriptors (any float dtype, any device). Seeds are images
    0 .. n_seeds-1; image j is matched against every seed s < j (InReaCh.py gen_channels), and
    each of its patches keeps the seed with the smallest nearest-neighbour distance (ties: the
    lowest seed, as numpy's argmin), mutual or not. Distances are computed in float32 on
    ``device``; the images are visited in chunks that fit ``budget_mb``.
    """
    n_images, n_patches, _ = store.shape
    n_seeds = max(0, min(int(n_seeds), n_images - 1))
    best_d = torch.full((n_images, n_patches), float("inf"), device=device)
    best_seed = torch.full((n_images, n_patches), -1, dtype=torch.long, device=device)
    best_patch = torch.zeros((n_images, n_patches), dtype=torch.long, device=device)
    best_mutual = torch.zeros((n_images, n_patches), dtype=torch.bool, device=device)
    seeds = store[:n_seeds].to(device=device, dtype=torch.float32)
    # Images per chunk: their (chunk, P, P) distance blocks (x2) fit the budget; at least one.
    per_chunk = cs.rows_per_chunk(2.0 * n_patches * n_patches * 4, budget_mb)
    for start in range(1, n_images, per_chunk):
        stop = min(n_images, start + per_chunk)
        chunk = store[start:stop].to(device=device, dtype=torch.float32)
        for s in range(min(n_seeds, stop - 1)):
            first = max(start, s + 1)  # images after seed s only
            sub = chunk[first - start:]
            nearest, sq_dist, mutual = mutual_nearest_neighbors(
                seeds[s], sub, budget_mb=budget_mb
            )
            rows = slice(first, stop)
            better = sq_dist < best_d[rows]  # seeds ascend: a lower seed keeps its ties
            best_d[rows] = torch.where(better, sq_dist, best_d[rows])
            best_seed[rows] = torch.where(better, torch.full_like(nearest, s), best_seed[rows])
            best_patch[rows] = torch.where(better, nearest, best_patch[rows])
            best_mutual[rows] = torch.where(better, mutual, best_mutual[rows])
        del chunk
    return Associations(
        seed=best_seed.cpu().numpy(), seed_patch=best_patch.cpu().numpy(),
        sq_dist=best_d.cpu().numpy(), mutual=best_mutual.cpu().numpy(),
    )


# --------------------------------------------------------------------------------------------
# Channels


@dataclass
class ChannelMembers:
    """The members of every channel, one row each (CPU arrays, sorted by image then position).

    ``channel``: channel id = seed x P + key position; ``image``, ``position``: where the
    member's descriptor is in the training store. Row order puts each channel's seed member
    among its seed image's rows.
    """

    channel: np.ndarray
    image: np.ndarray
    position: np.ndarray


def channel_members(assoc: Associations, convention: str = "official") -> ChannelMembers:
    """Group the mutual best matches into channels keyed by (patch position, seed).

    For a match of image j's patch x to seed s's patch t (InReaCh.py gen_channels):

    - ``official``: key (x, s); members: seed s's patch at x and image j's patch at t, i.e. the
      code's reading of the association columns, swapped with respect to how they were stored;
    - ``matched``: key (t, s); members: seed s's patch at t and image j's patch at x (the
      patches that were matched).

    Every channel is its seed member plus one member per associated patch.
    """
    if convention not in ("official", "matched"):
        raise ValueError(f"unknown channel convention {convention!r}")
    n_images, n_patches = assoc.seed.shape
    image_idx, patch_idx = np.nonzero(assoc.mutual & (assoc.seed >= 0))
    seed = assoc.seed[image_idx, patch_idx]
    seed_patch = assoc.seed_patch[image_idx, patch_idx]
    if convention == "official":
        key_pos, member_pos = patch_idx, seed_patch
    else:
        key_pos, member_pos = seed_patch, patch_idx
    channel = seed * n_patches + key_pos
    # One seed member per channel that has at least one associated member.
    channels = np.unique(channel)
    seed_image, seed_pos = np.divmod(channels, n_patches)
    all_channel = np.concatenate([channel, channels])
    all_image = np.concatenate([image_idx, seed_image])
    all_pos = np.concatenate([member_pos, seed_pos])
    order = np.lexsort((all_channel, all_pos, all_image))
    return ChannelMembers(
        channel=all_channel[order].astype(np.int64),
        image=all_image[order].astype(np.int64),
        position=all_pos[order].astype(np.int64),
    )


@dataclass
class ChannelFilter:
    """Outcome of :func:`filter_channels`: the bank (unique flat store indices image x P +
    position, sorted) and what happened to the channels."""

    bank_index: np.ndarray
    n_channels: int
    n_candidate_channels: int  # channels with > min_channel_length members
    n_kept_channels: int
    n_bank_members: int  # kept members counted per channel (a patch can be in several)


def _per_image_rows(image: np.ndarray) -> list[tuple[int, int, int]]:
    """(image, first row, stop row) of each image's block in rows sorted by image."""
    if image.size == 0:
        return []
    bounds = np.flatnonzero(np.diff(image)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [image.size]])
    return [(int(image[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def filter_channels(
    store: torch.Tensor,
    members: ChannelMembers,
    *,
    min_length: int = 3,
    max_std: float = 5.0,
    device: torch.device | str = "cpu",
) -> ChannelFilter:
    """The reference's channel filter (InReaCh.py gen_channels, "Filter Channels").

    A channel with more than ``min_length`` members is a candidate. Its mean descriptor and its
    *spherical* standard deviation (the population std of the members' L2 distances to the
    mean) are computed; members at distance < ``max_std`` x std are kept (strict: a channel
    whose members are all equally far from its mean keeps none), and the channel survives if
    more than ``min_length`` remain. Statistics are computed in float64 (the code: float32).

    The sums run image by image: within one image every member belongs to a different channel
    (mutual matches are one-to-one), so each scatter-add has distinct targets and the result is
    deterministic on any device.
    """
    device = torch.device(device)
    n_images, n_patches, dim = store.shape
    channel_ids, inverse, counts = np.unique(members.channel, return_inverse=True,
                                             return_counts=True)
    n_channels = int(channel_ids.size)
    candidate = counts > min_length
    keep_row = candidate[inverse]
    ch = inverse[keep_row]
    image = members.image[keep_row]
    position = members.position[keep_row]
    n_candidates = int(candidate.sum())
    empty = ChannelFilter(np.zeros(0, dtype=np.int64), n_channels, n_candidates, 0, 0)
    if ch.size == 0:
        return empty
    blocks = _per_image_rows(image)

    def member_features(img: int, a: int, b: int) -> torch.Tensor:
        pos = torch.from_numpy(position[a:b]).to(store.device)
        return store[img].index_select(0, pos).to(device=device, dtype=torch.float64)

    sums = torch.zeros((n_channels, dim), dtype=torch.float64, device=device)
    for img, a, b in blocks:
        sums.index_add_(0, torch.from_numpy(ch[a:b]).to(device), member_features(img, a, b))
    mean = sums / torch.from_numpy(counts).to(device=device, dtype=torch.float64)[:, None]
    del sums
    dist = np.empty(ch.size, dtype=np.float64)
    for img, a, b in blocks:
        idx = torch.from_numpy(ch[a:b]).to(device)
        diff = member_features(img, a, b) - mean.index_select(0, idx)
        dist[a:b] = torch.linalg.vector_norm(diff, dim=1).cpu().numpy()
    del mean
    n_per = counts.astype(np.float64)
    mean_d = np.bincount(ch, weights=dist, minlength=n_channels) / np.maximum(n_per, 1)
    var_d = np.bincount(ch, weights=(dist - mean_d[ch]) ** 2, minlength=n_channels) / np.maximum(
        n_per, 1)
    std_d = np.sqrt(var_d)
    inside = dist < max_std * std_d[ch]
    kept_per_channel = np.bincount(ch, weights=inside.astype(np.float64), minlength=n_channels)
    channel_ok = kept_per_channel > min_length
    in_bank = inside & channel_ok[ch]
    flat = image[in_bank] * n_patches + position[in_bank]
    return ChannelFilter(
        bank_index=np.unique(flat).astype(np.int64),
        n_channels=n_channels,
        n_candidate_channels=n_candidates,
        n_kept_channels=int(channel_ok.sum()),
        n_bank_members=int(in_bank.sum()),
    )


# --------------------------------------------------------------------------------------------
# The method


@register_method
class InReaCh(Method):
    """InReaCh: a nominal bank of patches that associate well across training images.

    After :meth:`fit`: ``bank`` (K, D) on the method's device (``feature_dtype``), ``positional``
    (whether the positional channels are on), ``fit_stats`` (the scalars given to the observer).
    """

    name = "inreach"
    Config = InReaChConfig
    display_name = paper_name = "InReaCh"
    column_rank = 60
    # The paper's numbers come from the reference code: its backbone and its three behaviours.
    paper_setup = {"backbone": "wide_resnet50_2", "channel_indices": "official",
                   "colour": "official_bgr", "batchnorm": "per_image"}
    # Few training images give short channels: keep those of two members or more.
    smoke_overrides = {"backbone": "resnet18", "min_channel_length": 1}

    @classmethod
    def weights_check(cls, config, teacher_weights):
        """The backbone up to layer4 (InReaCh reads layer4.0): a file must hold all of it."""
        return teacher_check(config.backbone, teacher_weights, (*TEACHER_MODULES, "layer4"))

    def __init__(
        self,
        config: Any = None,
        *,
        teacher_weights: str = "imagenet",
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        super().__init__(config, teacher_weights=teacher_weights, device=device, seed=seed)
        self._extractor: nn.Module | None = None
        self._weights_id: str | None = None
        self.bank: torch.Tensor | None = None
        self._bank_sq_norms: torch.Tensor | None = None
        self.positional: bool | None = None
        self.image_size: tuple[int, int] | None = None
        self.fit_stats: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------
    # Features

    @property
    def extractor(self) -> nn.Module:
        """The frozen block extractor, built on first use (on the method's device)."""
        if self._extractor is None:
            cfg = self.config
            net, self._weights_id = build_block_extractor(
                cfg.backbone, self.teacher_weights, cfg.batchnorm
            )
            self._extractor = net.to(self.device)
        return self._extractor

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Descriptors (B, h, w, D) of uint8 images (B, 3, H, W), float32 on the device; D is
        ``target_embed_dimension`` (+ 2 with the positional channels, once fit decided them)."""
        cfg = self.config
        if cfg.batchnorm == "per_image" and min(images.shape[-2:]) <= 32:
            raise UserError(
                f"{self.name}: batchnorm=per_image needs images larger than 32 px (layer4 "
                f"normalises over its own positions), got {tuple(images.shape[-2:])}; use a "
                f"larger image size or batchnorm=running"
            )
        outputs = self.extractor(backbone_input(images, self.device, cfg.colour))
        feats = [outputs[name] for name in BLOCKS[cfg.backbone]]
        emb = patch_features(
            feats, cfg.patchsize, cfg.pretrain_embed_dimension, cfg.target_embed_dimension
        )
        if self.positional:
            batch, height, width, _ = emb.shape
            extra = positional_channels(batch, height, width, cfg.pos_embed_weight, emb.device)
            emb = torch.cat([emb, extra.to(emb.dtype)], dim=-1)
        return emb

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _store_device(self, n_bytes: int) -> torch.device:
        choice = self.config.store
        if choice == "cpu" or self.device.type != "cuda":
            return torch.device("cpu")
        free, _ = torch.cuda.mem_get_info(self.device)
        if choice == "device":
            self._check_device_room(n_bytes, free, "the training descriptors", "store=cpu")
            return self.device
        return self.device if n_bytes < free / 2 else torch.device("cpu")

    def _check_device_room(self, n_bytes: int, free: int, what: str, remedy: str) -> None:
        """One line instead of a CUDA out-of-memory error deep inside fit."""
        if n_bytes > free:
            raise UserError(
                f"{self.name}: {what} need {n_bytes / 2**20:.0f} MB on {self.device}, which has "
                f"{free / 2**20:.0f} MB free; use {remedy} or a device with more memory"
            )

    def decide_positional(self, images: torch.Tensor) -> float:
        """Set :attr:`positional` for these training images; returns the transpose MSE."""
        cfg = self.config
        mse = transpose_mse(images)
        if cfg.positional == "auto":
            self.positional = mse >= cfg.pos_embed_thresh and cfg.pos_embed_weight > 0
        else:
            self.positional = cfg.positional == "on" and cfg.pos_embed_weight > 0
        return mse

    # ---------------------------------------------------------------------------------------
    # Fit

    @torch.no_grad()
    def fit(self, train: TrainSet, observer: EpochObserver | None = None) -> None:
        """Build the nominal bank from ``train`` (associations, channels, filter)."""
        cfg = self.config
        n_images = len(train)
        if n_images < 2:
            raise UserError(
                f"{self.name}: associations need at least 2 training images, got {n_images}"
            )
        check_image_batch(train.images, f"{self.name}.fit")
        self.image_size = tuple(int(s) for s in train.images.shape[-2:])
        timer = self._clock()
        mse = self.decide_positional(train.images)
        dtype = getattr(torch, cfg.feature_dtype)

        # One backbone pass over the training set into the descriptor store.
        store = None
        for start in range(0, n_images, cfg.batch_size):
            emb = self.embed(train.images[start:start + cfg.batch_size])
            batch, height, width, dim = emb.shape
            if store is None:
                n_bytes = n_images * height * width * dim * torch.finfo(dtype).bits // 8
                if n_bytes > cfg.store_mb * 2**20:
                    raise UserError(
                        f"{self.name}: the descriptors of {n_images} training images "
                        f"({height * width} patches x {dim} values, {cfg.feature_dtype}) need "
                        f"{n_bytes / 2**20:.0f} MB, more than store_mb={cfg.store_mb:g}; raise "
                        f"store_mb (--set store_mb={math.ceil(n_bytes / 2**20)}) if the host has "
                        f"the memory"
                    )
                where = self._store_device(n_bytes)
                store = torch.empty((n_images, height * width, dim), dtype=dtype, device=where,
                                    pin_memory=where.type == "cpu" and self.device.type == "cuda")
            chunk = emb.reshape(batch, height * width, dim).to(dtype)
            if not torch.isfinite(chunk).all():
                raise UserError(
                    f"{self.name}: descriptors overflow {cfg.feature_dtype}; use "
                    f"feature_dtype=float32"
                )
            store[start:start + batch].copy_(chunk)
        grid = (height, width)
        n_patches = height * width
        feature_s = self._clock() - timer

        timer = self._clock()
        assoc = associate(store, cfg.assoc_depth, self.device, budget_mb=cfg.budget_mb)
        association_s = self._clock() - timer

        timer = self._clock()
        members = channel_members(assoc, cfg.channel_indices)
        outcome = filter_channels(
            store, members, min_length=cfg.min_channel_length, max_std=cfg.max_channel_std,
            device=self.device,
        )
        if outcome.bank_index.size == 0:
            raise UserError(
                f"{self.name}: no channel kept more than min_channel_length="
                f"{cfg.min_channel_length} members ({outcome.n_channels} channels from "
                f"{n_images} images); use more training images or lower min_channel_length"
            )
        flat_store = store.view(n_images * n_patches, dim)
        index = torch.from_numpy(outcome.bank_index).to(store.device)
        if self.device.type == "cuda":
            bank_bytes = index.numel() * dim * store.element_size()
            remedy = "feature_dtype=float16" if cfg.feature_dtype == "float32" else "store=cpu"
            self._check_device_room(bank_bytes, torch.cuda.mem_get_info(self.device)[0],
                                    f"the bank ({index.numel()} patches)", remedy)
        bank = torch.empty((index.numel(), dim), dtype=dtype, device=self.device)
        step = max(1, int(cfg.budget_mb * 2**20 // (dim * store.element_size())))
        for start in range(0, index.numel(), step):
            rows = flat_store.index_select(0, index[start:start + step])
            bank[start:start + rows.shape[0]] = rows.to(self.device)
        del store, flat_store
        self._set_bank(bank)
        channel_s = self._clock() - timer

        associated = assoc.mutual & (assoc.seed >= 0)
        in_bank = np.zeros(n_images * n_patches, dtype=bool)
        in_bank[outcome.bank_index] = True
        in_bank = in_bank.reshape(n_images, n_patches)
        stats = {
            "n_patches": float(n_images * n_patches),
            "grid": float(grid[0]),
            "descriptor_dim": float(dim),
            "seeds": float(min(cfg.assoc_depth, n_images - 1)),
            "positional": float(bool(self.positional)),
            "transpose_mse": float(mse),
            "associated_patches": float(associated.sum()),
            "channels": float(outcome.n_channels),
            "channels_candidate": float(outcome.n_candidate_channels),
            "channels_kept": float(outcome.n_kept_channels),
            "bank_members": float(outcome.n_bank_members),
            "bank_size": float(bank.shape[0]),
            "feature_s": feature_s,
            "association_s": association_s,
            "channel_s": channel_s,
        }
        self.fit_stats = stats
        if observer is not None:
            per_sample = {
                "associated_fraction": associated.mean(1).astype(np.float32),
                "bank_fraction": in_bank.mean(1).astype(np.float32),
            }
            observer(0, dict(stats), per_sample)

    def _set_bank(self, bank: torch.Tensor) -> None:
        dtype = getattr(torch, self.config.feature_dtype)
        self.bank = bank.to(self.device, dtype)
        step = max(1, int(self.config.budget_mb * 2**20 // (self.bank.shape[1] * 4)))
        self._bank_sq_norms = cs.row_sq_norms(self.bank, torch.float32, step)

    # ---------------------------------------------------------------------------------------
    # Predict

    def effective_sigma(self, height: int) -> float:
        """The Gaussian's sigma on a map of ``height`` pixels (see ``sigma_scaling``)."""
        cfg = self.config
        if cfg.sigma_scaling == "image_size":
            return cfg.sigma * height / REFERENCE_SIZE
        return cfg.sigma

    @torch.no_grad()
    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Squared L2 distance (B, h, w) of every patch to its nearest bank patch, on the
        device (faiss IndexFlatL2 in the reference: exact, squared)."""
        if self.bank is None:
            raise RuntimeError(f"{self.name}: predict called before fit or load_state_dict")
        emb = self.embed(images)
        batch, height, width, dim = emb.shape
        if dim != self.bank.shape[1]:
            raise UserError(
                f"{self.name}: descriptors have {dim} values but the bank {self.bank.shape[1]}; "
                f"predict with the config the bank was built with"
            )
        dist, _ = cs.nearest_neighbors(
            emb.reshape(-1, dim), self.bank, 1, squared=True,
            bank_sq_norms=self._bank_sq_norms, budget_mb=self.config.budget_mb,
        )
        return dist[:, 0].view(batch, height, width)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int | None = None) -> Prediction:
        """Image scores (max of the smoothed map) and maps at the input size."""
        check_image_batch(images, f"{self.name}.predict")
        if self.bank is None:
            raise RuntimeError(f"{self.name}: predict called before fit or load_state_dict")
        out_size = tuple(int(s) for s in images.shape[-2:])
        if self.image_size is not None and out_size != tuple(self.image_size):
            raise UserError(
                f"{self.name}: the bank was built from {self.image_size[0]}x"
                f"{self.image_size[1]} images, predict got {out_size[0]}x{out_size[1]}; "
                f"use the same image size"
            )
        sigma = self.effective_sigma(out_size[0])
        step = max(1, int(batch_size or self.config.batch_size))
        scores, maps = [], []
        for start in range(0, images.shape[0], step):
            grid = self.patch_scores(images[start:start + step])
            # Nearest-neighbour upsampling: np.repeat by H // h in the reference (equal when
            # the image is a multiple of the grid, as at 224 = 4 x 56).
            full = F.interpolate(grid[:, None], size=out_size, mode="nearest")[:, 0]
            smooth = gaussian_blur(full, sigma)
            scores.append(smooth.flatten(1).amax(1).float().cpu())
            maps.append(smooth.float().cpu())
        return Prediction(
            scores=torch.cat(scores).numpy().astype(np.float32),
            maps=torch.cat(maps).numpy().astype(np.float32),
        )

    # ---------------------------------------------------------------------------------------
    # State

    def _teacher_id(self) -> str:
        if self._weights_id is not None:
            return self._weights_id
        return weights_id(self.config.backbone, self.teacher_weights)

    def state_dict(self) -> dict[str, Any]:
        """The bank and what it was computed with (CPU tensors)."""
        if self.bank is None:
            raise RuntimeError(f"{self.name}: state_dict called before fit")
        return {
            "format": STATE_FORMAT,
            "method": self.name,
            "config": dataclasses.asdict(self.config),
            "teacher_weights_id": self._teacher_id(),
            "positional": bool(self.positional),
            "image_size": list(self.image_size) if self.image_size else None,
            "bank": self.bank.detach().cpu(),
            "fit_stats": dict(self.fit_stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a bank saved by :meth:`state_dict` with the same config and teacher."""
        if state.get("format") != STATE_FORMAT or state.get("method") != self.name:
            raise UserError(
                f"{self.name}: the saved state is not an {self.name} bank "
                f"(format {state.get('format')!r}, method {state.get('method')!r})"
            )
        saved = self.config_from_dict(
            {k: v for k, v in state["config"].items() if k not in _RESULT_NEUTRAL_FIELDS}
        )
        for field in dataclasses.fields(self.config):
            if field.name in _RESULT_NEUTRAL_FIELDS:
                continue
            mine, theirs = getattr(self.config, field.name), getattr(saved, field.name)
            if mine != theirs:
                raise UserError(
                    f"{self.name}: the saved state has config {field.name}={theirs!r}, this "
                    f"method {field.name}={mine!r}; build the method with the saved config"
                )
        if state["teacher_weights_id"] != self._teacher_id():
            raise UserError(
                f"{self.name}: the saved bank was computed with teacher "
                f"{state['teacher_weights_id']}, this method uses {self._teacher_id()}; "
                f"pass the same teacher weights"
            )
        self.positional = bool(state["positional"])
        self.image_size = tuple(state["image_size"]) if state.get("image_size") else None
        self._set_bank(state["bank"])
        self.fit_stats = dict(state.get("fit_stats", {}))

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            backbone=self.config.backbone,
            blocks=list(BLOCKS[self.config.backbone]),
            teacher_weights_id=self._teacher_id(),
            positional=self.positional,
            bank_size=None if self.bank is None else int(self.bank.shape[0]),
        )
        return info


register_variant(
    "inreach-corrected", "inreach",
    {"channel_indices": "matched", "colour": "rgb", "batchnorm": "running"},
    "InReaCh with the reference code's three departures undone: matched pairs in the "
    "channels, RGB ImageNet normalisation, BatchNorm with its ImageNet statistics",
    label="InReaCh (corrected)",
)
