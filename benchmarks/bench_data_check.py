"""What the pre-sweep data check costs: every image and mask decoded once, then a rerun that
only looks at file sizes and times (the remembered verdicts).

    python benchmarks/bench_data_check.py            # the default synthetic tree, 64 px
    python benchmarks/bench_data_check.py --tiny     # 2 categories at 32 px (a smoke check)
    python benchmarks/bench_data_check.py --data-root /data/mvtec --dataset mvtec --size 224

Prints wall and CPU seconds of the first check (decoding), of a rerun (verdicts), and of a
rerun after one file changed, for 1 and for N decoding threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.driver import check_data  # noqa: E402
from bench.spec import RunSpec  # noqa: E402
from datasets import DecodeVerdicts, generate_synthetic, list_categories  # noqa: E402


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small synthetic tree (seconds)")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-root", type=Path, help="default: a fresh synthetic tree")
    parser.add_argument("--size", type=int, default=64, help="crop (resize = crop x 256/224)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-check-") as tmp:
        root = args.data_root
        if root is None:
            root = Path(tmp) / "data"
            if args.tiny:
                generate_synthetic(root, size=32, n_train=10, n_test_good=4,
                                   n_test_anomalous=6, categories=["brick", "nut"])
            else:
                generate_synthetic(root)
        size = 32 if args.tiny else args.size
        specs = [RunSpec(method="-", dataset=args.dataset, data_root=str(root), category=c,
                         noise_ratio=0.1, image_size=size,
                         resize_size=round(size * 256 / 224))
                 for c in list_categories(args.dataset, root)]
        for threads in sorted({1, args.threads}):
            path = Path(tmp) / f"verdicts-{threads}.json"
            verdicts = DecodeVerdicts(path)
            n, wall, cpu = timed(check_data, specs, verdicts, workers=threads)
            verdicts.save()
            print(f"threads {threads}: first check decoded {n} images: {wall:.2f} s wall, "
                  f"{cpu:.2f} s CPU")
            n, wall, cpu = timed(check_data, specs, DecodeVerdicts(path), workers=threads)
            print(f"threads {threads}: rerun decoded {n}: {wall:.3f} s wall, {cpu:.3f} s CPU")
        sample = next(p for p in sorted(root.rglob("*.png")) if "train" in p.parts)
        os.utime(sample)
        n, wall, cpu = timed(check_data, specs, DecodeVerdicts(path), workers=1)
        print(f"after touching one file: decoded {n}: {wall:.3f} s wall, {cpu:.3f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
