"""Frozen teacher backbones for the distillation methods (RD, CDD) and SoftPatch.

A teacher is a torchvision ResNet truncated after ``layer3``: ``wide_resnet50_2`` (the paper's
backbone, 256/512/1024 channels) or ``resnet18`` (64/128/256 channels, for CPU-sized runs).
Features come out at strides 4, 8 and 16 of the input.

Weights are one of:

- ``"imagenet"``: torchvision's ``IMAGENET1K_V1`` through torch.hub's normal cache and download.
  Offline with no cached file stops with one line naming the exact path to put the file at.
- ``"random"`` or ``"random:N"``: torchvision's default initialisation drawn from seed 0 (or N)
  (demo, tests, smoke runs; never paper-comparable). The teacher's seed is part of the weights
  name, not the run's training seed: a pretrained teacher is the same for every seed of a sweep,
  and so is a random one, so seed-to-seed spread measures the split and the training only.
- a path to a local state_dict file, loaded with ``torch.load(weights_only=True)``; keys and
  shapes are checked against the torchvision model and the first mismatch is named.

:func:`build_encoder` gives the same network, loaded the same way, as a trainable
:class:`Encoder` for methods that fine-tune it; :func:`load_backbone_net` the whole torchvision
network (layer4 included) for methods that read deeper blocks.

Every teacher carries ``weights_id`` (``imagenet:IMAGENET1K_V1``, ``random:seed=0`` or
``file:<sha256[:12]>``), which the methods put into every result's provenance.
"""

from __future__ import annotations

import os
import re
import urllib.error
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from bench.errors import UserError

BACKBONES = ("wide_resnet50_2", "resnet18")
# Output channels of layer1..layer3 and their strides relative to the input.
CHANNELS = {"wide_resnet50_2": (256, 512, 1024), "resnet18": (64, 128, 256)}
STRIDES = (4, 8, 16)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The torchvision weight enums the "imagenet" choice resolves to.
_IMAGENET_WEIGHTS = {
    "wide_resnet50_2": torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1,
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
}
# Teacher submodules, in forward order; their state_dict keys are torchvision's.
_KEPT = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
TEACHER_MODULES = _KEPT
# Keys of a full torchvision checkpoint that a truncated teacher ignores.
_DROPPED_PREFIXES = ("layer4.", "fc.")


def check_backbone(backbone: str) -> str:
    """Return ``backbone`` if known, else raise a one-line UserError listing the choices."""
    if backbone not in BACKBONES:
        raise UserError(
            f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)} "
            f"(config field 'backbone')"
        )
    return backbone


def imagenet_cache_path(backbone: str) -> Path:
    """Where torch.hub caches (and looks for) the IMAGENET1K_V1 file of ``backbone``."""
    url = _IMAGENET_WEIGHTS[check_backbone(backbone)].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def random_teacher_seed(weights: str) -> int | None:
    """The seed of ``"random"`` (0) or ``"random:N"`` (N); None for other weights.

    Raises:
        UserError: ``random:`` followed by something other than a non-negative integer.
    """
    if weights == "random":
        return 0
    if not weights.startswith("random:"):
        return None
    text = weights.split(":", 1)[1]
    if not text.isdigit():
        raise UserError(
            f"teacher weights {weights!r}: the random teacher's seed must be a non-negative "
            "integer, e.g. random:3"
        )
    return int(text)


def check_weights_name(weights: str) -> str:
    """``weights`` is ``imagenet``, ``random``, ``random:N`` or the path of an existing file, or
    a one-line UserError says so. A run of a method that loads no teacher records its weights
    all the same (they are part of its spec), so a name nothing could load is refused for
    every method, before a sweep starts."""
    if weights == "imagenet" or random_teacher_seed(weights) is not None:
        return weights
    if not Path(weights).expanduser().is_file():
        raise UserError(
            f"teacher weights {weights!r}: not imagenet, random, random:N or an existing "
            f"state_dict file; check the path given to --teacher-weights (or the preset's "
            f"teacher_weights)")
    return weights


def weights_id(backbone: str, weights: str) -> str:
    """The provenance id of a teacher, without building it.

    Returns ``imagenet:IMAGENET1K_V1``, ``random:seed=<seed>`` or ``file:<sha256[:12]>`` (the
    file's content hash, so renaming a file does not change the id).
    """
    check_backbone(backbone)
    if weights == "imagenet":
        return f"imagenet:{_IMAGENET_WEIGHTS[backbone].name}"
    seed = random_teacher_seed(weights)
    if seed is not None:
        return f"random:seed={seed}"
    return f"file:{_file_sha256(_existing_file(weights))[:12]}"


def teacher_input(
    images: torch.Tensor, device: str | torch.device, channels_last: bool = False
) -> torch.Tensor:
    """Move images to ``device`` and normalise them with ImageNet mean/std.

    Args:
        images: (B, 3, H, W) uint8 in 0..255, or floating point in [0, 1].
        device: where the result lives. uint8 is moved before conversion (4x less traffic).
        channels_last: return a channels_last tensor (faster convolutions on CUDA).

    Returns:
        float32 (B, 3, H, W) on ``device``, normalised; feed it to :meth:`Teacher.encode`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    x = images.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class Encoder(nn.Module):
    """A torchvision ResNet up to ``layer3``: the three feature maps of RD-family methods.

    Trainable, with the usual ``train``/``eval`` semantics: for methods that fine-tune their
    encoder (:func:`build_encoder`). :class:`Teacher` is the frozen kind.

    Attributes:
        backbone: ``"wide_resnet50_2"`` or ``"resnet18"``.
        channels: channels of the three feature maps, e.g. (256, 512, 1024).
        strides: (4, 8, 16), the downsampling of each feature map.
        weights_id: provenance of the weights it started from (see :func:`weights_id`).
    """

    def __init__(self, backbone: str, net: nn.Module, weights_id: str):
        super().__init__()
        self.backbone = backbone
        self.channels = CHANNELS[backbone]
        self.strides = STRIDES
        self.weights_id = weights_id
        for name in _KEPT:
            self.add_module(name, getattr(net, name))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of already-normalised input (output of :func:`teacher_input`).

        Args:
            x: float (B, 3, H, W), ImageNet-normalised.

        Returns:
            [layer1 (B, C1, H/4, W/4), layer2 (B, C2, H/8, W/8), layer3 (B, C3, H/16, W/16)]
            with (C1, C2, C3) = ``self.channels``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Features of raw images: uint8 (B, 3, H, W) in 0..255 or float in [0, 1].

        Normalises on the encoder's device, then returns :meth:`encode`'s three feature maps.
        """
        device = next(self.parameters()).device
        channels_last = device.type == "cuda" and self.conv1.weight.is_contiguous(
            memory_format=torch.channels_last
        )
        return self.encode(teacher_input(images, device, channels_last=channels_last))


class Teacher(Encoder):
    """A frozen :class:`Encoder`; always in eval mode (its BatchNorm statistics are part of
    the weights)."""

    def __init__(self, backbone: str, net: nn.Module, weights_id: str):
        super().__init__(backbone, net, weights_id)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """A teacher never leaves eval mode."""
        return super().train(False)


def load_backbone_net(backbone: str, weights: str,
                      needs: tuple[str, ...] = _KEPT) -> tuple[nn.Module, str]:
    """The whole torchvision network (layer4 and fc included) with ``weights`` loaded, and the
    weights' provenance id; see :func:`build_teacher` for ``weights`` and the errors.

    ``needs``: the top-level modules the caller runs; a weight file must hold all of their
    keys (by default the teacher's, up to layer3; a method reading layer4 passes
    ``(*TEACHER_MODULES, "layer4")`` so a file without it is refused, not half-random)."""
    check_backbone(backbone)
    constructor = getattr(torchvision.models, backbone)
    seed = random_teacher_seed(weights)
    if seed is not None:
        # Draw the initialisation from its own seed without disturbing the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = constructor(weights=None)
        return net, weights_id(backbone, weights)
    net = constructor(weights=None)
    if weights == "imagenet":
        state = _imagenet_state_dict(backbone, net)
        net.load_state_dict(state, strict=False)
        return net, weights_id(backbone, "imagenet")
    path = _existing_file(weights)
    state = _load_state_file(path)
    _check_state_dict(state, net, backbone, path, needs)
    net.load_state_dict(state, strict=False)
    return net, f"file:{_file_sha256(path)[:12]}"


def build_teacher(backbone: str, weights: str) -> Teacher:
    """Build a frozen teacher on CPU (move it with ``.to(device)``).

    Args:
        backbone: ``"wide_resnet50_2"`` or ``"resnet18"``.
        weights: ``"imagenet"``, ``"random"`` (seed 0), ``"random:N"`` (seed N; the global RNG
            is untouched) or a path to a state_dict file.

    Raises:
        UserError: unknown backbone, imagenet weights unavailable offline (names the cache
            path), or a weight file that is missing, unreadable or does not match.
    """
    return Teacher(backbone, *load_backbone_net(backbone, weights))


def teacher_check(backbone: str, weights: str, needs: tuple[str, ...] = _KEPT):
    """A method's ``weights_check`` for a torchvision ``backbone`` with ``weights`` whose
    modules ``needs`` it runs: the key and the loader (random weights need no check: None)."""
    if random_teacher_seed(weights) is not None:
        return None
    return (("torchvision", backbone, weights, tuple(needs)),
            lambda: load_backbone_net(backbone, weights, needs))


def build_encoder(backbone: str, weights: str) -> Encoder:
    """A trainable :class:`Encoder` (on CPU, in train mode) starting from ``weights``, loaded
    and checked exactly as :func:`build_teacher` does."""
    return Encoder(backbone, *load_backbone_net(backbone, weights))


# --------------------------------------------------------------------------------------------
# Weight loading helpers.


def imagenet_sha256_prefix(backbone: str) -> str:
    """The SHA-256 prefix torchvision puts in the weight file's name (``resnet18-f37072fd.pth``)."""
    match = re.search(r"-([a-f0-9]+)\.", imagenet_cache_path(backbone).name)
    if match is None:  # every torchvision IMAGENET1K_V1 URL carries one
        raise RuntimeError(f"no hash in {imagenet_cache_path(backbone).name}")
    return match.group(1)


def _imagenet_state_dict(backbone: str, net: nn.Module) -> Mapping[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 state_dict from torch.hub's cache, downloading if needed.

    A file already in the cache is checked too (torch.hub checks only what it downloads): its
    SHA-256 must start with the prefix in its name, so a stray file put there by hand is never
    taken for the ImageNet teacher.
    """
    enum = _IMAGENET_WEIGHTS[backbone]
    target = imagenet_cache_path(backbone)
    prefix = imagenet_sha256_prefix(backbone)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(enum.url, str(target), hash_prefix=prefix,
                                           progress=False)
        except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as err:
            raise UserError(
                f"cannot get ImageNet weights for {backbone} ({type(err).__name__}: {err}); "
                f"download {enum.url} and put it at {target}, or use teacher weights 'random' "
                f"or a local state_dict file"
            ) from None
        except RuntimeError as err:  # the download's hash did not match
            raise UserError(f"downloading {enum.url} failed its hash check ({err}); try again"
                            ) from None
    digest = _file_sha256(target)
    if not digest.startswith(prefix):
        raise UserError(
            f"cached ImageNet weights {target} are not torchvision's file (sha256 starts "
            f"{digest[:len(prefix)]}, the name says {prefix}); delete it and download {enum.url} "
            f"again, or pass your file itself as the teacher weights (a path)"
        )
    state = _load_state_file(target)
    _check_state_dict(state, net, backbone, target)
    return state


def _existing_file(weights: str) -> Path:
    path = Path(os.path.expanduser(str(weights)))
    if not path.is_file():
        raise UserError(
            f"teacher weights {weights!r} are neither 'imagenet', 'random' nor an existing "
            f"file; pass one of those"
        )
    return path


def _file_sha256(path: Path) -> str:
    """SHA-256 of a weight file, hashed once per process (a sweep builds many teachers)."""
    from datasets.images import cached_file_sha256

    return cached_file_sha256(path)


def _load_state_file(path: Path) -> Mapping[str, torch.Tensor]:
    """Load ``path`` with weights_only=True and make sure it is a flat name -> tensor mapping."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means the same thing to the user
        raise UserError(
            f"teacher weights file {path} cannot be loaded with torch.load(weights_only=True) "
            f"({type(err).__name__}); save a plain state_dict with torch.save(model.state_dict())"
        ) from None
    if not isinstance(obj, Mapping):
        raise UserError(
            f"teacher weights file {path} holds a {type(obj).__name__}, not a state_dict; "
            f"save one with torch.save(model.state_dict(), path)"
        )
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            raise UserError(
                f"teacher weights file {path} is a checkpoint wrapping its weights under "
                f"{wrapper!r}; save that entry alone with torch.save(ckpt[{wrapper!r}], path)"
            )
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(
            f"teacher weights file {path} is not a state_dict: entry {bad!r} is a "
            f"{type(obj[bad]).__name__}, not a tensor"
        )
    return obj


def _check_state_dict(
    state: Mapping[str, torch.Tensor], net: nn.Module, backbone: str, path: Path,
    needs: tuple[str, ...] = _KEPT,
) -> None:
    """Name the first missing key, unexpected key or shape mismatch against torchvision's net
    (the keys of the modules in ``needs`` must all be there)."""
    expected = {
        k: v for k, v in net.state_dict().items() if k.split(".", 1)[0] in needs
    }
    # BatchNorm's counter is absent from older torchvision checkpoints and unused in eval mode.
    needed = [k for k in expected if not k.endswith("num_batches_tracked")]
    missing = [k for k in needed if k not in state]
    if missing:
        hint = ""
        if any(k.startswith("module.") for k in state):
            hint = " (keys start with 'module.': strip that DataParallel prefix)"
        raise UserError(
            f"teacher weights file {path} does not fit torchvision {backbone}: missing key "
            f"{missing[0]!r} ({len(missing)} missing){hint}"
        )
    unexpected = [
        k for k in state if k not in expected and not k.startswith(_DROPPED_PREFIXES)
    ]
    if unexpected:
        raise UserError(
            f"teacher weights file {path} does not fit torchvision {backbone}: unexpected key "
            f"{unexpected[0]!r} ({len(unexpected)} unexpected)"
        )
    for key in needed:
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise UserError(
                f"teacher weights file {path} does not fit torchvision {backbone}: {key!r} has "
                f"shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
            )
    # layer4/fc entries of a full checkpoint are ignored, but must still fit the torchvision net.
    full = net.state_dict()
    for key in state:
        if key in full and key not in expected and state[key].shape != full[key].shape:
            raise UserError(
                f"teacher weights file {path} does not fit torchvision {backbone}: {key!r} has "
                f"shape {tuple(state[key].shape)}, expected {tuple(full[key].shape)}"
            )
