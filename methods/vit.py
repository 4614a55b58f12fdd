"""Frozen Vision Transformer backbones from timm: normalised patch tokens of the last block.

FUN-AD describes every patch by the last transformer block's output after the final LayerNorm
(DINO ``get_intermediate_layers(x)[0]``): the class token and the patch tokens. timm's
``VisionTransformer.forward_features`` returns exactly those tokens, and
``vit_base_patch8_224.dino`` is timm's port of the DINO ViT-B/8 weights, so the backbone here is
any timm ViT with one class token (:class:`ViTTokens`). Embedding width, patch size and the
patch grid follow from the model and the image size, nothing is hard-coded: ViT-B/8 at 224 px
gives 28 x 28 patches of 768 values.

Images of another size than the model's own (a 64 px smoke run) are accepted: the model is
built with ``dynamic_img_size=True``, which leaves the position embeddings untouched at the
model's size and resamples them bicubically (timm's ``resample_abs_pos_embed``) at any other.
Sides must be multiples of the patch size.

Weights (:func:`build_vit`) are one of:

- ``"imagenet"``: the pretrained weights timm names for the model, read from the Hugging Face
  hub cache (``huggingface_hub.constants.HF_HUB_CACHE``) and downloaded there when online. For
  ``vit_base_patch8_224.dino`` these are DINO's self-supervised ImageNet-1k weights
  (``timm/vit_base_patch8_224.dino``). Offline without the file: one line naming the cache
  folder and the local-file option.
- ``"random"`` / ``"random:N"``: timm's initialisation drawn from seed 0 / N (tests, smoke runs;
  never comparable with a paper). The caller's RNG state is untouched.
- a path to a state_dict file in timm's key layout (``.safetensors``, or anything
  ``torch.load(weights_only=True)`` reads), keys and shapes checked against the model; a
  classifier head in the file is ignored. DINO's own ``dino_vitbase8_pretrain.pth`` uses the
  same key names and loads as is.

Every backbone carries ``weights_id``: ``hub:<repo id>``, ``random:seed=N`` or
``file:<sha256[:12]>``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from bench.errors import UserError
from methods.backbones import random_teacher_seed, teacher_input

DEFAULT_VIT = "vit_base_patch8_224.dino"
# Keys of a checkpoint that a token extractor does not use (a classifier, if the file has one).
_IGNORED_PREFIXES = ("head.",)
# The files timm looks for in a hub repository, in its order of preference.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def parse_overrides(items: Sequence[str], where: str = "vit_overrides") -> dict[str, object]:
    """``("embed_dim=64", "depth=2")`` -> ``{"embed_dim": 64, "depth": 2}`` for timm.

    Values are read as int, float or true/false where they look like one, else kept as text.
    """
    out: dict[str, object] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key.isidentifier() or not text:
            raise UserError(
                f"{where}: {item!r} is not key=value (e.g. embed_dim=64,depth=2,num_heads=2)"
            )
        if key in out:
            raise UserError(f"{where}: {key!r} is given twice")
        value: object = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    continue
        out[key] = value
    for reserved in ("pretrained", "num_classes", "dynamic_img_size"):
        if reserved in out:
            raise UserError(f"{where}: {reserved!r} is set by the harness and cannot be overridden")
    return out


def hub_repo(model_name: str) -> tuple[str, Path]:
    """(Hugging Face repo id, its folder in the hub cache) of ``model_name``'s timm weights."""
    import timm
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise UserError(
            f"timm names no Hugging Face weights for {model_name!r}; pass a state_dict file as "
            f"backbone_weights=/path (or random weights)"
        )
    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    return repo, folder


def vit_weights_id(model_name: str, weights: str) -> str:
    """The provenance id of a backbone, without building it (see the module docstring)."""
    seed = random_teacher_seed(weights)
    if seed is not None:
        return f"random:seed={seed}"
    if weights == "imagenet":
        return f"hub:{hub_repo(model_name)[0]}"
    from datasets.images import cached_file_sha256

    return f"file:{cached_file_sha256(_existing_file(weights))[:12]}"


class ViTTokens(nn.Module):
    """A frozen timm ViT that returns the last block's normalised class and patch tokens.

    Attributes:
        model_name: the timm name it was built from.
        embed_dim: token width E (768 for ViT-B).
        patch_size: side of one patch in pixels (8 for ViT-B/8).
        weights_id: provenance of its weights.
    """

    def __init__(self, model_name: str, net: nn.Module, weights_id: str):
        super().__init__()
        self.model_name = model_name
        self.net = net
        self.embed_dim = int(net.embed_dim)
        patch = net.patch_embed.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if patch[0] != patch[1]:
            raise UserError(f"{model_name}: non-square patches {patch} are not supported")
        self.patch_size = int(patch[0])
        self.weights_id = weights_id
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> ViTTokens:
        """A frozen backbone never leaves eval mode."""
        return super().train(False)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of ``height`` x ``width`` images; sides must be patch multiples."""
        if height % self.patch_size or width % self.patch_size:
            raise UserError(
                f"{self.model_name}: images of {height}x{width} px are not a multiple of its "
                f"{self.patch_size} px patches; choose an image size divisible by "
                f"{self.patch_size} (e.g. 224 or 64)"
            )
        return height // self.patch_size, width // self.patch_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of uint8 images (B, 3, H, W), normalised with ImageNet mean/std.

        Returns:
            (class tokens (B, E), patch tokens (B, h*w, E)), float32 on the backbone's device,
            patches in row-major grid order.
        """
        self.grid(images.shape[-2], images.shape[-1])
        device = next(self.parameters()).device
        tokens = self.net.forward_features(teacher_input(images, device))
        return tokens[:, 0], tokens[:, 1:]


def build_vit(model_name: str, weights: str, overrides: Sequence[str] = ()) -> ViTTokens:
    """Build a frozen :class:`ViTTokens` on CPU (move it with ``.to(device)``).

    Args:
        model_name: a timm ViT name, e.g. ``vit_base_patch8_224.dino``.
        weights: ``"imagenet"`` (the hub weights), ``"random"``, ``"random:N"`` or a file.
        overrides: ``key=value`` architecture arguments for ``timm.create_model`` (a tiny
            random ViT for tests: ``("embed_dim=32", "depth=1", "num_heads=2")``).

    Raises:
        UserError: unknown model, not a ViT with one class token, hub weights unavailable
            offline (names the cache folder), or a weight file that is missing, unreadable or
            does not fit.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kwargs = parse_overrides(overrides)
    seed = random_teacher_seed(weights)
    if not timm.is_model(model_name):
        raise UserError(f"timm has no model {model_name!r} (config field 'vit_model'); "
                        f"e.g. {DEFAULT_VIT}")
    # Find the weights before building the network, so a missing file is reported at once.
    path = origin = None
    if seed is None and weights == "imagenet":
        path = _hub_file(model_name)
        origin = f"hub:{hub_repo(model_name)[0]}"
    elif seed is None:
        from datasets.images import cached_file_sha256

        path = _existing_file(weights)
        origin = f"file:{cached_file_sha256(path)[:12]}"
    # timm draws the initialisation from the global RNG: fork it, so the caller's stream is
    # untouched and a random backbone depends on its own seed only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        try:
            net = timm.create_model(model_name, pretrained=False, num_classes=0,
                                    dynamic_img_size=True, **kwargs)
        except TypeError as err:
            raise UserError(f"vit_overrides {dict(kwargs)} do not fit {model_name}: {err}"
                            ) from None
    if not isinstance(net, VisionTransformer):
        raise UserError(f"{model_name!r} is not a timm VisionTransformer; FUN-AD needs one")
    if net.cls_token is None or net.num_prefix_tokens != 1:
        raise UserError(
            f"{model_name!r} has {net.num_prefix_tokens} prefix tokens; the [CLS, patch] "
            f"descriptor needs exactly one class token and no register tokens"
        )
    if path is None:
        return ViTTokens(model_name, net, vit_weights_id(model_name, weights))
    state = load_state_file(path)
    check_state_dict(state, net, model_name, path)
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)})
    return ViTTokens(model_name, net, origin)


# --------------------------------------------------------------------------------------------
# Weight files


def _existing_file(weights: str) -> Path:
    path = Path(os.path.expanduser(str(weights)))
    if not path.is_file():
        raise UserError(
            f"backbone weights {weights!r} are neither 'imagenet', 'random' nor an existing "
            f"file; pass one of those"
        )
    return path


def _hub_file(model_name: str) -> Path:
    """The cached weight file of ``model_name`` (downloaded when online and not cached)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    repo, folder = hub_repo(model_name)
    cache = constants.HF_HUB_CACHE
    for filename in _HUB_FILES:
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(hit, str):
            return _checked_blob(Path(hit))
    hint = (f"put the hub snapshot of {repo} (file {_HUB_FILES[0]}, e.g. fetched with "
            f"huggingface_hub on a machine online) under {folder}, or pass a local state_dict "
            f"file with --set funad.backbone_weights=/path/to/file")
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"the {model_name} weights are not in the Hugging Face cache and "
                        f"HF_HUB_OFFLINE is set; {hint}")
    # The hub client logs every retry; the one line below says what failed and what to do.
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        path = hf_hub_download(repo, _HUB_FILES[0], cache_dir=cache)
    except Exception as err:  # noqa: BLE001 - network, HTTP and cache errors mean one thing
        raise UserError(f"cannot get the {model_name} weights from the Hugging Face hub "
                        f"({type(err).__name__}); {hint}") from None
    finally:
        hub_log.setLevel(level)
    return _checked_blob(Path(path))


def _checked_blob(path: Path) -> Path:
    """A hub cache file whose blob is named by its SHA-256 (LFS files) must hash to that name,
    so a truncated download or a file put there by hand is never taken for the hub's."""
    blob = path.resolve().name
    if re.fullmatch(r"[0-9a-f]{64}", blob):
        from datasets.images import cached_file_sha256

        digest = cached_file_sha256(path.resolve())
        if digest != blob:
            raise UserError(
                f"the cached weight file {path} is damaged (sha256 {digest[:12]}..., its cache "
                f"name says {blob[:12]}...); delete it and download it again"
            )
    return path


def load_state_file(path: Path) -> Mapping[str, torch.Tensor]:
    """A flat name -> tensor mapping from ``.safetensors`` or ``torch.load(weights_only=True)``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decoding failure means the same to the user
        raise UserError(
            f"backbone weights file {path} cannot be read ({type(err).__name__}); save a plain "
            f"state_dict with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(obj, Mapping):
        raise UserError(f"backbone weights file {path} holds a {type(obj).__name__}, not a "
                        f"state_dict; save one with torch.save(model.state_dict(), path)")
    for wrapper in ("state_dict", "model", "teacher", "student"):
        if isinstance(obj.get(wrapper), Mapping):
            raise UserError(
                f"backbone weights file {path} is a checkpoint wrapping its weights under "
                f"{wrapper!r}; save that entry alone (keys as in timm, without a 'backbone.' "
                f"or 'module.' prefix) with torch.save"
            )
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"backbone weights file {path} is not a state_dict: entry {bad!r} is a "
                        f"{type(obj[bad]).__name__}, not a tensor")
    return obj


def check_state_dict(state: Mapping[str, torch.Tensor], net: nn.Module, model_name: str,
                     path: Path) -> None:
    """Name the first missing key, unexpected key or shape mismatch against timm's model."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        prefixes = sorted({k.split(".", 1)[0] + "." for k in state if "." in k}
                          & {"module.", "backbone.", "model."})
        hint = f" (keys start with {prefixes[0]!r}: strip that prefix)" if prefixes else ""
        raise UserError(f"backbone weights file {path} does not fit timm {model_name}: missing "
                        f"key {missing[0]!r} ({len(missing)} missing){hint}")
    unexpected = [k for k in state if k not in expected and not k.startswith(_IGNORED_PREFIXES)]
    if unexpected:
        raise UserError(f"backbone weights file {path} does not fit timm {model_name}: "
                        f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(
                f"backbone weights file {path} does not fit timm {model_name}: {key!r} has "
                f"shape {tuple(state[key].shape)}, expected {tuple(value.shape)}"
            )
