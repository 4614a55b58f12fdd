"""Bad inputs and faults, through the real command line, on synthetic data in temp folders.

Every case runs ``python run_benchmark.py ...`` in a subprocess and classifies what happened:

- bad inputs: ``clear`` (one line on stderr, exit 2, nothing written), ``ok`` (an input that
  must be accepted was, and read correctly), ``accepted wrongly``, ``refused wrongly``,
  ``traceback``, ``unclear`` (exit 2 but not one line, or the line lacks what it must name),
  ``wrong exit code``, ``wrote before failing`` (exit 2, but files appeared), ``stall``;
- faults (a kill, a damaged file, a dead server, two sweeps at once, a method that exits):
  ``handled`` or ``data lost``, ``stuck tracking`` (MLflow runs left RUNNING), ``stall``,
  ``traceback``, ``wrong exit code``.

It prints one line per case and the counts. Not part of pytest: it takes a while (every case
starts Python, most start torch, some an MLflow server).

    python benchmarks/attack_inputs.py                 # everything
    python benchmarks/attack_inputs.py --only verify   # cases whose name contains "verify"
    python benchmarks/attack_inputs.py --list          # the case names
    python benchmarks/attack_inputs.py --keep /tmp/a   # keep the workspace for a look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TIMEOUT_S = 300

PLUGIN = '''
"""Toy methods for the attack run: fast, and each misbehaving in its own way."""
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from methods.base import Method, Prediction, register_method


@dataclass(frozen=True)
class ToyConfig:
    epochs: int = 1
    lr: float = 0.1
    sleep_s: float = 0.0


def _log_fit(name):
    log = os.environ.get("ATTACK_FIT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(name + "\\n")


class Toy(Method):
    name = "toy"
    Config = ToyConfig

    def fit(self, train, observer=None):
        _log_fit(self.name)
        if self.config.sleep_s:
            time.sleep(self.config.sleep_s)
        self.mean = train.images.float().mean(0)
        if observer is not None:
            observer(0, {"loss": 1.0, "steps": 1.0})

    def predict(self, images, batch_size=32):
        maps = (images.float() - self.mean).abs().mean(1)
        return Prediction(maps.flatten(1).amax(1).numpy(), maps.numpy())

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, state):
        self.mean = state["mean"]


class ToyExit(Toy):
    name = "toy-exit"

    def fit(self, train, observer=None):
        sys.exit(4)


class ToyDie(Toy):
    name = "toy-die"

    def fit(self, train, observer=None):
        os._exit(9)


class ToyNaN(Toy):
    name = "toy-nan"

    def predict(self, images, batch_size=32):
        p = super().predict(images, batch_size)
        return Prediction(np.full_like(p.scores, np.nan), p.maps)


class ToyOOM(Toy):
    name = "toy-oom"

    def fit(self, train, observer=None):
        raise MemoryError("pretend the host is out of memory")


class Toy16(Toy):
    """Runs on crops that are multiples of 16 only, and says so before a sweep starts."""
    name = "toy16"

    @classmethod
    def geometry_check(cls, config, image_size, resize_size):
        from bench.errors import UserError

        if image_size % 16:
            raise UserError(f"toy16: crop {image_size} is not a multiple of 16; use e.g. 32")


for cls in (Toy, ToyExit, ToyDie, ToyNaN, ToyOOM, Toy16):
    register_method(cls)
'''

PRESET = """\
description: attack sweep
dataset: synthetic
categories: [brick]
methods: [toy]
noise_ratios: [0.2]
seeds: [0]
image_size: 32
resize_size: 32
teacher_weights: random
"""


# --------------------------------------------------------------------------------------------
# Running the CLI


@dataclass
class Result:
    rc: int | None
    out: str
    err: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    @property
    def err_lines(self) -> list[str]:
        # tqdm's bars end in carriage returns; a run's own lines are the rest.
        return [ln for ln in self.err.replace("\r", "\n").splitlines()
                if ln.strip() and "run/s" not in ln and "it/s" not in ln]


class Workspace:
    """A temp folder with the synthetic data, the toy plugin and numbered scratch folders."""

    def __init__(self, root: Path):
        self.root = root
        self.n = 0
        (root / "attack_toy.py").write_text(PLUGIN)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(root)]),
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
                    "CUDA_VISIBLE_DEVICES": ""}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.data = root / "data"
        r = self.cli("synth", "--out", str(self.data), "--size", "32", "--train", "10",
                     "--test-good", "4", "--test-anomalous", "6", "--categories", "brick",
                     "nut")
        if r.rc != 0:
            raise SystemExit(f"cannot write the synthetic data: {r.err}")

    def scratch(self, name: str = "x") -> Path:
        self.n += 1
        path = self.root / f"{self.n:03d}-{name}"
        path.mkdir()
        return path

    def data_copy(self, where: Path) -> Path:
        return Path(shutil.copytree(self.data, where / "data"))

    def preset(self, where: Path, text: str = PRESET, name: str = "p.yaml") -> Path:
        path = where / name
        path.write_text(text, encoding="utf-8")
        return path

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        # A shell starts background jobs with SIGINT ignored, and Python then keeps ignoring
        # it: give the command the default, as a terminal's Ctrl-C would find it.
        return subprocess.Popen([PYTHON, str(REPO / "run_benchmark.py"), *args], cwd=self.root,
                                env={**self.env, **kw.pop("env", {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                                **kw)

    def cli(self, *args: str, timeout: float = TIMEOUT_S, env: dict | None = None) -> Result:
        started = time.time()
        proc = self.popen(*args, env=env or {}, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            return Result(proc.returncode, out, err, time.time() - started)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return Result(None, out, err, time.time() - started)

    def run(self, where: Path, *extra: str, preset: Path | None = None, data: Path | None = None,
            results: Path | None = None, tracking: bool = False, **kw) -> Result:
        args = ["run", "--preset", str(preset or self.preset(where)), "--plugin", "attack_toy",
                "--data-root", str(data or self.data), "--results",
                str(results or where / "results"), "--no-report"]
        if not tracking:
            args.append("--no-tracking")
        return self.cli(*args, *extra, **kw)


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file (the lock file aside: trying a lock opens it)."""
    out = {}
    for folder in folders:
        if folder.is_file():
            st = folder.stat()
            out[str(folder)] = (st.st_size, st.st_mtime_ns)
        for path in folder.rglob("*") if folder.is_dir() else ():
            if path.is_file() and path.name != "sweep.lock":
                st = path.stat()
                out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------------------------
# Classifying


def refused(result: Result, needle: str | tuple[str, ...] = (), *, untouched: tuple[Path, ...] = (),
            before: dict | None = None, absent: tuple[Path, ...] = ()) -> tuple[str, str]:
    """A bad input: one line on stderr, exit 2, nothing written."""
    needles = (needle,) if isinstance(needle, str) else needle
    lines = result.err_lines
    detail = lines[-1] if lines else ""
    if result.timed_out:
        return "stall", f"no answer in {result.seconds:.0f} s"
    if "Traceback" in result.err:
        return "traceback", _last_error(result.err)
    if result.rc == 0:
        return "accepted wrongly", (result.out.strip().splitlines() or [""])[-1]
    if result.rc != 2:
        return "wrong exit code", f"exit {result.rc}: {detail}"
    if len(lines) != 1 or not lines[0].startswith(("error:", "run_benchmark.py")):
        return "unclear", " | ".join(lines)[:300]
    if any(n not in lines[0] for n in needles):
        return "unclear", f"missing {needles}: {lines[0]}"
    if before is not None and snapshot(*untouched) != before:
        return "wrote before failing", lines[0]
    if any(p.exists() for p in absent):
        return "wrote before failing", f"{[str(p) for p in absent if p.exists()]}: {lines[0]}"
    return "clear", lines[0]


def verify_failed(result: Result, needle: str) -> tuple[str, str]:
    """``splits --verify`` reports a manifest that fails as ``FAILED <path>: <why>`` and exit 1."""
    if "Traceback" in result.err:
        return "traceback", _last_error(result.err)
    failed = [ln for ln in result.out.splitlines() if ln.startswith("FAILED")]
    if result.rc == 0:
        return "accepted wrongly", result.out.strip()[-200:]
    if result.rc != 1 or len(failed) != 1:
        return "wrong exit code", f"exit {result.rc}: {result.out.strip()[-200:]}"
    if needle not in failed[0]:
        return "unclear", failed[0]
    return "clear", failed[0]


def accepted(result: Result, check: Callable[[], str | None] = lambda: None) -> tuple[str, str]:
    """An input that must be accepted; ``check`` returns what is wrong with the outcome."""
    if result.timed_out:
        return "stall", ""
    if "Traceback" in result.err:
        return "traceback", _last_error(result.err)
    if result.rc != 0:
        return "refused wrongly", f"exit {result.rc}: {' | '.join(result.err_lines)[-300:]}"
    problem = check()
    return ("accepted wrongly", problem) if problem else ("ok", "")


def _last_error(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Case:
    name: str
    kind: str  # input | fault
    body: Callable[[Workspace], tuple[str, str]]
    tags: tuple[str, ...] = field(default_factory=tuple)


CASES: list[Case] = []


def case(name: str, kind: str = "input"):
    def register(fn):
        CASES.append(Case(name, kind, fn))
        return fn
    return register


def preset_case(name: str, edit: Callable[[str], str], needle: str | tuple[str, ...] = "",
                extra: tuple[str, ...] = ()):
    """A preset edited into a bad one: the sweep must stop with one line, writing nothing."""
    def body(ws: Workspace):
        where = ws.scratch("preset")
        preset = ws.preset(where, edit(PRESET))
        return refused(ws.run(where, *extra, preset=preset), needle,
                       absent=(where / "results",))
    CASES.append(Case(f"preset: {name}", "input", body))


def sub(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new)
    return edit


preset_case("YAML syntax error", sub("categories: [brick]", "categories: [brick"), "preset")
preset_case("a list, not a mapping", lambda t: "- a\n- b\n", "mapping")
preset_case("missing key", sub("methods: [toy]\n", ""), "'methods'")
preset_case("unknown key", lambda t: t + "epochz: 3\n", "epochz")
preset_case("unknown dataset", sub("dataset: synthetic", "dataset: imagenet"), "imagenet")
preset_case("empty categories", sub("categories: [brick]", "categories: []"), "categories")
preset_case("empty methods", sub("methods: [toy]", "methods: []"), "methods")
preset_case("method entry without name", sub("methods: [toy]", "methods: [{config: {}}]"),
            "name")
preset_case("method entry unknown key", sub("methods: [toy]", "methods: [{name: toy, lr: 1}]"),
            "lr")
preset_case("unknown method", sub("methods: [toy]", "methods: [toyy]"), "toyy")
preset_case("method config not a mapping",
            sub("methods: [toy]", "methods: [{name: toy, config: [1]}]"), "mapping")
preset_case("method config unknown field",
            sub("methods: [toy]", "methods: [{name: toy, config: {lrr: 1}}]"), "lrr")
preset_case("method config NaN", sub("methods: [toy]", "methods: [{name: toy, config: {lr: .nan}}]"),
            "finite")
preset_case("method config inf", sub("methods: [toy]", "methods: [{name: toy, config: {lr: .inf}}]"),
            "finite")
preset_case("method config wrong type",
            sub("methods: [toy]", "methods: [{name: toy, config: {epochs: [1]}}]"), "epochs")
preset_case("method config float for int",
            sub("methods: [toy]", "methods: [{name: toy, config: {epochs: 1.5}}]"), "epochs")
preset_case("noise ratio text", sub("noise_ratios: [0.2]", "noise_ratios: [abc]"), "abc")
preset_case("noise ratio 1.5", sub("noise_ratios: [0.2]", "noise_ratios: [1.5]"), "1.5")
preset_case("noise ratio NaN", sub("noise_ratios: [0.2]", "noise_ratios: [.nan]"), "noise")
preset_case("noise ratio negative", sub("noise_ratios: [0.2]", "noise_ratios: [-0.1]"), "-0.1")
preset_case("noise ratios not a list", sub("noise_ratios: [0.2]", "noise_ratios: 0.2"),
            "noise_ratios")
preset_case("seed negative", sub("seeds: [0]", "seeds: [-1]"), "seed")
preset_case("seed fractional", sub("seeds: [0]", "seeds: [1.5]"), "1.5")
preset_case("seed huge", sub("seeds: [0]", "seeds: [1099511627776]"), "seed")
preset_case("seed boolean", sub("seeds: [0]", "seeds: [true]"), "seeds")
preset_case("image size 0", sub("image_size: 32", "image_size: 0"), "image_size")
preset_case("image size negative", sub("image_size: 32", "image_size: -32"), "image_size")
preset_case("image size text", sub("image_size: 32", "image_size: big"), "image_size")
preset_case("crop larger than resize", sub("image_size: 32", "image_size: 48"), "crop")
preset_case("resize 0", sub("resize_size: 32", "resize_size: 0"), "resize_size")
preset_case("config not a mapping", lambda t: t + "config: [1, 2]\n", "config")
preset_case("config key no method has", lambda t: t + "config: {epochz: 2}\n", "epochz")
preset_case("config value NaN", lambda t: t + "config: {lr: .nan}\n", "finite")
preset_case("method image size 0",
            sub("methods: [toy]", "methods: [{name: toy, image_size: 0}]"), "image_size")
preset_case("random teacher seed text", sub("teacher_weights: random", "teacher_weights: random:abc"),
            "random:abc")
preset_case("teacher weights: a missing file, method without a teacher",
            sub("teacher_weights: random", "teacher_weights: /no/such/weights.pth"),
            "/no/such/weights.pth")
preset_case("unknown category", sub("categories: [brick]", "categories: [bricks]"), "bricks")
preset_case("category with ../", sub("categories: [brick]", "categories: ['../data/brick']"),
            "../data/brick")


@case("preset: data_root missing (no --data-root)")
def _(ws):
    where = ws.scratch("dataroot")
    missing = where / "no" / "such" / "folder"
    preset = ws.preset(where, PRESET.replace("synthetic", "mvtec") + f"data_root: {missing}\n")
    return refused(ws.cli("run", "--preset", str(preset), "--plugin", "attack_toy", "--results",
                          str(where / "results"), "--no-tracking"), str(missing),
                   absent=(where / "results", missing))


preset_case("a key given twice", lambda t: t + "noise_ratios: [0.1]\n", "given twice")


@case("preset: not UTF-8")
def _(ws):
    where = ws.scratch("latin1")
    path = where / "p.yaml"
    path.write_bytes(PRESET.replace("attack sweep", "attaque d\xe9lib\xe9r\xe9e").encode("latin-1"))
    return refused(ws.run(where, preset=path), "UTF-8", absent=(where / "results",))


@case("preset: unknown name")
def _(ws):
    return refused(ws.cli("run", "--preset", "no-such-preset", "--no-tracking"), "no-such-preset")


@case("preset: a folder named .yaml")
def _(ws):
    where = ws.scratch("dir")
    (where / "d.yaml").mkdir()
    return refused(ws.cli("run", "--preset", str(where / "d.yaml"), "--no-tracking"), "preset")


@case("preset: same method twice, two configs (runs both)")
def _(ws):
    where = ws.scratch("twice")
    preset = ws.preset(where, PRESET.replace(
        "methods: [toy]", "methods: [{name: toy, config: {epochs: 1}}, "
                          "{name: toy, config: {epochs: 2}}]"))
    result = ws.cli("run", "--preset", str(preset), "--plugin", "attack_toy", "--data-root",
                    str(ws.data), "--dry-run")

    def check():
        configs = [ln for ln in result.out.splitlines() if ln.startswith("todo")]
        return None if len(configs) == 2 else f"dry run lists {len(configs)} runs: {result.out}"
    return accepted(result, check)


def flag_case(name: str, extra: tuple[str, ...], needle: str | tuple[str, ...] = ""):
    def body(ws: Workspace):
        where = ws.scratch("flag")
        return refused(ws.run(where, *extra), needle, absent=(where / "results",))
    CASES.append(Case(f"run flag: {name}", "input", body))


flag_case("--set lr=nan", ("--set", "lr=nan"), "finite")
flag_case("--set lr=inf", ("--set", "lr=inf"), "finite")
flag_case("--set lr=-inf", ("--set", "lr=-inf"), "finite")
flag_case("--set epochs=1.5", ("--set", "epochs=1.5"), "integer")
flag_case("--set epochs=abc", ("--set", "epochs=abc"), "integer")
flag_case("--set epochs=1e999", ("--set", "epochs=1e999"), "integer")
flag_case("--set unknown field", ("--set", "nosuch=1"), "nosuch")
flag_case("--set method.unknown", ("--set", "toy.nosuch=1"), "nosuch")
flag_case("--set unknown method", ("--set", "rdx.epochs=1"), "rdx")
flag_case("--set without =", ("--set", "epochs"), "--set")
flag_case("--set =5", ("--set", "=5"), "--set")
flag_case("--noise-ratios -0.1", ("--noise-ratios", "-0.1"), "-0.1")
flag_case("--noise-ratios 1", ("--noise-ratios", "1"), "1.0")
flag_case("--noise-ratios nan", ("--noise-ratios", "nan"), "nan")
flag_case("--noise-ratios inf", ("--noise-ratios", "inf"), "inf")
flag_case("--noise-ratios abc", ("--noise-ratios", "abc"), "abc")
flag_case("--seeds -3", ("--seeds", "-3"), "-3")
flag_case("--seeds x", ("--seeds", "x"), "x")
flag_case("--seeds 2**40", ("--seeds", str(2**40)), "seed")
flag_case("--image-size 0", ("--image-size", "0"), "image-size")
flag_case("--image-size -5", ("--image-size", "-5"), "image-size")
flag_case("--image-size > --resize-size", ("--image-size", "64", "--resize-size", "32"), "crop")
flag_case("--resize-size 0", ("--resize-size", "0"), "resize")
flag_case("--workers 0", ("--workers", "0"), "--workers")
flag_case("--workers -1", ("--workers", "-1"), "--workers")
flag_case("--workers 0 processes", ("--executor", "processes", "--workers", "0"), "--workers")
flag_case("--device cuda without GPU", ("--device", "cuda"), "cuda")
flag_case("--device tpu", ("--device", "tpu"), "tpu")
flag_case("--device cuda:x", ("--device", "cuda:x"), "cuda")
flag_case("--executor nope", ("--executor", "nope"), "nope")
flag_case("--methods unknown", ("--methods", "toy", "nosuchmethod"), "nosuchmethod")
flag_case("--categories unknown", ("--categories", "marble"), "marble")
flag_case("--categories ../", ("--categories", "../brick"), "../brick")
flag_case("--teacher-weights missing file", ("--methods", "rd", "--set", "rd.backbone=resnet18",
                                              "--teacher-weights", "/no/such.pth"), "/no/such.pth")
flag_case("--teacher-weights random:-1", ("--methods", "rd", "--set", "rd.backbone=resnet18",
                                         "--teacher-weights", "random:-1"), "random:-1")
flag_case("--plugin missing", ("--plugin", "no_such_plugin_mod"), "no_such_plugin_mod")
flag_case("--set on a boolean: maybe", ("--methods", "rd", "--set", "rd.feature_cache=maybe"),
          "feature_cache")
flag_case("--set Literal wrong", ("--methods", "rd", "--set", "rd.backbone=vgg"), "backbone")
flag_case("--set tuple wrong length", ("--methods", "rd", "--set", "rd.betas=0.5"), "betas")
flag_case("--set tuple with nan", ("--methods", "rd", "--set", "rd.betas=0.5,nan"), "finite")
flag_case("unknown option", ("--epochs", "3"), "--epochs")
flag_case("--set cdd.gaussian_sigma=nan", ("--methods", "cdd", "--set", "cdd.backbone=resnet18",
                                           "--set", "cdd.gaussian_sigma=nan"), "finite")
flag_case("--set rd.epochs=0", ("--methods", "rd", "--set", "rd.backbone=resnet18", "--set",
                                "rd.epochs=0"), "epochs")
flag_case("--set rd.lr=-1", ("--methods", "rd", "--set", "rd.backbone=resnet18", "--set",
                             "rd.lr=-1"), "lr")
flag_case("--set rd.max_steps=nan", ("--methods", "rd", "--set", "rd.max_steps=nan"), "max_steps")
flag_case("--set rd.betas=1.5,0.9", ("--methods", "rd", "--set", "rd.backbone=resnet18", "--set",
                                     "rd.betas=1.5,0.9", "--set", "rd.epochs=1"), "betas")
flag_case("a crop the method cannot run at", ("--methods", "toy16", "--image-size", "24",
                                              "--resize-size", "32"), "multiple of 16")
flag_case("RD at a crop not a multiple of 32", ("--methods", "rd", "--set", "rd.backbone=resnet18",
                                                "--set", "rd.epochs=1", "--image-size", "48",
                                                "--resize-size", "48"), "multiple of 32")
flag_case("--executor ray, unreachable --ray-address",
          ("--executor", "ray", "--ray-address", "127.0.0.1:1"), "127.0.0.1:1")


@case("run flag: --workers 64 for one run (accepted, 1 worker)")
def _(ws):
    where = ws.scratch("workers")
    result = ws.run(where, "--executor", "processes", "--workers", "64")
    return accepted(result, lambda: None if len(_done(where / "results")) == 1 else "no run done")


@case("run flag: --tracking-uri a web server that is not MLflow")
def _(ws):
    import http.server
    import threading

    where = ws.scratch("web")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = ws.run(where, "--tracking-uri", f"http://127.0.0.1:{server.server_address[1]}",
                        tracking=True)
    finally:
        server.shutdown()
    return refused(result, "not an MLflow server", absent=(where / "results",))


@case("run flag: --data-root missing")
def _(ws):
    where = ws.scratch("root")
    missing = where / "no" / "such" / "data"
    return refused(ws.run(where, data=missing), str(missing), absent=(where / "results", missing))


@case("run flag: --data-root missing, mvtec preset")
def _(ws):
    where = ws.scratch("root")
    missing = where / "no" / "such" / "data"
    preset = ws.preset(where, PRESET.replace("synthetic", "mvtec"))
    return refused(ws.run(where, preset=preset, data=missing), str(missing),
                   absent=(where / "results", missing))


@case("run flag: --data-root is a file")
def _(ws):
    where = ws.scratch("rootfile")
    (where / "f").write_text("x")
    return refused(ws.run(where, data=where / "f"), str(where / "f"), absent=(where / "results",))


@case("run flag: --data-root is one category folder")
def _(ws):
    where = ws.scratch("onecat")
    return refused(ws.run(where, data=ws.data / "brick"), "single category",
                   absent=(where / "results",))


@case("run flag: --data-root empty folder")
def _(ws):
    where = ws.scratch("empty")
    (where / "d").mkdir()
    return refused(ws.run(where, data=where / "d"), "no category", absent=(where / "results",))


@case("run flag: --results is a file")
def _(ws):
    where = ws.scratch("resfile")
    (where / "f").write_text("x")
    return refused(ws.run(where, results=where / "f"), "is a file")


@case("run flag: --results under a file")
def _(ws):
    where = ws.scratch("resunder")
    (where / "f").write_text("x")
    return refused(ws.run(where, results=where / "f" / "sub"), "is a file")


@case("run flag: --cache-dir is a file")
def _(ws):
    where = ws.scratch("cachefile")
    (where / "f").write_text("x")
    return refused(ws.run(where, "--cache-dir", str(where / "f")), "--cache-dir",
                   absent=(where / "results",))


@case("run flag: --cache-dir under a file")
def _(ws):
    where = ws.scratch("cacheunder")
    (where / "f").write_text("x")
    return refused(ws.run(where, "--cache-dir", str(where / "f" / "c")), "--cache-dir",
                   absent=(where / "results",))


@case("run flag: --tracking-uri dead server")
def _(ws):
    where = ws.scratch("deaduri")
    result = ws.run(where, "--tracking-uri", f"http://127.0.0.1:{free_port()}", tracking=True)
    outcome = refused(result, "--no-tracking", absent=(where / "results",))
    if outcome[0] == "clear" and result.seconds > 30:
        return "stall", f"{result.seconds:.0f} s before the line"
    return outcome


@case("run flag: --tracking-uri sqlite in a missing folder")
def _(ws):
    where = ws.scratch("sqlite")
    return refused(ws.run(where, "--tracking-uri", "sqlite:////no/such/dir/m.db", tracking=True),
                   "/no/such/dir", absent=(where / "results",))


@case("run flag: --tracking-uri unknown scheme")
def _(ws):
    where = ws.scratch("scheme")
    return refused(ws.run(where, "--tracking-uri", "foo://bar", tracking=True), "foo://bar",
                   absent=(where / "results",))


def _quiet_handler():
    import http.server

    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            self.send_error(404)

        def log_message(self, *args):
            pass
    return Quiet


_Quiet = _quiet_handler()


def plugin_case(name: str, source: str, needle: str):
    def body(ws: Workspace):
        where = ws.scratch("plugin")
        module = f"attack_plugin_{ws.n}"
        (ws.root / f"{module}.py").write_text(textwrap.dedent(source))
        return refused(ws.run(where, "--plugin", module), (module, needle),
                       absent=(where / "results",))
    CASES.append(Case(f"plugin: {name}", "input", body))


plugin_case("raises on import", "raise ValueError('bad setting')\n", "bad setting")
plugin_case("syntax error", "def broken(:\n", "SyntaxError")
plugin_case("sys.exit on import", "import sys\nsys.exit(5)\n", "SystemExit")
plugin_case("imports a missing package", "import no_such_dependency_pkg\n",
            "no_such_dependency_pkg")
plugin_case("registers a taken name", """
    from dataclasses import dataclass
    from attack_toy import Toy
    from methods.base import register_method
    class Again(Toy):
        name = "toy"
    register_method(Again)
""", "registered twice")
plugin_case("Config not a dataclass", """
    from attack_toy import Toy
    from methods.base import register_method
    class Bad(Toy):
        name = "bad-config"
        Config = dict
    register_method(Bad)
""", "dataclass")


@case("plugin: --debug shows the plugin's traceback")
def _(ws):
    where = ws.scratch("debug")
    (ws.root / "attack_debug_plugin.py").write_text("raise RuntimeError('from the plugin')\n")
    result = ws.run(where, "--plugin", "attack_debug_plugin", "--debug")
    if result.rc == 2 and result.err.startswith("error: ") and "attack_debug_plugin.py" in result.err:
        return "ok", ""
    return "unclear", result.err[-300:]


# -- data: a damaged copy of the synthetic tree; the sweep must stop before it writes anything


def png_bytes(array, mode=None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def first(root: Path, pattern: str) -> Path:
    return sorted(root.glob(pattern))[0]


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def data_case(name: str, damage: Callable[[Path], Path | str], needle: str | None = None,
              extra: tuple[str, ...] = ()):
    """``damage`` breaks the data copy and returns the file (or text) the line must name."""
    def body(ws: Workspace):
        where = ws.scratch("data")
        data = ws.data_copy(where)
        named = damage(data)
        return refused(ws.run(where, *extra, data=data), needle or str(named),
                       absent=(where / "results",))
    CASES.append(Case(f"data: {name}", "input", body))


data_case("truncated training image", lambda d: truncate(first(d, "brick/train/good/*.png")))
data_case("truncated test image", lambda d: truncate(first(d, "brick/test/good/*.png")))
data_case("truncated anomalous image", lambda d: truncate(first(d, "brick/test/hole/*.png")))
data_case("zero-byte image", lambda d: (first(d, "brick/train/good/*.png").write_bytes(b""),
                                        first(d, "brick/train/good/*.png"))[1])
data_case("text in a .png", lambda d: (first(d, "brick/test/good/*.png").write_text("hello"),
                                       first(d, "brick/test/good/*.png"))[1])
data_case("truncated mask", lambda d: truncate(first(d, "brick/ground_truth/*/*.png")))
data_case("text in a mask", lambda d: (first(d, "brick/ground_truth/*/*.png").write_text("x"),
                                       first(d, "brick/ground_truth/*/*.png"))[1])


def _wrong_mask(d: Path) -> Path:
    from PIL import Image

    mask = first(d, "brick/ground_truth/*/*.png")
    Image.new("L", (31, 17)).save(mask)
    return mask


data_case("mask of the wrong size", _wrong_mask)
data_case("missing mask", lambda d: (first(d, "brick/ground_truth/*/*.png").unlink(),
                                     "has no mask")[1], "has no mask")


def _float_tiff(d: Path) -> Path:
    import numpy as np
    from PIL import Image

    victim = first(d, "brick/train/good/*.png")
    target = victim.with_suffix(".tiff")
    Image.fromarray(np.ones((32, 32), np.float32)).save(target)
    victim.unlink()
    return target


def _int32_tiff(d: Path) -> Path:
    import numpy as np
    from PIL import Image

    victim = first(d, "brick/train/good/*.png")
    target = victim.with_suffix(".tif")
    Image.fromarray(np.full((32, 32), 70000, np.int32)).save(target)
    victim.unlink()
    return target


def _bomb(d: Path) -> Path:
    """A PNG whose header claims 40000 x 40000 pixels (PIL refuses it as a decompression bomb)."""
    victim = first(d, "brick/train/good/*.png")

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                       + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    return victim


data_case("32-bit float TIFF", _float_tiff)
data_case("32-bit integer TIFF", _int32_tiff)
data_case("decompression bomb", _bomb)
data_case("empty train/good", lambda d: ([p.unlink() for p in (d / "brick/train/good").iterdir()],
                                         d / "brick/train/good")[1])
data_case("no train/good", lambda d: (shutil.rmtree(d / "brick/train"), "train")[1], "brick")
data_case("no test folder", lambda d: (shutil.rmtree(d / "brick/test"), d / "brick/test")[1])
data_case("empty test folder", lambda d: ([shutil.rmtree(p) for p in (d / "brick/test").iterdir()],
                                          d / "brick/test")[1])


def _no_anomalies(d: Path) -> str:
    for folder in (d / "brick/test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    shutil.rmtree(d / "brick/ground_truth")
    return "none to inject"


data_case("nothing to inject", _no_anomalies)
data_case("infeasible ratio", lambda d: "--noise-ratios", extra=("--noise-ratios", "0.9"))
data_case("infeasible ratio names the largest", lambda d: "largest feasible ratio is 0.69",
          extra=("--noise-ratios", "0.9"))
def _fewer_nut_anomalies(d: Path) -> str:
    for image in sorted((d / "nut" / "test").glob("[!g]*/*.png"))[:3]:
        (d / "nut" / "ground_truth" / image.parent.name / f"{image.stem}_mask.png").unlink()
        image.unlink()
    return "synthetic/nut"


data_case("infeasible ratio, second category", _fewer_nut_anomalies,
          extra=("--categories", "brick", "nut", "--noise-ratios", "0.2", "0.5"))
data_case("truncated image, second category",
          lambda d: truncate(first(d, "nut/train/good/*.png")),
          extra=("--categories", "brick", "nut"))
data_case("symlink to nowhere", lambda d: (first(d, "brick/train/good/*.png").unlink(),
                                           (d / "brick/train/good/zz.png").symlink_to("/no/x"),
                                           d / "brick/train/good/zz.png")[2],
          needle="zz.png")


def _accept_data(name: str, change: Callable[[Path], None],
                 check: Callable[[Path, Path], str | None] | None = None):
    """Data that must be read (correctly), not refused."""
    def body(ws: Workspace):
        where = ws.scratch("good")
        data = ws.data_copy(where)
        change(data)
        result = ws.run(where, data=data)
        return accepted(result, lambda: check(data, where / "results") if check else None)
    CASES.append(Case(f"data (accept): {name}", "input", body))


def _to_16_bit(d: Path) -> None:
    import numpy as np
    from PIL import Image

    for path in (d / "brick/train/good").glob("*.png"):
        gray = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 257
        path.write_bytes(png_bytes(gray))


def _check_16_bit(d: Path, results: Path) -> str | None:
    sys.path.insert(0, str(REPO))
    from datasets import Preprocess, load_category, load_images

    data = load_category("synthetic", d, "brick")
    image = load_images(data.train[:1], Preprocess(32, 32)).numpy()
    share = float((image == 255).mean())
    return None if share < 0.2 else f"{share:.0%} of a 16-bit image's pixels read as 255"


def _recolor(mode: str):
    def change(d: Path) -> None:
        from PIL import Image

        for path in (d / "brick/train/good").glob("*.png"):
            img = Image.open(path).convert("RGB")
            if mode == "CMYK":
                img.convert("CMYK").save(path.with_suffix(".jpg"))
                path.unlink()
            else:
                img.convert(mode).save(path)
    return change


def _only_anomalous(d: Path) -> None:
    shutil.rmtree(d / "brick/test/good")


def _check_said(d: Path, results: Path) -> str | None:
    records = list(results.glob("runs/*/record.json"))
    if not records:
        return "no record"
    record = json.loads(records[0].read_text())
    if "no_overlap" not in (record.get("undefined_metrics") or {}):
        return "the record does not say which metrics could not be computed"
    return None


_accept_data("16-bit greyscale PNGs", _to_16_bit, _check_16_bit)
_accept_data("RGBA PNGs", _recolor("RGBA"))
_accept_data("palette PNGs", _recolor("P"))
_accept_data("greyscale PNGs", _recolor("L"))
_accept_data("CMYK JPEGs", _recolor("CMYK"))
_accept_data("test set without normal images (said)", _only_anomalous, _check_said)


def _visa(ws: Workspace, where: Path, edit: Callable[[list[list[str]]], None]) -> Path:
    """A small raw VisA tree (from the synthetic brick) with its split CSV edited."""
    import csv

    root = where / "visa"
    rows = [["object", "split", "label", "image", "mask"]]
    brick = ws.data / "brick"
    for split, folder, label in (("train", "train/good", "normal"), ("test", "test/good", "normal")):
        for path in sorted((brick / folder).glob("*.png")):
            rel = f"part/Data/Images/Normal/{split}-{path.name}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / rel)
            rows.append(["part", split, label, rel, ""])
    for path in sorted((brick / "test").glob("[!g]*/*.png")):
        rel = f"part/Data/Images/Anomaly/{path.parent.name}-{path.name}"
        mask = f"part/Data/Masks/Anomaly/{path.parent.name}-{path.name}"
        for src, dst in ((path, rel), (brick / "ground_truth" / path.parent.name /
                                       f"{path.stem}_mask.png", mask)):
            (root / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / dst)
        rows.append(["part", "test", "anomaly", rel, mask])
    edit(rows)
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return root


def visa_case(name: str, edit: Callable[[list[list[str]]], None], needle: str):
    def body(ws: Workspace):
        where = ws.scratch("visa")
        root = _visa(ws, where, edit)
        preset = ws.preset(where, PRESET.replace("synthetic", "visa").replace("[brick]", "[part]"))
        return refused(ws.run(where, preset=preset, data=root), needle, absent=(where / "results",))
    CASES.append(Case(f"visa: {name}", "input", body))


visa_case("CSV lacks a column", lambda rows: [r.pop(4) for r in rows], "mask")
visa_case("CSV names a missing image", lambda rows: rows[3].__setitem__(3, "part/nope.png"),
          "nope.png")
visa_case("CSV anomalous image in train", lambda rows: rows[-1].__setitem__(1, "train"), "train")
visa_case("CSV unknown label", lambda rows: rows[2].__setitem__(2, "weird"), "weird")
visa_case("CSV anomaly without mask", lambda rows: rows[-1].__setitem__(4, ""), "no mask")


@case("visa: CSV not UTF-8")
def _(ws):
    where = ws.scratch("visa")
    root = _visa(ws, where, lambda rows: None)
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_bytes(csv_path.read_bytes() + "part,train,normal,\xe9.png,\n".encode("latin-1"))
    preset = ws.preset(where, PRESET.replace("synthetic", "visa").replace("[brick]", "[part]"))
    return refused(ws.run(where, preset=preset, data=root), "1cls.csv",
                   absent=(where / "results",))


@case("teacher: garbage weights file (plan untouched)")
def _(ws):
    where = ws.scratch("weights")
    results = where / "results"
    first_run = ws.run(where, results=results)
    if first_run.rc != 0:
        return "refused wrongly", first_run.err[-200:]
    before = snapshot(results)
    bad = where / "bad.pth"
    bad.write_bytes(b"garbage")
    result = ws.run(where, "--methods", "rd", "--set", "rd.backbone=resnet18",
                    "--teacher-weights", str(bad), results=results)
    return refused(result, "bad.pth", untouched=(results,), before=before)


@case("teacher: state dict of another network")
def _(ws):
    where = ws.scratch("weights2")
    path = where / "other.pth"
    subprocess.run([PYTHON, "-c", f"import torch; torch.save({{'fc.weight': torch.zeros(2, 2)}}, "
                               f"{str(path)!r})"], check=True, env=ws.env)
    return refused(ws.run(where, "--methods", "rd", "--set", "rd.backbone=resnet18",
                          "--teacher-weights", str(path)), "other.pth",
                   absent=(where / "results",))


# -- splits


def splits_case(name: str, args: Callable[[Workspace, Path], list[str]], needle: str):
    def body(ws: Workspace):
        where = ws.scratch("splits")
        return refused(ws.cli("splits", *args(ws, where)), needle, absent=(where / "out",))
    CASES.append(Case(f"splits: {name}", "input", body))


def _splits_args(data: Path, where: Path, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--data-root", str(data), "--out", str(where / "out"),
            *extra]


splits_case("no --dataset", lambda ws, w: ["--data-root", str(ws.data), "--noise-ratios", "0.1",
                                           "--out", str(w / "out")], "--dataset")
splits_case("ratio 1.5", lambda ws, w: _splits_args(ws.data, w, "--noise-ratios", "1.5"), "1.5")
splits_case("ratio nan", lambda ws, w: _splits_args(ws.data, w, "--noise-ratios", "nan"), "nan")
splits_case("ratio -0.1", lambda ws, w: _splits_args(ws.data, w, "--noise-ratios", "-0.1"), "-0.1")
splits_case("infeasible names --cap", lambda ws, w: _splits_args(ws.data, w, "--noise-ratios", "0.9"),
            "--cap")
splits_case("category ../", lambda ws, w: _splits_args(ws.data, w, "--noise-ratios", "0.1",
                                                        "--categories", "../data"), "../data")
splits_case("data root missing", lambda ws, w: _splits_args(Path("/no/such"), w, "--noise-ratios",
                                                             "0.1"), "/no/such")


@case("splits: truncated image")
def _(ws):
    where = ws.scratch("splits")
    data = ws.data_copy(where)
    victim = truncate(first(data, "nut/test/good/*.png"))
    return refused(ws.cli("splits", *_splits_args(data, where, "--noise-ratios", "0.1")),
                   str(victim), absent=(where / "out",))


@case("splits: --out is a file")
def _(ws):
    where = ws.scratch("splits")
    (where / "f").write_text("x")
    return refused(ws.cli("splits", "--dataset", "synthetic", "--data-root", str(ws.data),
                          "--noise-ratios", "0.1", "--out", str(where / "f")), str(where / "f"))


def _manifest(ws: Workspace, where: Path) -> Path:
    out = where / "m"
    r = ws.cli("splits", "--dataset", "synthetic", "--data-root", str(ws.data), "--categories",
               "brick", "--noise-ratios", "0.2", "--out", str(out))
    assert r.rc == 0, r.err
    return next(out.rglob("*.json"))


def verify_case(name: str, edit: Callable[[dict, Path], None], needle: str):
    def body(ws: Workspace):
        where = ws.scratch("verify")
        path = _manifest(ws, where)
        manifest = json.loads(path.read_text())
        edit(manifest, where)
        path.write_text(json.dumps(manifest))
        result = ws.cli("splits", "--data-root", str(ws.data), "--verify", str(path))
        outcome = verify_failed(result, needle)
        secret = "a4ce2f6bbfa7"  # sha256("secret")[:12]: the outside file's hash prefix
        if secret in result.out:
            return "accepted wrongly", "printed the hash of a file outside the data root"
        return outcome
    CASES.append(Case(f"splits --verify: {name}", "input", body))


def _outside(where: Path) -> Path:
    path = where / "outside.png"
    path.write_bytes(b"secret")
    return path


verify_case("key with ../", lambda m, w: m["train"][0].update(
    key="brick/../../" + os.path.relpath(_outside(w), w.parent)), "refused")
verify_case("absolute key", lambda m, w: m["train"][0].update(key=str(_outside(w))), "refused")
verify_case("mask with ../", lambda m, w: next(e for e in m["test_overlap"] if e["mask"]).update(
    mask="../" + os.path.relpath(_outside(w), w.parent)), "refused")
verify_case("category ../", lambda m, w: m.update(category="../data/brick"), "folder name")
verify_case("entry without key", lambda m, w: m["train"][0].pop("key"), "train[0].key")
verify_case("key a number", lambda m, w: m["train"][0].update(key=5), "train[0].key")
verify_case("label text", lambda m, w: m["test_overlap"][0].update(label="bad"), "label")
verify_case("train not a list", lambda m, w: m.update(train={"a": 1}), "train")
verify_case("entry not an object", lambda m, w: m["train"].append(3), "train[")
verify_case("ratio text", lambda m, w: m.update(noise_ratio="0.2"), "noise_ratio")
verify_case("seed null", lambda m, w: m.update(seed=None), "seed")
verify_case("sha256 missing", lambda m, w: m["train"][0].pop("sha256"), "sha256")
verify_case("injected text", lambda m, w: m["train"][0].update(injected="yes"), "injected")
verify_case("schema 2", lambda m, w: m.update(schema_version=2), "schema")
verify_case("no category", lambda m, w: m.pop("category"), "category")
verify_case("changed file hash", lambda m, w: m["train"][0].update(sha256="0" * 64), "sha256")
verify_case("edited list", lambda m, w: m["test_no_overlap"].pop(), "differs")


def _verify_file(name: str, text: bytes | None, needle: str):
    def body(ws: Workspace):
        where = ws.scratch("verify")
        path = where / "m.json"
        if text is not None:
            path.write_bytes(text)
        return verify_failed(ws.cli("splits", "--data-root", str(ws.data), "--verify", str(path)),
                             needle)
    CASES.append(Case(f"splits --verify: {name}", "input", body))


_verify_file("missing manifest", None, "does not exist")
_verify_file("not JSON", b"{oops", "not valid JSON")
_verify_file("a JSON list", b"[1, 2]", "schema")
_verify_file("not UTF-8", b'{"a": "\xe9"}', "not valid JSON")


# -- report, regress, synth, list, demo


def _results_with_one_run(ws: Workspace, where: Path) -> Path:
    results = where / "results"
    r = ws.run(where, results=results)
    assert r.rc == 0, r.err
    return results


@case("report: results folder missing")
def _(ws):
    return refused(ws.cli("report", "--results", "/no/such/results"), "/no/such/results")


@case("report: results is a file")
def _(ws):
    where = ws.scratch("report")
    (where / "f").write_text("x")
    return refused(ws.cli("report", "--results", str(where / "f")), str(where / "f"))


@case("report: no records")
def _(ws):
    where = ws.scratch("report")
    return refused(ws.cli("report", "--results", str(where)), "no run records")


@case("report: --out is a file")
def _(ws):
    where = ws.scratch("report")
    results = _results_with_one_run(ws, where)
    (where / "f").write_text("x")
    return refused(ws.cli("report", "--results", str(results), "--out", str(where / "f")),
                   str(where / "f"))


@case("report: bad --pro")
def _(ws):
    return refused(ws.cli("report", "--results", ".", "--pro", "nope"), "nope")


def _report_accepts(name: str, damage: Callable[[Path], None], needle: str):
    def body(ws: Workspace):
        where = ws.scratch("report")
        results = _results_with_one_run(ws, where)
        damage(results)
        result = ws.cli("report", "--results", str(results))

        def check():
            index = (results / "report" / "report.md").read_text()
            return None if needle in index else f"the report does not say {needle!r}"
        return accepted(result, check)
    CASES.append(Case(f"report (accept): {name}", "input", body))


_report_accepts("truncated scores.npz", lambda r: truncate(first(r, "runs/*/scores.npz")),
                "no scores.npz")
_report_accepts("garbage scores.npz", lambda r: first(r, "runs/*/scores.npz").write_bytes(b"PK"),
                "no scores.npz")
_report_accepts("damaged sweep plan", lambda r: first(r, "sweeps/*.json").write_text("{"),
                "complete run")
_report_accepts("metrics of the wrong type", lambda r: (lambda p: p.write_text(json.dumps(
    {**json.loads(p.read_text()), "metrics": {"no_overlap": {"i_auroc": "high"},
                                              "overlap": {}}})))(first(r, "runs/*/record.json")),
    "complete run")


@case("report: damaged record.json (read as not run)")
def _(ws):
    where = ws.scratch("report")
    results = _results_with_one_run(ws, where)
    first(results, "runs/*/record.json").write_text("{not json")
    result = ws.cli("report", "--results", str(results))

    def check():
        text = (results / "report" / "report.md").read_text()
        return None if "not run" in text else "the damaged run is not listed as not run"
    return accepted(result, check)


def regress_case(name: str, args: Callable[[Workspace, Path], list[str]], needle: str,
                 untouched: Callable[[Path], tuple[Path, ...]] = lambda w: ()):
    def body(ws: Workspace):
        where = ws.scratch("regress")
        argv = args(ws, where)
        keep = untouched(where)
        before = snapshot(*keep)
        return refused(ws.cli("regress", *argv), needle, untouched=keep, before=before)
    CASES.append(Case(f"regress: {name}", "input", body))


BASELINE = REPO / "results" / "baselines" / "ci.json"


def _baseline(where: Path, text: str | bytes, name: str = "b.json") -> Path:
    path = where / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


regress_case("results missing", lambda ws, w: ["--results", "/no/such", "--baseline",
                                               str(BASELINE)], "/no/such")
regress_case("results a file", lambda ws, w: ["--results", str(_baseline(w, "x")), "--baseline",
                                              str(BASELINE)], "is a file")
regress_case("baseline missing", lambda ws, w: ["--results", str(w), "--baseline",
                                                str(w / "none.json")], "none.json")
regress_case("baseline a folder", lambda ws, w: ["--results", str(w), "--baseline", str(w)],
             "is a folder")
regress_case("baseline not JSON", lambda ws, w: ["--results", str(w), "--baseline",
                                                 str(_baseline(w, "{x"))], "not valid")
regress_case("baseline not UTF-8", lambda ws, w: ["--results", str(w), "--baseline",
                                                  str(_baseline(w, b"\xff\xfe"))], "not valid")
regress_case("baseline other schema", lambda ws, w: ["--results", str(w), "--baseline",
                                                     str(_baseline(w, '{"schema": "x"}'))],
             "fuad-bench-baseline/1")
regress_case("baseline mangled groups", lambda ws, w: ["--results", str(w), "--baseline", str(
    _baseline(w, json.dumps({**json.loads(BASELINE.read_text()), "groups": [{"key": 1}]})))],
    "field")
regress_case("baseline k NaN", lambda ws, w: ["--results", str(w), "--baseline", str(
    _baseline(w, json.dumps({**json.loads(BASELINE.read_text()), "k": "nan"})))], "k=")
regress_case("--k nan", lambda ws, w: ["--results", str(w), "--baseline", str(BASELINE), "--k",
                                       "nan"], "k=")
regress_case("--k -1", lambda ws, w: ["--results", str(w), "--baseline", str(BASELINE), "--k",
                                      "-1"], "k=")
regress_case("--min-tol -1", lambda ws, w: ["--results", str(w), "--baseline", str(BASELINE),
                                            "--min-tol", "-1"], "min_tolerance")
regress_case("--floor text", lambda ws, w: ["--results", str(w), "--baseline", str(BASELINE),
                                            "--floor", "i_auroc=high"], "--floor")
regress_case("--floor unknown metric", lambda ws, w: ["--results", str(w), "--baseline",
                                                      str(BASELINE), "--floor", "acc=0.5"], "acc")
regress_case("--floor nan", lambda ws, w: ["--results", str(w), "--baseline", str(BASELINE),
                                           "--floor", "i_auroc=nan"], "floor")
regress_case("--metrics bogus", lambda ws, w: ["--results", str(w), "--baseline", str(BASELINE),
                                               "--metrics", "bogus"], "bogus")
regress_case("--update into a folder", lambda ws, w: ["--results", str(w), "--baseline", str(w),
                                                      "--update"], "is a folder")
regress_case("--update under a file", lambda ws, w: ["--results", str(w), "--baseline",
                                                     str(_baseline(w, "x", "f") / "b.json"),
                                                     "--update"], "is a file")
regress_case("--update with no run", lambda ws, w: ["--results", str(w), "--baseline",
                                                    str(w / "new.json"), "--update"],
             "no complete run")
regress_case("--json into a folder", lambda ws, w: ["--results", str(w), "--baseline",
                                                    str(BASELINE), "--json", str(w)],
             "is a folder")
regress_case("--update keeps a broken baseline's bytes on refusal",
             lambda ws, w: ["--results", str(w), "--baseline", str(_baseline(w, "{x")),
                            "--update"], "no complete run", lambda w: (w / "b.json",))


def simple_case(name: str, args: Callable[[Workspace, Path], list[str]], needle: str,
                absent: Callable[[Path], tuple[Path, ...]] = lambda w: ()):
    def body(ws: Workspace):
        where = ws.scratch("cmd")
        return refused(ws.cli(*args(ws, where)), needle, absent=absent(where))
    CASES.append(Case(name, "input", body))


simple_case("synth: --out is a file", lambda ws, w: ["synth", "--out",
                                                     str(_baseline(w, "x", "f"))], "f")
simple_case("synth: --size 0", lambda ws, w: ["synth", "--out", str(w / "s"), "--size", "0"],
            "size", lambda w: (w / "s",))
simple_case("synth: --size -8", lambda ws, w: ["synth", "--out", str(w / "s"), "--size", "-8"],
            "size", lambda w: (w / "s",))
simple_case("synth: --train 0", lambda ws, w: ["synth", "--out", str(w / "s"), "--train", "0"],
            "train", lambda w: (w / "s",))
simple_case("synth: --test-anomalous -1", lambda ws, w: ["synth", "--out", str(w / "s"),
                                                        "--test-anomalous", "-1"], "anomalous",
            lambda w: (w / "s",))
simple_case("synth: --seed -1", lambda ws, w: ["synth", "--out", str(w / "s"), "--seed", "-1"],
            "seed", lambda w: (w / "s",))
simple_case("synth: non-empty other folder", lambda ws, w: (
    _baseline(w, "mine", "keep.txt"), ["synth", "--out", str(w)])[1], "--force")
simple_case("synth: unknown category", lambda ws, w: ["synth", "--out", str(w / "s"),
                                                     "--categories", "marble"], "marble")
simple_case("list: --dataset alone", lambda ws, w: ["list", "--dataset", "mvtec"], "together")
simple_case("list: missing root", lambda ws, w: ["list", "--dataset", "mvtec", "--data-root",
                                                 "/no/such"], "/no/such")
simple_case("list: root a file", lambda ws, w: ["list", "--dataset", "mvtec", "--data-root",
                                                str(_baseline(w, "x", "f"))], "f")
simple_case("demo: --results a file", lambda ws, w: ["demo", "--data-root", str(w / "d"),
                                                     "--results", str(_baseline(w, "x", "f")),
                                                     "--no-tracking"], "is a file")
simple_case("demo: --image-size 0", lambda ws, w: ["demo", "--data-root", str(w / "d"),
                                                   "--image-size", "0", "--results",
                                                   str(w / "r")], "image-size",
            lambda w: (w / "r",))
simple_case("demo: --data-root a file", lambda ws, w: ["demo", "--data-root",
                                                       str(_baseline(w, "x", "f")), "--results",
                                                       str(w / "r"), "--no-tracking"], "f",
            lambda w: (w / "r",))
simple_case("cli: unknown command", lambda ws, w: ["frobnicate"], "frobnicate")
simple_case("cli: run without --preset", lambda ws, w: ["run"], "--preset")


# --------------------------------------------------------------------------------------------
# Faults


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on 127.0.0.1 with its store in ``folder``; stopped by its pid."""

    def __init__(self, ws: Workspace, folder: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**ws.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [PYTHON, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
               "--artifacts-destination", str(folder / "artifacts")]
        self.log = open(folder / f"server-{self.port}.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)

    def signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()


SLOW_PRESET = PRESET.replace("categories: [brick]", "categories: [brick, nut]").replace(
    "noise_ratios: [0.2]", "noise_ratios: [0.0, 0.1, 0.2]").replace(
    "methods: [toy]", "methods: [{name: toy, config: {sleep_s: 1.5}}]")
N_SLOW = 6


def _done(results: Path) -> dict[str, bytes]:
    """Fingerprint -> record bytes of every run that is done (record ok and files whole)."""
    sys.path.insert(0, str(REPO))
    from bench.records import RECORD_FILE, is_done, load_record

    out = {}
    for folder in sorted((results / "runs").glob("*")) if (results / "runs").is_dir() else ():
        record = load_record(folder / RECORD_FILE)
        if is_done(folder, record):
            out[folder.name] = (folder / RECORD_FILE).read_bytes()
    return out


def _mlflow_state(uri: str) -> tuple[list[str], Counter]:
    """(statuses of RUNNING runs, FINISHED children per fingerprint) of a store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids) if ids else []
    running = [f"{r.data.tags.get('kind')}:{r.info.run_id[:8]}" for r in runs
               if r.info.status == "RUNNING"]
    finished = Counter(r.data.tags.get("fingerprint") for r in runs
                       if r.data.tags.get("kind") == "run" and r.info.status == "FINISHED")
    return running, finished


def _wait_for(predicate, timeout: float = 240, step: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def _fits(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _kill_and_rerun(ws: Workspace, name: str, when: Callable[[Path], bool], sig,
                    expect_rc: int | None) -> tuple[str, str]:
    where = ws.scratch(name)
    preset = ws.preset(where, SLOW_PRESET)
    results = where / "results"
    log = where / "fits.log"
    env = {"ATTACK_FIT_LOG": str(log)}
    args = ["run", "--preset", str(preset), "--plugin", "attack_toy", "--data-root",
            str(ws.data), "--results", str(results), "--no-report"]
    proc = ws.popen(*args, env=env, start_new_session=True)
    if not _wait_for(lambda: when(results)):
        proc.kill()
        return "stall", "the sweep never reached the kill point"
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return "stall", f"signal {sig} did not stop the sweep"
    if expect_rc is not None and proc.returncode != expect_rc:
        return "wrong exit code", f"exit {proc.returncode} after signal {sig}: {err[-200:]}"
    if "Traceback" in err:
        return "traceback", _last_error(err)
    done_before = _done(results)
    rerun = ws.cli(*args, env=env)
    if rerun.rc != 0:
        return ("traceback" if "Traceback" in rerun.err else "wrong exit code",
                f"rerun exit {rerun.rc}: {_last_error(rerun.err)}")
    done_after = _done(results)
    if len(done_after) != N_SLOW:
        return "data lost", f"{len(done_after)} of {N_SLOW} runs done after the rerun"
    changed = [fp for fp, data in done_before.items() if done_after.get(fp) != data]
    if changed:
        return "data lost", f"{len(changed)} finished runs were run again"
    running, finished = _mlflow_state(f"sqlite:///{results / 'mlflow.db'}")
    if running:
        return "stuck tracking", f"left RUNNING: {running}"
    if sorted(finished) != sorted(done_after) or set(finished.values()) != {1}:
        return "stuck tracking", f"FINISHED children per run: {dict(finished)}"
    return "handled", f"{len(done_before)} done at the kill, {_fits(log)} fits in all"


def _records(results: Path) -> int:
    return len(list(results.glob("runs/*/record.json")))


@case("SIGKILL mid-sweep, rerun", "fault")
def _(ws):
    return _kill_and_rerun(ws, "kill", lambda r: _records(r) >= 2, signal.SIGKILL, None)


@case("SIGKILL just after a record lands, rerun (MLflow reconciled)", "fault")
def _(ws):
    return _kill_and_rerun(ws, "kill-window", lambda r: _records(r) >= 1, signal.SIGKILL, None)


@case("SIGTERM mid-sweep, rerun", "fault")
def _(ws):
    return _kill_and_rerun(ws, "term", lambda r: _records(r) >= 2, signal.SIGTERM, 130)


@case("Ctrl-C mid-sweep, rerun", "fault")
def _(ws):
    return _kill_and_rerun(ws, "int", lambda r: _records(r) >= 2, signal.SIGINT, 130)


def _damage_and_rerun(ws: Workspace, name: str, damage: Callable[[Path], None]) -> tuple[str, str]:
    where = ws.scratch(name)
    results = where / "results"
    log = where / "fits.log"
    env = {"ATTACK_FIT_LOG": str(log)}
    preset = ws.preset(where, PRESET.replace("seeds: [0]", "seeds: [0, 1]"))
    first_run = ws.run(where, preset=preset, results=results, env=env)
    if first_run.rc != 0:
        return "wrong exit code", first_run.err[-200:]
    damage(results)
    rerun = ws.run(where, preset=preset, results=results, env=env)
    if rerun.rc != 0:
        return "wrong exit code", f"rerun exit {rerun.rc}: {_last_error(rerun.err)}"
    if len(_done(results)) != 2:
        return "data lost", f"{len(_done(results))} of 2 runs done after the rerun"
    if _fits(log) != 3:
        return "data lost", f"{_fits(log)} fits; the damaged run alone should train again"
    return "handled", "the damaged run was run again, the other kept"


@case("truncated scores.npz of a finished run", "fault")
def _(ws):
    return _damage_and_rerun(ws, "npz", lambda r: truncate(first(r, "runs/*/scores.npz")))


@case("one byte of manifest.json flipped", "fault")
def _(ws):
    def flip(results):
        path = first(results, "runs/*/manifest.json")
        data = bytearray(path.read_bytes())
        data[10] ^= 1
        path.write_bytes(bytes(data))
    return _damage_and_rerun(ws, "manifest", flip)


@case("record.json deleted", "fault")
def _(ws):
    return _damage_and_rerun(ws, "record", lambda r: first(r, "runs/*/record.json").unlink())


@case("data-check.json damaged", "fault")
def _(ws):
    def damage(results):
        (results / "data-check.json").write_text("{")
        truncate(first(results, "runs/*/scores.npz"))
    return _damage_and_rerun(ws, "datacheck", damage)


@case("an image truncated after a finished sweep", "fault")
def _(ws):
    where = ws.scratch("later")
    data = ws.data_copy(where)
    results = where / "results"
    if ws.run(where, data=data, results=results).rc != 0:
        return "wrong exit code", "first sweep failed"
    before = snapshot(results)
    victim = truncate(first(data, "brick/test/good/*.png"))
    result = ws.run(where, "--seeds", "1", data=data, results=results)
    outcome = refused(result, str(victim), untouched=(results,), before=before)
    return ("handled", outcome[1]) if outcome[0] == "clear" else outcome


@case("two sweeps on one results folder", "fault")
def _(ws):
    where = ws.scratch("two")
    preset = ws.preset(where, SLOW_PRESET)
    results = where / "results"
    log = where / "fits.log"
    env = {"ATTACK_FIT_LOG": str(log)}
    args = ["run", "--preset", str(preset), "--plugin", "attack_toy", "--data-root",
            str(ws.data), "--results", str(results), "--no-report"]
    first_proc = ws.popen(*args, env=env)
    if not _wait_for(lambda: _records(results) >= 1):
        first_proc.kill()
        return "stall", "the first sweep did not start"
    second = ws.cli(*args, env=env)
    _, first_err = first_proc.communicate(timeout=300)
    if first_proc.returncode != 0:
        return "wrong exit code", f"first sweep exit {first_proc.returncode}: {first_err[-200:]}"
    outcome = refused(second, "another sweep is running")
    if outcome[0] != "clear":
        return outcome
    if _fits(log) != N_SLOW:
        return "data lost", f"{_fits(log)} fits for {N_SLOW} runs"
    running, finished = _mlflow_state(f"sqlite:///{results / 'mlflow.db'}")
    if running or set(finished.values()) != {1}:
        return "stuck tracking", f"running {running}, finished {dict(finished)}"
    return "handled", outcome[1]


@case("MLflow server down at start", "fault")
def _(ws):
    where = ws.scratch("down")
    result = ws.run(where, "--tracking-uri", f"http://127.0.0.1:{free_port()}", tracking=True)
    outcome = refused(result, "--no-tracking", absent=(where / "results",))
    if outcome[0] != "clear":
        return outcome
    if result.seconds > 30:
        return "stall", f"{result.seconds:.0f} s before the line"
    alone = ws.run(where, "--tracking-uri", f"http://127.0.0.1:{free_port()}")  # --no-tracking
    if alone.rc != 0:
        return "wrong exit code", f"--no-tracking exit {alone.rc}"
    return "handled", f"{result.seconds:.1f} s: {outcome[1]}"


def _server_fault(ws: Workspace, name: str, sig) -> tuple[str, str]:
    where = ws.scratch(name)
    server = Server(ws, where)
    try:
        preset = ws.preset(where, SLOW_PRESET)
        results = where / "results"
        args = ["run", "--preset", str(preset), "--plugin", "attack_toy", "--data-root",
                str(ws.data), "--results", str(results), "--no-report", "--tracking-uri",
                server.url]
        started = time.time()
        proc = ws.popen(*args)
        if not _wait_for(lambda: _records(results) >= 2):
            proc.kill()
            return "stall", "the sweep did not start"
        server.signal(sig)
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return "stall", "the sweep did not finish within 240 s of the server's fault"
        elapsed = time.time() - started
        warnings = [ln for ln in err.splitlines() if "MLflow tracking" in ln and "stopped" in ln]
        if proc.returncode != 0:
            return "wrong exit code", f"exit {proc.returncode}: {_last_error(err)}"
        if len(warnings) != 1:
            return "unclear", f"{len(warnings)} tracking warnings"
        if len(_done(results)) != N_SLOW:
            return "data lost", f"{len(_done(results))} of {N_SLOW} runs done"
        # Training alone takes N_SLOW x 1.5 s; the fault may cost seconds, not minutes.
        if elapsed > N_SLOW * 1.5 + 90:
            return "stall", f"{elapsed:.0f} s in all"
        server.stop()
        server = Server(ws, where, server.port)  # back up, same store
        rerun = ws.cli(*args)
        if rerun.rc != 0:
            return "wrong exit code", f"rerun exit {rerun.rc}: {_last_error(rerun.err)}"
        running, finished = _mlflow_state(server.url)
        if running:
            return "stuck tracking", f"left RUNNING after the rerun: {running}"
        return "handled", f"sweep {elapsed:.0f} s with one warning; rerun reconciled the store"
    finally:
        server.stop()


@case("MLflow server killed mid-sweep", "fault")
def _(ws):
    return _server_fault(ws, "server-killed", signal.SIGKILL)


@case("MLflow server frozen (SIGSTOP) mid-sweep", "fault")
def _(ws):
    return _server_fault(ws, "server-frozen", signal.SIGSTOP)


@case("two sweeps on two folders, one new SQLite store", "fault")
def _(ws):
    where = ws.scratch("shared-store")
    preset = ws.preset(where, PRESET)
    uri = f"sqlite:///{where / 'shared.db'}"
    procs = [ws.popen("run", "--preset", str(preset), "--plugin", "attack_toy", "--data-root",
                      str(ws.data), "--results", str(where / f"r{i}"), "--no-report",
                      "--tracking-uri", uri) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs):
        if "Traceback" in err:
            return "traceback", _last_error(err)
        if proc.returncode != 0:
            return "wrong exit code", f"exit {proc.returncode}: {_last_error(err)}"
        if "MLflow tracking" in err:
            return "stuck tracking", next(ln for ln in err.splitlines() if "MLflow" in ln)
    running, finished = _mlflow_state(uri)
    if running or sum(finished.values()) != 2:
        return "stuck tracking", f"running {running}, finished {dict(finished)}"
    return "handled", "both sweeps tracked, the store created once"


def _method_fault(name: str, method: str, needle: str, extra: tuple[str, ...] = ()):
    def body(ws: Workspace):
        where = ws.scratch("method")
        preset = ws.preset(where, PRESET.replace("methods: [toy]", f"methods: [{method}, toy]"))
        result = ws.run(where, *extra, preset=preset)
        if "Traceback" in result.err:
            return "traceback", _last_error(result.err)
        if result.rc != 1:
            return "wrong exit code", f"exit {result.rc}: {_last_error(result.err)}"
        if needle not in result.out + result.err:
            return "unclear", (result.out + result.err)[-300:]
        if len(_done(where / "results")) != 1:
            return "data lost", "the good run was not kept"
        return "handled", next(ln for ln in result.out.splitlines() if "FAILED" in ln).strip()
    CASES.append(Case(f"method: {name}", "fault", body))


_method_fault("sys.exit in fit", "toy-exit", "SystemExit")
_method_fault("os._exit in fit (processes)", "toy-die", "WorkerDied",
              ("--executor", "processes", "--workers", "1"))
_method_fault("NaN scores", "toy-nan", "non-finite")
_method_fault("MemoryError in fit", "toy-oom", "MemoryError")


@case("processes workers after a SIGKILLed driver", "fault")
def _(ws):
    where = ws.scratch("orphans")
    preset = ws.preset(where, SLOW_PRESET.replace("sleep_s: 1.5", "sleep_s: 60"))
    proc = ws.popen("run", "--preset", str(preset), "--plugin", "attack_toy", "--data-root",
                    str(ws.data), "--results", str(where / "results"), "--no-tracking",
                    "--executor", "processes", "--workers", "2")

    def children() -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == proc.pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found

    if not _wait_for(lambda: len(children()) >= 2, timeout=120, step=0.5):
        proc.kill()
        return "stall", "no workers appeared"
    time.sleep(3)
    workers = children()
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    if _wait_for(lambda: not any(alive(p) for p in workers), timeout=15, step=0.2):
        return "handled", f"{len(workers)} worker processes ended with the driver"
    left = [p for p in workers if alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return "data lost", f"{len(left)} workers outlived the driver"


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the cases whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the cases and stop")
    parser.add_argument("--keep", type=Path, help="workspace folder to keep (default: a temp one)")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or args.only in c.name]
    if args.list:
        for c in cases:
            print(f"{c.kind:<6} {c.name}")
        print(f"{sum(c.kind == 'input' for c in cases)} inputs, "
              f"{sum(c.kind == 'fault' for c in cases)} faults")
        return 0
    root = args.keep or Path(tempfile.mkdtemp(prefix="fuad-attack-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ws = Workspace(root)
    counts = {"input": Counter(), "fault": Counter()}
    for c in cases:
        t0 = time.time()
        try:
            outcome, detail = c.body(ws)
        except Exception as err:  # noqa: BLE001 - the harness of the attack itself
            outcome, detail = "harness error", f"{type(err).__name__}: {err}"
        counts[c.kind][outcome] += 1
        print(f"[{outcome:>20}] {c.kind:<5} {c.name}  ({time.time() - t0:.0f} s)  "
              f"{str(detail)[:240]}", flush=True)
    print()
    for kind, counter in counts.items():
        total = sum(counter.values())
        if total:
            print(f"{kind}s: {total}: " + ", ".join(f"{k} {v}" for k, v in counter.most_common()))
    print(f"workspace {root}; {time.time() - started:.0f} s")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    bad = {"clear", "ok", "handled"}
    return 0 if all(set(c) <= bad for c in counts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
