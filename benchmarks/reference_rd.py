"""The official RD4AD training loop, re-created as a speed yardstick, and a timed comparison.

hq-deng/RD4AD ``main.py`` trains Reverse Distillation like this, and so does
:class:`ReferenceLoop`:

- the training images are PNG files read through ``torchvision.datasets.ImageFolder`` and a
  ``DataLoader(batch_size=16, shuffle=True)`` with the default ``num_workers=0``, so every epoch
  decodes, resizes, crops and normalises every image again in the training process
  (``Resize((s, s))``, ``ToTensor``, ``CenterCrop``, ``Normalize`` with ImageNet statistics);
- the teacher is the whole torchvision ResNet in eval mode with its parameters still requiring
  gradients: every step runs it with autograd on, layer4 included (its output is dropped), and
  the backward pass goes through it down to its first convolution, accumulating teacher
  gradients that no optimiser ever uses;
- float32 throughout, no autocast, no channels_last, no feature cache;
- ``torch.backends.cudnn.deterministic = True`` and ``benchmark = False`` (its ``setup_seed``);
- Adam(lr 0.005, betas (0.5, 0.999)) over the student, ``optimizer.zero_grad()``,
  ``loss.backward()``, ``optimizer.step()`` and ``loss.item()`` every step (a host sync).

What is shared with the harness, so that only the loop differs: the student network
(:func:`methods.rd.build_student`, the same OCBE + decoder and parameter counts as the
reference's; the reference's unused ``conv4``/``bn4`` receive no gradient there either), the
teacher network and weights (:func:`methods.backbones.load_backbone_net`) and the loss
(:func:`methods.rd.rd_loss`, the reference's ``loss_fucntion``). Left out, because they are not
training: the evaluation and checkpoint every 10 epochs.

``--compare`` times this loop against the harness's RD (``methods.rd.ReverseDistillation``,
which decodes the images once and caches the teacher's features) on the same PNG files, with
the same device, batch, image size, backbone and seed, alternating the two (ABAB...) so that a
machine that slows down mid-run slows both. Steady images/s leave out the first epoch (network
construction, cudnn warm-up, the harness's feature cache); total images/s count everything
from the PNG folder to the trained student, decoding included.

Usage::

    python benchmarks/reference_rd.py --compare --backbone resnet18 --size 64 --n 32 \\
        --epochs 4 --repeats 3 --device cpu --threads 2
    python benchmarks/reference_rd.py --compare --backbone wide_resnet50_2 --size 224 \\
        --n 64 --device cuda            # adds the harness in bf16 on CUDA
    python benchmarks/reference_rd.py --data /data/mvtec/bottle/train --size 224 --device cuda

Images are synthetic PNGs (``datasets.generate_synthetic``, category brick) written to a
temporary folder at ``--png-size`` pixels (default: the resize size, the cheapest case for the
reference; MVTec AD's images are 700-1024 px, where its per-epoch decoding costs more), unless
``--data`` names a folder of class subfolders (an MVTec ``train`` folder). Teachers are random
unless ``--teacher-weights`` says otherwise: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets as tv_datasets
from torchvision import transforms

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.errors import UserError  # noqa: E402
from methods.backbones import IMAGENET_MEAN, IMAGENET_STD, load_backbone_net  # noqa: E402
from methods.rd import build_student, check_image_size, rd_loss  # noqa: E402

# RD4AD main.py: learning_rate = 0.005, betas=(0.5, 0.999), batch_size = 16.
REFERENCE_LR = 0.005
REFERENCE_BETAS = (0.5, 0.999)
REFERENCE_BATCH = 16
SYNTHETIC_CATEGORY = "brick"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def reference_cudnn(deterministic: bool = True) -> Iterator[None]:
    """RD4AD's ``setup_seed`` cudnn flags (deterministic, no autotuning), restored afterwards."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False if deterministic else saved[1]
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def reference_transform(crop: int, resize: int) -> transforms.Compose:
    """RD4AD dataset.py ``get_data_transforms(size, isize)``: the same steps in the same order."""
    return transforms.Compose([
        transforms.Resize((resize, resize)),
        transforms.ToTensor(),
        transforms.CenterCrop(crop),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def write_pngs(folder: str | Path, n: int, size: int, seed: int = 0) -> Path:
    """Synthetic PNGs in MVTec layout under ``folder``; returns the category folder, whose
    ``train`` subfolder is an ImageFolder root (one class, ``good``)."""
    from datasets import generate_synthetic

    root = generate_synthetic(Path(folder), seed=seed, size=size, n_train=n, n_test_good=1,
                              n_test_anomalous=1, categories=[SYNTHETIC_CATEGORY])
    return root / SYNTHETIC_CATEGORY


class ReferenceLoop:
    """RD4AD's training loop (module docstring) on an ImageFolder root of PNG files.

    Attributes: ``dataset`` (ImageFolder), ``loader`` (DataLoader), ``teacher`` (the whole
    torchvision network, eval mode, parameters requiring gradients), ``student``
    (:class:`methods.rd.RDStudent`), ``optimizer`` (Adam over the student).
    """

    def __init__(self, image_root: str | Path, *, backbone: str, crop: int, resize: int,
                 batch_size: int = REFERENCE_BATCH, device: str | torch.device = "cpu",
                 teacher_weights: str = "random", seed: int = 0, num_workers: int = 0):
        check_image_size(crop, crop, "reference RD")
        if crop > resize:
            raise UserError(f"reference RD: crop {crop} is larger than resize {resize}")
        self.device = torch.device(device)
        try:
            self.dataset = tv_datasets.ImageFolder(str(image_root),
                                                   transform=reference_transform(crop, resize))
        except FileNotFoundError:  # no such folder, or no class subfolder with images in it
            raise UserError(
                f"reference RD: {image_root} is not a folder of class subfolders with images "
                f"(e.g. an MVTec category's train folder, holding good/)"
            ) from None
        # shuffle=True as main.py; a seeded generator only makes the order repeatable.
        self.loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=True,
                                 num_workers=num_workers,
                                 generator=torch.Generator().manual_seed(seed))
        net, self.teacher_weights_id = load_backbone_net(backbone, teacher_weights)
        # main.py: encoder.eval(), nothing frozen; torchvision parameters require grad.
        self.teacher = net.to(self.device).eval()
        self.student = build_student(backbone, seed=seed).to(self.device)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=REFERENCE_LR,
                                          betas=REFERENCE_BETAS)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """RD4AD resnet.py ``_forward_impl``: layer1-3 features; layer4 runs and is dropped."""
        t = self.teacher
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        f1 = t.layer1(x)
        f2 = t.layer2(f1)
        f3 = t.layer3(f2)
        t.layer4(f3)
        return [f1, f2, f3]

    def train_epoch(self) -> float:
        """One pass over the loader, as main.py's inner loop; returns the mean batch loss."""
        self.student.train()
        losses = []
        for img, _label in self.loader:
            img = img.to(self.device)
            inputs = self.encode(img)
            outputs = self.student(inputs)
            loss = rd_loss(inputs, outputs)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        return sum(losses) / len(losses)


def steady_rate(images_per_epoch: int, stamps: list[float]) -> float | None:
    """Images/s over the epochs after the first, from ``stamps`` = [start, end of epoch 0,
    end of epoch 1, ...]; None with fewer than two epochs."""
    if len(stamps) < 3 or stamps[-1] <= stamps[1]:
        return None
    return images_per_epoch * (len(stamps) - 2) / (stamps[-1] - stamps[1])


def time_reference(image_root: str | Path, *, backbone: str, crop: int, resize: int,
                   epochs: int, batch_size: int = REFERENCE_BATCH,
                   device: str | torch.device = "cpu", teacher_weights: str = "random",
                   seed: int = 0, num_workers: int = 0, deterministic: bool = True,
                   clock: Callable[[], float] = time.perf_counter) -> dict:
    """Build :class:`ReferenceLoop` and train ``epochs`` epochs; timings and losses."""
    device = torch.device(device)
    with reference_cudnn(deterministic):
        sync(device)
        start = clock()
        loop = ReferenceLoop(image_root, backbone=backbone, crop=crop, resize=resize,
                             batch_size=batch_size, device=device,
                             teacher_weights=teacher_weights, seed=seed, num_workers=num_workers)
        stamps, losses = [start], []
        for _ in range(epochs):
            losses.append(loop.train_epoch())
            sync(device)
            stamps.append(clock())
    n = len(loop.dataset)
    return {"arm": "reference", "images": n, "epochs": epochs,
            "steady_images_per_s": steady_rate(n, stamps),
            "total_images_per_s": n * epochs / (stamps[-1] - start),
            "epoch_s": [b - a for a, b in zip(stamps, stamps[1:])], "losses": losses,
            "cudnn_deterministic": deterministic, "num_workers": num_workers}


def harness_config(backbone: str, epochs: int, batch_size: int, amp_bf16: bool) -> dict:
    """Overrides of the harness's RD for a comparison row: precision always set explicitly."""
    return {"backbone": backbone, "epochs": epochs, "batch_size": batch_size,
            "amp_bf16": amp_bf16}


def time_harness(category_root: str | Path, *, backbone: str, crop: int, resize: int,
                 epochs: int, batch_size: int = REFERENCE_BATCH, amp_bf16: bool = False,
                 device: str | torch.device = "cpu", teacher_weights: str = "random",
                 seed: int = 0, clock: Callable[[], float] = time.perf_counter) -> dict:
    """The harness's RD on the same PNGs: decoded once by the dataset pipeline (as the runner
    does), then ``fit``; timings and losses, in the shape of :func:`time_reference`."""
    from datasets import Preprocess, load_category, load_images
    from methods import TrainSet, build_method

    device = torch.device(device)
    category_root = Path(category_root)
    samples = load_category("mvtec", category_root.parent, category_root.name).train
    sync(device)
    start = clock()
    images = load_images(samples, Preprocess(resize=resize, crop=crop))
    method = build_method("rd", harness_config(backbone, epochs, batch_size, amp_bf16),
                          teacher_weights=teacher_weights, device=device, seed=seed)
    stamps, losses = [], []

    def observer(epoch, scalars, per_sample=None):
        sync(device)
        stamps.append(clock())
        losses.append(float(scalars["loss"]))

    # The first stamp of the steady window is the end of epoch 0, as for the reference.
    n = len(samples)
    method.fit(TrainSet(images, tuple(f"train-{i:05d}" for i in range(n))), observer)
    stamps = [start, *stamps]
    return {"arm": f"harness {'bf16' if amp_bf16 else 'float32'}", "images": n,
            "epochs": epochs, "steady_images_per_s": steady_rate(n, stamps),
            "total_images_per_s": n * epochs / (stamps[-1] - start),
            "epoch_s": [b - a for a, b in zip(stamps, stamps[1:])], "losses": losses,
            "config": {k: v for k, v in dataclasses.asdict(method.config).items()
                       if k in ("feature_cache", "cache_device", "amp_bf16", "channels_last")}}


def compare(category_root: str | Path, *, backbone: str, crop: int, resize: int, epochs: int,
            repeats: int, batch_size: int = REFERENCE_BATCH, device: str | torch.device = "cpu",
            teacher_weights: str = "random", seed: int = 0, bf16: bool | None = None,
            deterministic: bool = True, num_workers: int = 0,
            log: Callable[[str], None] = print) -> dict:
    """Reference loop vs harness RD, interleaved ``repeats`` times; medians and ratios.

    ``bf16``: add the harness with bf16 autocast (default: on CUDA only, where it applies).
    """
    if epochs < 2:
        raise UserError("reference RD: --epochs must be at least 2 (the first is warm-up)")
    if repeats < 1:
        raise UserError("reference RD: --repeats must be at least 1")
    device = torch.device(device)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    arms: list[tuple[str, Callable[[], dict]]] = [
        ("reference", lambda: time_reference(
            Path(category_root, "train"), backbone=backbone, crop=crop, resize=resize,
            epochs=epochs, batch_size=batch_size, device=device,
            teacher_weights=teacher_weights, seed=seed, num_workers=num_workers,
            deterministic=deterministic)),
        ("harness float32", lambda: time_harness(
            category_root, backbone=backbone, crop=crop, resize=resize, epochs=epochs,
            batch_size=batch_size, amp_bf16=False, device=device,
            teacher_weights=teacher_weights, seed=seed)),
    ]
    if bf16:
        arms.append(("harness bf16", lambda: time_harness(
            category_root, backbone=backbone, crop=crop, resize=resize, epochs=epochs,
            batch_size=batch_size, amp_bf16=True, device=device,
            teacher_weights=teacher_weights, seed=seed)))
    trials: dict[str, list[dict]] = {name: [] for name, _ in arms}
    for r in range(repeats):
        for name, run in arms:  # ABAB...: each repeat runs every arm once, in the same order
            result = run()
            trials[name].append(result)
            log(f"  repeat {r + 1}/{repeats} {name:16s} steady "
                f"{result['steady_images_per_s']:8.2f} img/s  total "
                f"{result['total_images_per_s']:8.2f} img/s")
    summary = {}
    for name, results in trials.items():
        summary[name] = {key: statistics.median(t[key] for t in results)
                         for key in ("steady_images_per_s", "total_images_per_s")}
    ref = summary["reference"]
    for row in summary.values():
        row["steady_vs_reference"] = row["steady_images_per_s"] / ref["steady_images_per_s"]
        row["total_vs_reference"] = row["total_images_per_s"] / ref["total_images_per_s"]
    return {"backbone": backbone, "crop": crop, "resize": resize, "batch_size": batch_size,
            "epochs": epochs, "repeats": repeats, "device": str(device),
            "torch_threads": torch.get_num_threads(), "images": trials["reference"][0]["images"],
            "summary": summary, "trials": trials}


def format_summary(result: dict) -> str:
    lines = [f"reference RD4AD loop vs harness RD | {result['backbone']}, {result['images']} "
             f"images, crop {result['crop']} (resize {result['resize']}), batch "
             f"{result['batch_size']}, {result['epochs']} epochs, device {result['device']}, "
             f"{result['torch_threads']} threads, median of {result['repeats']} interleaved "
             f"repeats",
             f"{'arm':18s}{'steady img/s':>14s}{'x ref':>8s}{'total img/s':>14s}{'x ref':>8s}"]
    for name, row in result["summary"].items():
        lines.append(f"{name:18s}{row['steady_images_per_s']:14.2f}"
                     f"{row['steady_vs_reference']:8.2f}{row['total_images_per_s']:14.2f}"
                     f"{row['total_vs_reference']:8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", action="store_true",
                        help="time the reference loop against the harness's RD, interleaved")
    parser.add_argument("--backbone", default="resnet18", choices=("resnet18", "wide_resnet50_2"))
    parser.add_argument("--size", type=int, default=64, help="crop side in pixels (x32)")
    parser.add_argument("--resize", type=int, default=None,
                        help="resize before the crop (default: size x 256/224)")
    parser.add_argument("--n", type=int, default=32, help="synthetic training images")
    parser.add_argument("--png-size", type=int, default=None,
                        help="side of the synthetic PNG files (default: the resize size)")
    parser.add_argument("--data", default=None,
                        help="an ImageFolder root (e.g. an MVTec category's train folder) "
                             "instead of synthetic PNGs (reference loop only)")
    parser.add_argument("--epochs", type=int, default=3, help="at least 2 (first is warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (--compare)")
    parser.add_argument("--batch-size", type=int, default=REFERENCE_BATCH)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--teacher-weights", default="random")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader workers of the reference (RD4AD: 0)")
    parser.add_argument("--no-deterministic", action="store_true",
                        help="leave cudnn autotuning on (RD4AD sets deterministic, no benchmark)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    resize = args.resize or int(round(args.size * 256 / 224))
    try:
        if args.epochs < 2:
            raise UserError("--epochs must be at least 2: the first epoch is the warm-up")
        with tempfile.TemporaryDirectory(prefix="reference-rd-") as tmp:
            if args.data and args.compare:
                raise UserError("--data runs the reference loop alone; drop --compare")
            if args.data:
                result = time_reference(args.data, backbone=args.backbone, crop=args.size,
                                        resize=resize, epochs=args.epochs,
                                        batch_size=args.batch_size, device=args.device,
                                        teacher_weights=args.teacher_weights,
                                        num_workers=args.num_workers,
                                        deterministic=not args.no_deterministic)
                print(f"reference RD4AD loop | {args.backbone}, {result['images']} images, crop "
                      f"{args.size}, device {args.device}: steady "
                      f"{result['steady_images_per_s']:.2f} img/s, total "
                      f"{result['total_images_per_s']:.2f} img/s")
            else:
                root = write_pngs(tmp, args.n, args.png_size or resize)
                if args.compare:
                    result = compare(root, backbone=args.backbone, crop=args.size,
                                     resize=resize, epochs=args.epochs, repeats=args.repeats,
                                     batch_size=args.batch_size, device=args.device,
                                     teacher_weights=args.teacher_weights,
                                     num_workers=args.num_workers,
                                     deterministic=not args.no_deterministic)
                    result["png_size"] = args.png_size or resize
                    print(format_summary(result))
                else:
                    result = time_reference(root / "train", backbone=args.backbone,
                                            crop=args.size, resize=resize, epochs=args.epochs,
                                            batch_size=args.batch_size, device=args.device,
                                            teacher_weights=args.teacher_weights,
                                            num_workers=args.num_workers,
                                            deterministic=not args.no_deterministic)
                    print(f"reference RD4AD loop | {args.backbone}, {args.n} images, crop "
                          f"{args.size}: steady {result['steady_images_per_s']:.2f} img/s, "
                          f"total {result['total_images_per_s']:.2f} img/s")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
