"""``run_benchmark.py splits``: write noisy-split manifests and print their summary table.

Every split is computed, and every image and mask of its categories decoded, before anything
is written, so an infeasible ratio or an undecodable file stops the command with nothing
half-done. ``--verify MANIFEST ...`` instead re-checks manifests (for instance ones shared by
another lab) against the data under ``--data-root``: every path stays inside it, every file's
SHA-256 matches, the split rule re-run on this data draws exactly the manifest's split, and
every file decodes.
"""

from __future__ import annotations

import os

CAP_ADVICE = "lower the ratio, or cap explicitly with --cap to inject all {available}"


def _decode_workers() -> int:
    return min(8, os.cpu_count() or 1)


HELP = "write noisy-split manifests (SoftPatch rule, seeded, with file hashes) and summarise them"


def add_arguments(p) -> None:
    from datasets import DATASETS

    p.add_argument("--dataset", choices=sorted(DATASETS), help="required unless --verify")
    p.add_argument("--data-root", required=True, help="folder that holds the category folders")
    p.add_argument(
        "--verify",
        nargs="+",
        metavar="MANIFEST",
        help="check these manifests against the data instead of writing new ones",
    )
    p.add_argument(
        "--categories",
        nargs="+",
        metavar="CATEGORY",
        help="categories to split (default: every category found)",
    )
    p.add_argument(
        "--noise-ratios",
        nargs="+",
        type=float,
        metavar="RATIO",
        help="fractions of the normal training count to inject, e.g. 0.05 0.1 (required unless "
        "--verify)",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="split seeds (default 0)"
    )
    p.add_argument(
        "--out", help="folder for <dataset>/<category>/noise<r>_seed<s>.json (required unless "
        "--verify)"
    )
    p.add_argument(
        "--cap",
        action="store_true",
        help="inject every anomalous test image when a ratio asks for more, and record "
        "the realized ratio (default: stop with an error)",
    )


def format_table(splits) -> str:
    header = (
        "category",
        "ratio",
        "seed",
        "normal train",
        "injected",
        "test no-overlap",
        "test overlap",
        "realized",
    )
    rows = [header]
    for s in splits:
        realized = f"{s.realized_ratio:.4f}" + (" (capped)" if s.capped else "")
        rows.append(
            (
                s.category,
                f"{s.noise_ratio:g}",
                str(s.seed),
                str(s.n_train_normal),
                str(s.n_injected),
                str(len(s.test_no_overlap)),
                str(len(s.test_overlap)),
                realized,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verify(manifests, data_root) -> int:
    """Hash-check each manifest and re-draw its split from the data; 0 when all agree, else 1."""
    from datasets import (
        DataError,
        check_category,
        load_category,
        make_split,
        read_manifest,
        verify_manifest,
    )
    from datasets.splits import manifest_dict

    failures = 0
    for path in manifests:
        try:
            manifest = read_manifest(path)
            n_files = verify_manifest(manifest, data_root)
            data = load_category(manifest["dataset"], data_root, manifest["category"])
            redrawn = manifest_dict(make_split(data, float(manifest["noise_ratio"]),
                                               int(manifest["seed"]),
                                               cap=bool(manifest.get("capped", False))))
            for group in ("train", "test_no_overlap", "test_overlap"):
                if redrawn[group] != manifest[group]:
                    raise DataError(
                        f"split manifest {path}: its {group} list differs from the split this "
                        f"data gives (the data has other files, or the manifest was edited)")
            check_category(data, [], [], workers=_decode_workers())
        except DataError as err:
            failures += 1
            print(f"FAILED {path}: {err}")
            continue
        print(f"ok     {path}: {n_files} files match, split re-drawn identically "
              f"({manifest['dataset']}/{manifest['category']}, noise {manifest['noise_ratio']:g}, "
              f"seed {manifest['seed']})")
    print(f"{len(manifests) - failures} of {len(manifests)} manifest(s) verified")
    return 1 if failures else 0


def run(args) -> int:
    from bench.errors import UserError
    from datasets import (
        InfeasibleRatio,
        check_category,
        list_categories,
        load_category,
        make_split,
        manifest_path,
        write_manifest,
    )

    if args.verify:
        return verify(args.verify, args.data_root)
    absent = [flag for flag, value in (("--dataset", args.dataset),
                                       ("--noise-ratios", args.noise_ratios),
                                       ("--out", args.out)) if not value]
    if absent:
        raise UserError(f"splits needs {', '.join(absent)} to write manifests (or --verify "
                        f"MANIFEST ... to check existing ones)")
    categories = args.categories or list_categories(args.dataset, args.data_root)
    splits, loaded = [], []
    for category in dict.fromkeys(categories):  # de-duplicated, order kept
        data = load_category(args.dataset, args.data_root, category)
        loaded.append(data)
        for ratio in dict.fromkeys(args.noise_ratios):
            for seed in dict.fromkeys(args.seeds):
                try:
                    splits.append(make_split(data, ratio, seed, cap=args.cap))
                except InfeasibleRatio as err:
                    raise err.with_advice(CAP_ADVICE) from None
    # Hashing a file says nothing of whether it decodes: a truncated image is found now, not
    # by the first run that reads it (after the splits: those are the cheaper check).
    for data in loaded:
        check_category(data, [], [], workers=_decode_workers())
    for split in splits:
        path = manifest_path(args.out, split.dataset, split.category, split.noise_ratio, split.seed)
        write_manifest(split, path)
    print(format_table(splits))
    print(f"{len(splits)} manifest(s) under {args.out}/{args.dataset}/")
    return 0
