"""Runs that train the same thing under different names share one training.

The paper's ablation tables repeat configurations under other row names: Table 4's full CDD is
Table 5's K=2 row and Table A2's S-curve row, Table 5's K=3 row is Table 6's Consensual row,
Table 4's row 4 is Table A1's r=0.5 row, and Table 5's {2,3,3,2} row is the paper sweeps' CDD. A run is a pure function of its spec, so two specs whose
methods resolve to the same registered method with the same full config, on the same data,
split, seeds, image size and teacher, give the same result: they share a **training identity**
(:mod:`bench.identity`).

A sweep therefore trains one spec of each identity (the *leader*) and writes the others' records
from its result (*followers*), and a later sweep reuses a complete record already in the
results folder. A reused record is the source's, with its own spec and fingerprint and
``reused_from: <source fingerprint>``; scores and manifest are copied. ``run --no-reuse`` (or
``--force``, for what is already on disk) trains every spec on its own.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.identity import record_training_identity, training_identity
from bench.records import (
    MANIFEST_FILE,
    RECORD_FILE,
    SCORES_FILE,
    files_intact,
    iter_records,
    run_dir,
)
from bench.spec import RunSpec
from bench.worker import RunResult


@dataclass
class ReusePlan:
    """What a sweep trains and what it copies."""

    leaders: list[RunSpec] = field(default_factory=list)  # trained
    followers: dict[str, list[RunSpec]] = field(default_factory=dict)  # leader fp -> twins
    from_disk: list[tuple[RunSpec, Path]] = field(default_factory=list)  # (spec, source folder)
    # leader fp -> specs of copies already on disk (made by earlier sweeps) that a retraining
    # (--force) would leave stale: they are rewritten from the new result.
    stale_copies: dict[str, list[RunSpec]] = field(default_factory=dict)

    @property
    def n_reused(self) -> int:
        return len(self.from_disk) + sum(len(v) for v in self.followers.values())


def plan_reuse(todo: Sequence[RunSpec], results: str | Path, *, enabled: bool = True,
               use_disk: bool = True) -> ReusePlan:
    """Split the runs to do into leaders, their followers and copies of records on disk."""
    if not enabled:
        return ReusePlan(leaders=list(todo))
    identities = {spec: training_identity(spec) for spec in todo}
    on_disk: dict[str, Path] = {}
    copies_of: dict[str, list[RunSpec]] = {}  # source fp -> copies on disk outside ``todo``
    if any(identities.values()):
        wanted = set(identities.values()) - {None}
        todo_fps = {spec.fingerprint for spec in todo}
        for record in iter_records(results):
            source = record.get("reused_from")
            if source and record.get("fingerprint") not in todo_fps:
                try:
                    copies_of.setdefault(str(source), []).append(RunSpec.from_dict(
                        record["spec"]))
                except (KeyError, TypeError):
                    pass
                continue
            if use_disk:
                ident = record_training_identity(record) if record.get("spec") else None
                folder = run_dir(results, str(record.get("fingerprint")))
                # A source whose files are damaged is not copied (its own run redoes it).
                if ident in wanted and ident not in on_disk and files_intact(folder, record):
                    on_disk[ident] = folder
    plan = ReusePlan()
    leader_of: dict[str, RunSpec] = {}
    for spec in todo:
        ident = identities[spec]
        if ident is not None and ident in on_disk:
            plan.from_disk.append((spec, on_disk[ident]))
        elif ident is not None and ident in leader_of:
            plan.followers.setdefault(leader_of[ident].fingerprint, []).append(spec)
        else:
            if ident is not None:
                leader_of[ident] = spec
            plan.leaders.append(spec)
    if not use_disk:  # retraining: what was copied from a leader must follow it
        plan.stale_copies = {spec.fingerprint: copies_of[spec.fingerprint]
                             for spec in plan.leaders if spec.fingerprint in copies_of}
    return plan


def copy_result(record: Mapping[str, Any], spec: RunSpec, source: str | Path,
                scores: bytes | None, manifest: bytes | None, sweep: str | None):
    """A follower's result: the source record under ``spec``'s name, files copied."""
    new = copy.deepcopy(dict(record))
    new.update(fingerprint=spec.fingerprint, spec=spec.to_dict(), sweep=sweep,
               reused_from=str(source))
    if new.get("status") != "ok" and new.get("error"):
        new["error"] = {**new["error"], "message": f"(shares its training with run "
                                                   f"{str(source)[:12]}) "
                                                   f"{new['error'].get('message', '')}"}
    return RunResult(new, scores, manifest)


def copy_from_disk(spec: RunSpec, folder: Path, sweep: str | None):
    """A follower's result from a complete record already in the results folder."""
    record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    files = [folder / name for name in (SCORES_FILE, MANIFEST_FILE)]
    scores, manifest = (path.read_bytes() if path.is_file() else None for path in files)
    return copy_result(record, spec, record["fingerprint"], scores, manifest, sweep)

