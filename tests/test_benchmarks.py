"""The reference RD4AD loop (benchmarks/reference_rd.py) and the GPU check (gpu_check.py).

CPU only, ResNet-18 at 64 px, a handful of images: the loop's fidelity to RD4AD main.py (teacher
gradients, per-epoch decoding, Adam settings, identical inputs to the harness), the comparison's
interleaving, and the check's peaks, budgets, error rows and estimate.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402
import reference_rd  # noqa: E402
from test_runner import MeanDiff  # noqa: E402,F401  (registers test-mean-diff)

from datasets import Preprocess  # noqa: E402
from methods.backbones import teacher_input  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tests time nothing, and on a shared 2-core host two threads per
    process can be many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """A synthetic category of four 73 px PNGs (the geometry 73 -> 64 of 64 px runs; the loops
    train at 32 px, resize 37, to stay cheap)."""
    return reference_rd.write_pngs(tmp_path_factory.mktemp("pngs"), n=4, size=73)


def _loop(root, **kw):
    return reference_rd.ReferenceLoop(root / "train", backbone="resnet18", crop=32, resize=37,
                                      batch_size=2, **kw)


# --------------------------------------------------------------------------------------------
# The reference loop


def test_reference_teacher_runs_with_gradients_and_layer4(pngs):
    loop = _loop(pngs)
    calls = []
    loop.teacher.layer4.register_forward_hook(lambda *args: calls.append(1))
    running_mean = loop.teacher.bn1.running_mean.clone()
    teacher_before = loop.teacher.conv1.weight.detach().clone()
    student_before = [p.detach().clone() for p in loop.student.parameters()]
    loop.train_epoch()
    # Two steps of batch 2: layer4 ran each time; the backward reached the teacher's first
    # convolution (its gradient accumulates, as in RD4AD), whose weights never change.
    assert len(calls) == 2
    assert loop.teacher.conv1.weight.grad is not None
    assert loop.teacher.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in loop.teacher.layer4.parameters())  # not in the loss
    assert not loop.teacher.training
    assert torch.equal(loop.teacher.bn1.running_mean, running_mean)  # eval-mode BatchNorm
    assert torch.equal(loop.teacher.conv1.weight, teacher_before)
    assert all(not torch.equal(a, b) for a, b in zip(student_before, loop.student.parameters()))


def test_reference_decodes_every_image_every_epoch(pngs, monkeypatch):
    opened = []
    real_open = PIL.Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(getattr(fp, "name", fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    loop = _loop(pngs)
    loop.train_epoch()
    loop.train_epoch()
    assert len(opened) == 2 * 4 and len(set(opened)) == 4


def test_reference_optimizer_and_loader_are_rd4ads(pngs):
    loop = _loop(pngs)
    group = loop.optimizer.param_groups[0]
    assert group["lr"] == 0.005 and tuple(group["betas"]) == (0.5, 0.999)
    assert {id(p) for p in group["params"]} == {id(p) for p in loop.student.parameters()}
    assert loop.loader.batch_size == 2 and loop.loader.num_workers == 0
    assert isinstance(loop.loader.sampler, torch.utils.data.RandomSampler)  # shuffle=True
    assert loop.loader.drop_last is False


def test_reference_sees_the_harness_pixels(pngs):
    """ImageFolder + RD4AD's transform give exactly the harness's normalised input."""
    path = sorted((pngs / "train" / "good").glob("*.png"))[0]
    with PIL.Image.open(path) as img:
        ours = teacher_input(torch.from_numpy(Preprocess(73, 64).image(img))[None], "cpu")[0]
        theirs = reference_rd.reference_transform(64, 73)(img.convert("RGB"))
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)


def test_reference_cudnn_flags_are_restored():
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    with reference_rd.reference_cudnn():
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == before


def test_timings_have_steady_window(pngs):
    ref = reference_rd.time_reference(pngs / "train", backbone="resnet18", crop=32, resize=37,
                                      epochs=2, batch_size=2)
    ours = reference_rd.time_harness(pngs, backbone="resnet18", crop=32, resize=37, epochs=2,
                                     batch_size=2, amp_bf16=False)
    for result in (ref, ours):
        assert result["images"] == 4 and len(result["epoch_s"]) == 2
        # Steady = the second epoch alone.
        assert result["steady_images_per_s"] == pytest.approx(4 / result["epoch_s"][1])
        assert np.isfinite(result["losses"]).all()
    assert ours["config"]["amp_bf16"] is False
    assert reference_rd.steady_rate(4, [0.0, 1.0]) is None  # one epoch: no steady window
    assert reference_rd.steady_rate(4, [0.0, 5.0, 7.0, 9.0]) == pytest.approx(2.0)


def test_compare_interleaves_and_takes_medians(monkeypatch, tmp_path):
    order = []
    rates = {"reference": iter([10.0, 30.0, 20.0]), "harness float32": iter([40.0, 60.0, 50.0]),
             "harness bf16": iter([90.0, 70.0, 80.0])}

    def fake(arm):
        def run(*args, **kwargs):
            order.append(arm)
            rate = next(rates[arm])
            return {"images": 4, "steady_images_per_s": rate, "total_images_per_s": rate / 2}
        return run

    monkeypatch.setattr(reference_rd, "time_reference", fake("reference"))
    harness_ = {False: fake("harness float32"), True: fake("harness bf16")}
    monkeypatch.setattr(reference_rd, "time_harness",
                        lambda *a, amp_bf16, **k: harness_[amp_bf16](*a, **k))
    result = reference_rd.compare(tmp_path, backbone="resnet18", crop=64, resize=73, epochs=2,
                                  repeats=3, bf16=True, log=lambda line: None)
    assert order == ["reference", "harness float32", "harness bf16"] * 3
    summary = result["summary"]
    assert summary["reference"]["steady_images_per_s"] == 20.0
    assert summary["harness float32"]["steady_vs_reference"] == pytest.approx(2.5)
    assert summary["harness bf16"]["total_vs_reference"] == pytest.approx(4.0)
    rates.update(reference=iter([1.0]), **{"harness float32": iter([2.0])})
    assert "harness bf16" not in reference_rd.compare(
        tmp_path, backbone="resnet18", crop=64, resize=73, epochs=2, repeats=1,
        log=lambda line: None)["summary"]  # CPU default: no bf16 arm


def test_reference_cli_errors_are_one_line(capsys, tmp_path):
    assert reference_rd.main(["--epochs", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert reference_rd.main(["--data", str(tmp_path / "missing"), "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert "not a folder of class subfolders" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# The GPU check


@pytest.mark.parametrize("name, label, bf16", [
    ("NVIDIA H200", "H200 SXM", 989.4e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5e12),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100", 312e12),
    ("NVIDIA GeForce RTX 3090", "GeForce RTX 3090", 71e12),
    ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090", 165.2e12),
])
def test_peaks_by_device_name(name, label, bf16):
    peaks = gpu_check.device_peaks(name)
    assert peaks["label"] == label
    assert peaks["bf16"] == pytest.approx(bf16)
    assert 0 < peaks["fp32"] <= peaks["tf32"] < peaks["bf16"]


@pytest.mark.parametrize("name", ["NVIDIA GH200 480GB", "NVIDIA GeForce RTX 3090 Ti",
                                  "NVIDIA GeForce RTX 4090 D", "Tesla T4", "AMD EPYC", ""])
def test_unknown_devices_have_no_peak(name):
    assert gpu_check.device_peaks(name) == {"label": "unknown"}


def test_peak_kind_follows_precision_and_tf32(monkeypatch):
    peaks = gpu_check.device_peaks("NVIDIA H200")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert gpu_check.peak_for(peaks, "float32", cuda) == ("tf32", pytest.approx(494.7e12))
    assert gpu_check.peak_for(peaks, "bf16", cuda) == ("bf16", pytest.approx(989.4e12))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert gpu_check.peak_for(peaks, "float32", cuda) == ("fp32", pytest.approx(66.9e12))
    assert gpu_check.peak_for(peaks, "bf16", torch.device("cpu")) == ("unknown", None)
    assert gpu_check.peak_for({"label": "unknown"}, "bf16", cuda) == ("bf16", None)
    assert gpu_check.mfu(2.5e14, 1e15) == pytest.approx(0.25)
    assert gpu_check.mfu(2.5e14, None) is None and gpu_check.mfu(None, 1e15) is None


def test_summary_rows_medians_flops_and_ratio(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    samples = {
        "rd float32": [{"steady_images_per_s": r, "infer_images_per_s": 100.0,
                        "peak_mem_mb": m} for r, m in ((300.0, 5.0), (100.0, 7.0), (200.0, 6.0))],
        "rd bf16": [{"steady_images_per_s": 400.0, "infer_images_per_s": None}],
        "reference": [{"steady_images_per_s": 50.0}, {"steady_images_per_s": 150.0}],
    }
    flops = {"rd": 1e11, "reference": 2e11}
    rows = {r["row"]: r for r in gpu_check.summarise_training(
        samples, flops, gpu_check.device_peaks("NVIDIA H100 80GB HBM3"), torch.device("cuda"))}
    rd = rows["rd float32"]
    assert rd["train_images_per_s"] == 200.0 and rd["samples"] == 3 and rd["peak_mem_mb"] == 7.0
    assert rd["vs_reference"] == pytest.approx(2.0)
    assert rd["achieved_flops_per_s"] == pytest.approx(2e13)
    assert rd["peak_kind"] == "tf32" and rd["mfu"] == pytest.approx(2e13 / 494.7e12)
    assert rows["rd bf16"]["mfu"] == pytest.approx(4e13 / 989.4e12)
    assert rows["rd bf16"]["infer_images_per_s"] is None
    ref = rows["reference"]
    assert ref["vs_reference"] == 1.0 and ref["achieved_flops_per_s"] == pytest.approx(2e13)


def test_mvtec_estimate():
    assert gpu_check.mvtec_train_counts(0.0) == 3629  # docs/protocol.md §1, 15 categories
    assert gpu_check.mvtec_train_counts(0.1) == 3629 + 358  # + floor(0.1 n) per category
    train = {"rows": [{"row": "rd bf16", "method": "rd", "precision": "bf16",
                       "train_images_per_s": 250.0},
                      {"row": "cdd bf16", "method": "cdd", "precision": "bf16",
                       "train_images_per_s": None}]}
    estimate = gpu_check.estimate_section(train)
    (row,) = estimate["rows"]
    assert row["seconds_per_image_epoch"] == pytest.approx(0.004)
    assert row["minutes_clean"] == pytest.approx(0.004 * 3629 * 200 / 60)
    assert row["minutes_noise_0.1"] == pytest.approx(0.004 * 3987 * 200 / 60)
    assert "skipped" in " ".join(gpu_check.estimate_section({"rows": []})["notes"])


def test_section_budget_interrupts_skips_and_records_errors():
    section = gpu_check.Section("demo", budget_s=4.0, deadline=time.perf_counter() + 60,
                                item_fraction=0.25)

    def spin():
        while True:
            time.sleep(0.01)

    def fail():
        raise ValueError("bad thing\nsecond line")

    assert section.run("quick", lambda: 42) == 42
    assert section.run("broken", fail) is None
    started = time.perf_counter()
    assert section.run("slow", spin) is None
    # Stopped at the item cap (1 s), not at the section's budget (4 s); slack for a busy CPU.
    assert time.perf_counter() - started < 3.5
    for _ in range(10):  # fillers until the section's budget is spent
        section.run("filler", spin)
        if section.items[-1]["status"] == "skipped":
            break
    assert section.run("late", lambda: 1) is None
    status = {i["item"]: i for i in section.items}
    assert status["quick"]["status"] == "ok"
    assert status["broken"]["status"] == "error"
    assert status["broken"]["error"] == "ValueError: bad thing"
    assert status["slow"]["status"] == "timed_out"
    assert status["late"]["status"] == "skipped" and "budget spent" in status["late"]["reason"]
    assert sum(i["item"] == "filler" and i["status"] == "timed_out" for i in section.items) >= 1


def test_section_stops_at_the_whole_check_deadline():
    section = gpu_check.Section("demo", budget_s=100.0, deadline=time.perf_counter() + 1.0)
    started = time.perf_counter()
    assert section.run("spin", lambda: time.sleep(5)) is None
    assert section.items[-1]["status"] == "timed_out"
    assert time.perf_counter() - started < 4.0  # the 1 s deadline, not the 5 s sleep


def test_infer_rows_for_every_method_even_failing_ones(tmp_path, monkeypatch):
    plan = gpu_check.TINY
    section = gpu_check.Section("infer", 60.0, time.perf_counter() + 60)
    result = gpu_check.infer_section(section, plan, tmp_path, torch.device("cpu"),
                                     names=["test-mean-diff", "no-such-method"])
    ok, bad = result["rows"]
    assert ok["status"] == "ok" and ok["infer_images_per_s"] > 0 and ok["peak_infer_mb"] > 0
    assert bad["method"] == "no-such-method" and bad["status"] == "error"
    assert "unknown method 'no-such-method'" in bad["error"]


def test_infer_overrides_add_backbone_and_float32():
    from methods import get_method_class

    cls = get_method_class("rd")
    overrides = gpu_check.infer_overrides(cls, gpu_check.FULL)
    assert overrides == {**cls.smoke_overrides, "backbone": "wide_resnet50_2", "amp_bf16": False}
    assert gpu_check.infer_overrides(get_method_class("test-mean-diff"), gpu_check.FULL) == {}


def test_training_rows_set_precision_explicitly():
    for method in ("rd", "cdd"):
        for bf16 in (False, True):
            assert gpu_check.train_overrides(gpu_check.FULL, method, bf16)["amp_bf16"] is bf16
    configs = [spec.config for _, _, spec in gpu_check.precision_specs(gpu_check.FULL, Path("."))]
    assert [c["amp_bf16"] for c in configs] == [False, True, False, True]


def test_run_check_writes_json_and_table(tmp_path, monkeypatch):
    import methods

    monkeypatch.setattr(methods, "available_methods", lambda: ["test-mean-diff"])
    report = gpu_check.run_check(gpu_check.TINY, tmp_path, sections=["infer"],
                                 log=lambda line: None)
    saved = json.loads((tmp_path / gpu_check.JSON_FILE).read_text())
    assert saved["schema"] == gpu_check.SCHEMA and saved["mode"] == "tiny"
    assert [r["method"] for r in saved["sections"]["infer"]["rows"]] == ["test-mean-diff"]
    assert gpu_check.failures(report) == []
    table = gpu_check.render(report)
    assert "| test-mean-diff | ok |" in table and "nothing: every item ran" in table


@pytest.mark.parametrize("args, message", [
    (["--sections", "train,warp"], "choose from"),
    (["--budget-scale", "nan"], "must be in (0, 10]"),
    (["--tiny", "--device", "cuda"], "no CUDA GPU is visible"),
    (["--tiny", "--threads", "0"], "must be at least 1"),
    (["--tiny", "--sections", "infer", "--out", "FILE"], "is a file"),
])
def test_gpu_check_cli_errors(args, message, capsys, tmp_path):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / a) if a == "FILE" else a for a in args]
    assert gpu_check.main([*args, "--out", str(tmp_path)] if "--out" not in args else args) == 2
    assert message in capsys.readouterr().err


def test_every_registered_method_fits_and_predicts_at_the_tiny_check_size(tmp_path):
    # What `.ci/run` runs through gpu_check.sh --tiny: each method's smoke_overrides must make
    # it fit the tiny plan's few images.
    from methods import available_methods, get_method_class

    # The harness's own methods (this process also holds the tests' toy ones, one of which
    # kills its process on purpose).
    names = [n for n in available_methods()
             if get_method_class(n).__module__.startswith("methods.")]
    assert {"rd", "cdd", "softpatch", "recontrast", "urd", "inreach", "funad"} <= set(names)
    section = gpu_check.Section("infer", 300.0, time.perf_counter() + 300)
    result = gpu_check.infer_section(section, gpu_check.TINY, tmp_path, torch.device("cpu"),
                                     names=names)
    assert {row["method"]: row["status"] for row in result["rows"]} == dict.fromkeys(names, "ok")
