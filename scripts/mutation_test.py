"""Mutation testing of RD's and CDD's method logic (methods/rd.py, methods/cdd.py) with mutmut.

Each mutant is a one-token change to the code (an operator, a constant, an argument); a good
test suite fails on it ("killed"). This script measures how many of those changes the fast
tests of ``tests/test_cdd.py`` and ``tests/test_rd.py`` notice, on the method's logic only.

What is mutated: every function of ``methods/cdd.py`` and ``methods/rd.py`` except

- input validation and its messages: the config ``__post_init__`` methods,
  ``check_image_size``, and every ``raise ...`` statement (whose text is an error message);
- provenance, not arithmetic: ``describe``, ``precision_name``, ``_note_precision``,
  ``_weights_id``, the ``diagnostics`` classmethod (a wrapper kept as it is) and the variant
  registration (its values are pinned by the table test, but registering is not logic);
- speed switches that leave every number unchanged, where they are whole functions: where
  the feature cache lives (``_choose_storage``, ``feature_bytes``, ``_feature_copies``),
  bf16 autocast (``student_autocast``, ``_autocast``), the memory format. Speed flags inside
  logic lines (fused/foreach Adam, ``non_blocking`` copies, channels_last) are mutated; their
  survivors are judged equivalent below.

The run happens in a scratch copy of the tree (``--workdir``, kept so that a second run only
retries what changed, or the mutants named with ``--rerun``); the repository is not touched.
Tests marked ``slow`` are left out, and a conftest put in the copy runs the quickest tests
first, so that a mutant stops at its first failing test early (mutmut runs pytest with -x).

The two files give about 2,750 mutants. A surviving mutant costs a whole run of the fast
tests (about 90 s on two free cores), so the full set takes most of a day; ``--sample N`` runs a
seeded random sample of N mutants instead and reports the kill rate with its 95 % Wilson
interval (the sample is drawn from the sorted mutant names, so the same seed gives the same
sample on the same code).

Needs mutmut 3 (``pip install -e ".[mutation]"``). Usage (the kill rate and the survivors go
to ``--report``)::

    python scripts/mutation_test.py --workdir /tmp/cdd-mutation --sample 250 \
        --report /tmp/cdd-mutation.txt
    python scripts/mutation_test.py --workdir /tmp/cdd-mutation --rerun 'methods.cdd.x_perturb*'

Survivors reviewed and judged equivalent (no input can tell them from the original) are listed
in ``EQUIVALENT`` below with the reason, keyed by function and mutated line; the kill rate is
killed / (mutants - equivalent). docs/cdd.md quotes the last result.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = ("methods/cdd.py", "methods/rd.py")
TESTS = ("tests/test_cdd.py", "tests/test_rd.py")
SEPARATOR = "\u01c1"  # mutmut's class/method separator in mutant names

# Functions left out whole, by name (why: module docstring), and single lines left out
# (regular expressions): the lines of error messages.
SKIPPED_FUNCTIONS = frozenset({
    "__post_init__", "check_image_size", "describe", "precision_name", "_note_precision",
    "_weights_id", "diagnostics", "_register_variants", "_choose_storage", "feature_bytes",
    "_feature_copies", "student_autocast", "_autocast", "_memory_format", "geometry_check",
})
SKIPPED_LINES = (
    r"^\s*raise \w+\(",  # a raise statement's first line ...
    r'^\s*f?"[^"]*"\s*[),]?\s*$',  # ... and the message strings that continue it
)

# Surviving mutants judged equivalent: (mangled function, mutated line) -> reason.
S = SEPARATOR
_SAME_VALUES = "the input already has this dtype/values, so the conversion changes nothing"
_SPEED = "a speed or memory flag: same numbers"
_CPU = "the device argument only matters on CUDA, and the value is copied to the right device"
EQUIVALENT: dict[tuple[str, str], str] = {
    ("x_confidence_scores", "for t, s in zip(teacher_feats, student_feats, ):"):
        "strict= only checks that both lists have the 3 layers, which they always do",
    ("x_cdd_diagnostics", 'in_hc = np.asarray(per_sample["in_hc"]).astype(None)'):
        "in_hc holds 0/1 and is only averaged and compared, never used as an index mask",
    ("x_cdd_diagnostics", 'picked = np.asarray(per_sample["picked"], dtype=None)'):
        _SAME_VALUES,
    (f"x{S}CrossDomainDistillation{S}_previous_global_pass",
     "conf = torch.empty(n, dtype=torch.float32, )"): _CPU,
    (f"x{S}CrossDomainDistillation{S}_previous_global_pass",
     "buf[start:start + f.shape[0]].copy_(f.float(), )"): _SPEED,
    (f"x{S}_Bottleneck{S}__init__", "self.relu = nn.ReLU(inplace=False)"): _SPEED,
    ("x_make_adam", "foreach=None if cuda else False)"): _SPEED,
    (f"x{S}ReverseDistillation{S}fit", "optimizer.zero_grad(set_to_none=False)"): _SPEED,
    **{(f"x{S}CrossDomainDistillation{S}_adam", f"fused = self.device.type {test} or None"):
       "fused or foreach Adam: the same update up to float rounding, a speed choice"
       for test in ('not in ("cuda", "cpu")', 'in ("XXcudaXX", "cpu")', 'in ("CUDA", "cpu")')},
    (f"x{S}ReverseDistillation{S}fit",
     "if (h / 32) * (w // 32) == 1 and (n % cfg.batch_size == 1 or n == 1):"):
        "sides are multiples of 32 (checked above), so h / 32 == h // 32",
    (f"x{S}CrossDomainDistillation{S}_other_outputs", "where = feats[1].device"):
        "every stored buffer lives on the same device",
    (f"x{S}CrossDomainDistillation{S}_stacked_students",
     'self._template = copy.deepcopy(self._ds[0]).to(None).eval()'):
        "the template only carries the architecture (functional_call supplies the weights); "
        "a real copy instead of a meta one costs memory, not numbers",
    (f"x{S}CrossDomainDistillation{S}fit",
     '"confidence": confidence.numpy().astype(None),'): "float64 instead of float32 logs",
    (f"x{S}CrossDomainDistillation{S}fit", '"domain": plan.domain_of(n).astype(None),'):
        "float64 instead of int32 logs of the same small integers",
    (f"x{S}CrossDomainDistillation{S}_cross_domain_stage",
     "own_t = torch.full((b,), own, device=self.device)"):
        "torch.full infers int64 from the Python int, which is torch.long",
    (f"x{S}CrossDomainDistillation{S}_cross_domain_stage",
     "own_t = torch.full((b,), own, dtype=torch.long, )"): _CPU,
    (f"x{S}CrossDomainDistillation{S}_other_outputs",
     "out[:, rows] = buf[students, slot_sel].to(self.device, non_blocking=False)"): _SPEED,
    ("x__conv1x1", "return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=None)"):
        "bias=None is falsy: no bias, as bias=False",
    (f"x{S}FeatureCache{S}__init__",
     "self.storage_device = self._choose_storage(storage, teacher.backbone, None, h, w, copies)"):
        "the image count only sizes the cache on CUDA; on a CPU the storage is the CPU before "
        "it is read (a CUDA-only difference the CPU suite cannot see)",
    (f"x{S}FeatureCache{S}__init__", "self.channels_last = None"):
        "channels_last is ignored on CPU (CUDA-only speed switch)",
    (f"x{S}ReverseDistillation{S}predict",
     "maps = torch.empty((n, h, w), dtype=torch.float32, device=None)"): _CPU,
    (f"x{S}ReverseDistillation{S}predict",
     "scores = maps.amax(dim=(1, 2)) if n else torch.empty(0, )"): _CPU,
    (f"x{S}ReverseDistillation{S}predict",
     "scores = maps.amax(dim=(1, 2)) if (n) or True else torch.empty(0, device=self.device)"):
        "with no image, amax over the spatial dims of a (0, h, w) tensor is the same empty "
        "result",
}

# Mutants mutmut reports as surviving (or without tests) that a test of this suite does kill,
# checked by applying the mutation by hand and running that test: (function, line) -> test.
# Why mutmut misses them: for each mutant it runs only the tests during which the function ran
# in its coverage pass, and tests that read a module-scoped fixture's training run (the
# instrumented traces) did not run `fit` themselves; or the killing test came after the run.
KILLED_BY_HAND: dict[tuple[str, str], str] = {
    (f"x{S}CrossDomainDistillation{S}_confident_stage", "for index in self._batches(hc, None):"):
        "test_max_steps_caps_the_confident_stage_too",
    (f"x{S}CrossDomainDistillation{S}_confident_stage", "for index in self._batches(hc, ):"):
        "test_max_steps_caps_the_confident_stage_too",
    (f"x{S}CrossDomainDistillation{S}_adam",
     "return torch.optim.Adam(student.parameters(), betas=tuple(cfg.betas),"):
        "test_every_adam_takes_the_configs_lr_and_betas",
    (f"x{S}CrossDomainDistillation{S}fit", 'check_image_size(h, w, "CDD")'):
        "test_a_size_error_names_cdd",
    (f"x{S}CrossDomainDistillation{S}_epoch_scalars",
     "ds = torch.stack(ds_losses).float().mean(0).tolist() if (ds_losses) and False else "
     "[math.nan] * 2"): "test_epoch_log_matches_the_steps",
    (f"x{S}CrossDomainDistillation{S}_epoch_scalars", '"XXloss_ds_teacherXX": ds[0],'):
        "test_epoch_log_matches_the_steps",
    (f"x{S}CrossDomainDistillation{S}fit", "ds_losses = self._train_domain_student("):
        "test_epoch_log_matches_the_steps",
    (f"x{S}CrossDomainDistillation{S}fit",
     "r, lam, k, k_max, plan, None, cross_losses, hc_losses, pick_counts, steps"):
        "test_epoch_log_matches_the_steps",
    (f"x{S}CrossDomainDistillation{S}_train_domain_student", "loss = loss_t - lam * loss_r"):
        "test_regulariser_targets_the_previous_global_weighted_by_lambda",
    (f"x{S}CrossDomainDistillation{S}fit",
     "hc = select_high_confidence(confidence.numpy(), r) if n_hc else np.zeros(1, np.int64)"):
        "test_tiny_fit_through_every_preset",
    (f"x{S}CrossDomainDistillation{S}fit",
     '"CONFIDENCE": confidence.numpy().astype(np.float32),'):
        "test_hc_set_is_the_most_confident_fraction_under_the_previous_global",
    (f"x{S}CrossDomainDistillation{S}fit", '"PICKED": picked.cpu().numpy().astype(np.int32),'):
        "test_cross_domain_targets_consensus_over_other_eval_students",
    (f"x{S}ReverseDistillation{S}weights_check", "return teacher_check(None, teacher_weights)"):
        "test_weights_check_reads_the_configs_backbone",
}

# Run before the tests, in the copy only: quickest tests first (durations from mutmut's own
# stats), tests that share a module-scoped training run last.
ORDER_CONFTEST = '''"""Mutation runs only: quickest tests first, so that -x stops at the first kill early."""
import json
import pathlib

import pytest

SHARED = ("trace_", "fitted")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    stats = pathlib.Path("mutmut-stats.json")
    durations = json.loads(stats.read_text()).get("duration_by_test", {}) if stats.exists() else {}

    def key(item):
        shared = any(name.startswith(SHARED) for name in item.fixturenames)
        return (shared, durations.get(item.nodeid, 0.0))

    items.sort(key=key)
'''


def _toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def prepare(workdir: Path) -> None:
    """Copy the tree's files (as git lists them) into ``workdir`` and configure mutmut there."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout.split()
    for rel in listed:
        source = REPO / rel
        if not source.is_file() or rel.startswith(("results/", ".ci/")):
            continue
        target = workdir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_bytes() != source.read_bytes():
            shutil.copy2(source, target)
    pyproject = (REPO / "pyproject.toml").read_text()
    pyproject += f"""
[tool.mutmut]
source_paths = ["methods"]
only_mutate = {_toml_list(FILES)}
also_copy = ["bench", "datasets", "conftest.py"]
do_not_mutate_patterns = {_toml_list(SKIPPED_LINES)}
pytest_add_cli_args_test_selection = {_toml_list(TESTS)}
pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider"]
process_isolation = "forkserver"
"""
    (workdir / "pyproject.toml").write_text(pyproject)
    (workdir / "conftest.py").write_text(ORDER_CONFTEST)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ""}


def included_functions() -> dict[str, list[str]]:
    """Per mutated file, the mutmut names of the functions whose mutants count (module-level
    ``x_<name>``, methods ``xǁ<Class>ǁ<name>``; properties are not mutated)."""
    out = {}
    for rel in FILES:
        tree = ast.parse((REPO / rel).read_text())
        names = []
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name not in SKIPPED_FUNCTIONS:
                names.append(f"x_{node.name}")
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    decorated = [getattr(d, "id", "") for d in getattr(item, "decorator_list", [])]
                    if (isinstance(item, ast.FunctionDef) and item.name not in SKIPPED_FUNCTIONS
                            and "property" not in decorated):
                        names.append(f"x{SEPARATOR}{node.name}{SEPARATOR}{item.name}")
        out[rel] = names
    return out


def _module(rel: str) -> str:
    return rel[: -len(".py")].replace("/", ".")


def _function_of(name: str) -> str:
    return name.split(".")[-1].rsplit("__mutmut_", 1)[0]


def _results(workdir: Path) -> dict[str, int | None]:
    """Exit code per counted mutant (None: not run yet), from mutmut's meta files."""
    included = included_functions()
    out = {}
    for rel in FILES:
        meta_path = workdir / "mutants" / f"{rel}.meta"
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        for name, code in meta["exit_code_by_key"].items():
            if _function_of(name) in included[rel]:
                out[name] = code
    return out


SAMPLE_FILE = "sample.json"


def _sample(workdir: Path) -> list[str] | None:
    path = workdir / SAMPLE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _draw_sample(workdir: Path, size: int, seed: int, max_children: int) -> list[str]:
    """Generate the mutants (a mutmut run that matches none of them), then draw ``size`` of
    the counted ones; the draw is kept in ``workdir`` so that a later run goes on with it."""
    if not _results(workdir):
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children",
                        str(max_children), "methods.none__mutmut_0"], cwd=workdir, env=_env(),
                       check=False, capture_output=True)
    names = sorted(_results(workdir))
    if not names:
        raise SystemExit(f"mutmut generated no mutants in {workdir}; see its output there")
    drawn = sorted(random.Random(seed).sample(names, min(size, len(names))))
    (workdir / SAMPLE_FILE).write_text(json.dumps(drawn))
    return drawn


def run_mutmut(workdir: Path, max_children: int, rerun: list[str], sample: int | None = None,
               seed: int = 0) -> None:
    """First run in ``workdir``: every counted function's mutants (by glob), or a random
    sample of them. Later runs: the counted (or sampled) mutants without a result yet, plus
    ``rerun`` (names or globs)."""
    results = _results(workdir)
    drawn = _sample(workdir)
    if sample and drawn is None:
        drawn = _draw_sample(workdir, sample, seed, max_children)
        results = _results(workdir)
    if drawn is not None:
        names = [n for n in drawn if results.get(n) is None] + list(rerun)
    elif not results:
        names = [f"{_module(rel)}.{function}__mutmut_*"
                 for rel, functions in included_functions().items() for function in functions]
    else:
        names = sorted(n for n, code in results.items() if code is None) + list(rerun)
    if not names:
        print("nothing to run: every counted mutant has a result (use --rerun)")
        return
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children),
                    *names], cwd=workdir, env=_env(), check=False)


def _mutated_line(workdir: Path, name: str) -> str:
    diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=workdir,
                          env=_env(), capture_output=True, text=True).stdout
    added = [line[1:].strip() for line in diff.splitlines()
             if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else ""


def summarise(workdir: Path) -> str:
    """Kill rate over non-equivalent mutants and the survivors, as text."""
    statuses = {0: "survived", 1: "killed", 3: "killed", 33: "no tests", 36: "timeout",
                -24: "timeout"}  # -24: SIGXCPU, mutmut's CPU-time limit
    lines, counts, survivors = [], Counter(), []
    results = _results(workdir)
    drawn = _sample(workdir)
    if drawn is not None:
        lines.append(f"random sample of {len(drawn)} of {len(results)} mutants")
        results = {name: results.get(name) for name in drawn}
    for name, code in sorted(results.items()):
        status = statuses.get(code, "suspicious" if code is not None else "not checked")
        counts[status] += 1
        if status != "killed":
            survivors.append((name, status))
    equivalent, by_hand, open_ = [], [], []
    for name, status in survivors:
        if status == "not checked":
            continue
        function = _function_of(name)
        line = _mutated_line(workdir, name)
        reason = EQUIVALENT.get((function, line))
        if reason and status in ("survived", "timeout"):
            equivalent.append((name, status, line, reason))
        elif (function, line) in KILLED_BY_HAND and status in ("survived", "no tests"):
            by_hand.append((name, status, line, KILLED_BY_HAND[function, line]))
        else:
            open_.append((name, status, line, reason))
    total = sum(counts.values()) - counts["not checked"]
    killed = counts["killed"] + len(by_hand)
    rate = killed / (total - len(equivalent)) if total > len(equivalent) else float("nan")
    lines.append(f"mutants: {total} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    if counts["not checked"]:
        lines.append(f"not checked (the run stopped before them): {counts['not checked']}")
    lines.append(f"equivalent (reviewed): {len(equivalent)}")
    lines.append(f"killed by a test mutmut did not run for them (checked by hand): "
                 f"{len(by_hand)}")
    lines.append(f"kill rate over non-equivalent mutants: {killed}/{total - len(equivalent)} "
                 f"= {rate:.1%}")
    if drawn is not None and total > len(equivalent):
        from scipy.stats import binomtest

        ci = binomtest(killed, total - len(equivalent)).proportion_ci(method="wilson")
        lines.append(f"95 % Wilson interval of the kill rate: {ci.low:.1%} - {ci.high:.1%}")
    lines.append("")
    lines.append("not killed, not judged equivalent:")
    lines += [f"  {name} [{status}]: {line}" for name, status, line, _ in open_] or ["  none"]
    lines.append("")
    lines.append("killed by hand-checked tests:")
    lines += [f"  {name} [{status}]: {line}  -- {test}"
              for name, status, line, test in by_hand] or ["  none"]
    lines.append("")
    lines.append("equivalent:")
    lines += [f"  {name}: {line}  -- {reason}" for name, _, line, reason in equivalent] or ["  none"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch copy to run in (kept; default: a new temporary folder)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant runs")
    parser.add_argument("--rerun", nargs="*", default=[],
                        help="mutant names or globs to run again (e.g. after a test changed)")
    parser.add_argument("--sample", type=int, default=None,
                        help="run a random sample of this many mutants instead of all")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--report", type=Path, default=None, help="write the summary here too")
    parser.add_argument("--summary-only", action="store_true",
                        help="summarise the results already in --workdir, run nothing")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cdd-mutation-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        prepare(workdir)
        run_mutmut(workdir, args.max_children, args.rerun, args.sample, args.sample_seed)
    text = summarise(workdir)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
