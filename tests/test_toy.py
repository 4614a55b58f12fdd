"""The appendix A.2 toy experiment (data roots, figure, table) and Fig. A1's t-SNE."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from bench.errors import UserError
from bench.report import render_report
from bench.toy import TOY_FILE, build_toy_root
from datasets import generate_synthetic, load_category


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, size=64, n_train=12, n_test_good=4, n_test_anomalous=8,
                       categories=["nut"])
    return root


def _train_names(root, category):
    return sorted(p.name for p in (root / category / "train" / "good").iterdir())


def test_toy_root_holds_the_paper_split(source, tmp_path):
    out = build_toy_root("synthetic", source, tmp_path / "toy", ["nut"], normals=10,
                         anomalous=4, seed=0)
    toy = json.loads((out / TOY_FILE).read_text())
    info = toy["categories"]["nut"]
    assert info["all"] == "nut-toy" and info["domains"] == ["nut-toy-d1", "nut-toy-d2"]
    everything = _train_names(out, "nut-toy")
    d1, d2 = _train_names(out, "nut-toy-d1"), _train_names(out, "nut-toy-d2")
    assert len(everything) == 14 and len(info["train_normal"]) == 10
    normal = {n for n in everything if n.startswith("normal-")}
    shared = {f"normal-{Path(k).name}" for k in info["shared_normal"]}
    assert len(shared) == 5 and shared <= set(d1) & set(d2)
    # The other normals split evenly, each in one domain; together the 44 (here 14) images.
    assert (set(d1) | set(d2)) == set(everything)
    assert len(normal & set(d1) - shared) + len(normal & set(d2) - shared) == 5
    anomalous = info["train_anomalous"]
    assert [a["domain"] for a in anomalous].count(0) == 2 == [a["domain"] for a in
                                                             anomalous].count(1)
    # Paired: each domain holds one image of each of the two defect types.
    types = [sorted(a["defect"] for a in anomalous if a["domain"] == d) for d in (0, 1)]
    assert types[0] == types[1] and len(set(types[0])) == 2
    for d, names in ((0, d1), (1, d2)):
        mine = {f"anomalous-{a['defect']}-{Path(a['test_path']).name}" for a in anomalous
                if a["domain"] == d}
        assert mine == {n for n in names if n.startswith("anomalous-")}
    # Every toy category is a loadable MVTec-layout category with the whole test set.
    for name in ("nut-toy", "nut-toy-d1"):
        data = load_category("mvtec", out, name)
        assert len(data.test) == 12 and len(data.test_anomalous) == 8
        assert all(s.mask_path is not None for s in data.test_anomalous)
    # Seeded: the same call gives the same sets, another seed others.
    again = json.loads((build_toy_root("synthetic", source, tmp_path / "again", ["nut"],
                                       normals=10, anomalous=4, seed=0) / TOY_FILE).read_text())
    assert again["categories"] == toy["categories"]
    other = json.loads((build_toy_root("synthetic", source, tmp_path / "other", ["nut"],
                                       normals=10, anomalous=4, seed=1) / TOY_FILE).read_text())
    assert other["categories"]["nut"]["train_normal"] != info["train_normal"]


def test_toy_root_refuses_impossible_requests(source, tmp_path):
    for kwargs, match in (({"normals": 50}, "fewer than --normals"),
                          ({"anomalous": 3}, "must be even"),
                          ({"anomalous": 8}, "paired selection needs 4 defect types"),
                          ({"selection": "best"}, "unknown"), ({"shared": 1.0}, "share"),
                          ({"seed": -1}, "non-negative")):
        with pytest.raises(UserError, match=match):
            build_toy_root("synthetic", source, tmp_path / "x", ["nut"],
                           **{"normals": 10, **kwargs})
    with pytest.raises(UserError, match="data root itself"):
        build_toy_root("synthetic", source, source, ["nut"], normals=10)
    random = build_toy_root("synthetic", source, tmp_path / "r", ["nut"], normals=10,
                            anomalous=6, selection="random")
    assert len(json.loads((random / TOY_FILE).read_text())["categories"]["nut"][
        "train_anomalous"]) == 6


def _record(results, category, data_root, *, image_size=64, scores=None, method="rd"):
    spec = {"method": method, "config": {}, "dataset": "mvtec", "category": category,
            "noise_ratio": 0.0, "split_seed": 0, "train_seed": 0, "image_size": image_size,
            "resize_size": 73, "teacher_weights": "random", "data_root": str(data_root)}
    fp = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    metrics = {"i_auroc": 0.8, "p_auroc": 0.8, "pro_rd4ad": 0.7, "aupro": 0.6, "i_ap": None,
               "p_ap": None, "i_f1max": None}
    record = {"schema_version": 1, "fingerprint": fp, "status": "ok", "error": None,
              "spec": spec, "resolved_config": {"epochs": 2, "backbone": "resnet18"},
              "metrics": {"no_overlap": metrics, "overlap": metrics, "train": {}},
              "environment": {"device": "cpu"}, "provenance": {}, "history": {},
              "diagnostics": {}, "timings": {"infer_images_per_s": 5.0}}
    folder = Path(results) / "runs" / fp
    folder.mkdir(parents=True)
    (folder / "record.json").write_text(json.dumps(record))
    if scores is not None:
        np.savez(folder / "scores.npz", **scores)


def _fake_scores(root, category, rng):
    from datasets import Preprocess, load_images, load_masks

    data = load_category("mvtec", root, category)
    pre = Preprocess(resize=32, crop=32)
    masks = load_masks(data.test, pre)
    images = load_images(data.test, pre).numpy().transpose(0, 2, 3, 1)
    labels = np.array([s.label for s in data.test], np.uint8)
    maps = (rng.random(masks.shape) + masks).astype(np.float16)
    return {"test_keys": np.array([s.key for s in data.test]),
            "test_scores": maps.reshape(len(labels), -1).max(1).astype(np.float32),
            "test_labels": labels, "in_no_overlap": np.ones(len(labels), bool),
            "test_maps": maps, "test_masks": masks, "test_images": images}


def test_toy_figure_and_table_from_the_runs(source, tmp_path):
    toy = build_toy_root("synthetic", source, tmp_path / "toy", ["nut"], normals=10)
    rng = np.random.default_rng(0)
    res = tmp_path / "res"
    for category in ("nut-toy", "nut-toy-d1", "nut-toy-d2"):
        _record(res, category, toy, scores=_fake_scores(toy, category, rng))
    out = render_report(res, tmp_path / "out", bootstrap=20, figures=False)
    stem = "toy_mvtec_noise0_px64_random-0_nut"
    table = (tmp_path / "out" / "tables" / f"{stem}.md").read_text()
    for role in ("in training", "in domain", "out of domain", "held out"):
        assert f"| {role} |" in table
    assert "(a) RD, all 44" in table and "(b) RD, domain 2 student" in table
    assert f"tables/{stem}.md" in out.read_text()
    # The figure (drawn alone: a whole report's figures take long on a busy CPU).
    from bench.figures import load_scores
    from bench.report import load_runs
    from bench.toy import toy_figure, toy_groups

    notes = []
    (group,) = toy_groups(load_runs(res), notes)
    entries = toy_figure(group, tmp_path / "figs", notes,
                         lambda run: load_scores(res / "runs" / run.fingerprint / "scores.npz"))
    assert [e[1].name for e in entries] == [stem] and not notes
    assert (tmp_path / "figs" / f"{stem}.png").stat().st_size > 5000
    assert (tmp_path / "figs" / f"{stem}.pdf").is_file()
    # Without its toy.json the runs draw no toy figure and say why.
    (toy / TOY_FILE).unlink()
    index = render_report(res, tmp_path / "out2", bootstrap=0, figures=False).read_text()
    assert "no readable toy.json" in index and "tables/toy_" not in index


def test_tsne_of_teacher_features(source, tmp_path):
    from bench.figures import teacher_tsne
    from bench.report import load_runs

    res = tmp_path / "res"
    _record(res, "nut", source)
    rec = next((res / "runs").iterdir()) / "record.json"
    record = json.loads(rec.read_text())
    record["spec"]["dataset"] = "synthetic"
    rec.write_text(json.dumps(record))
    runs = load_runs(res)
    notes = []
    entries = teacher_tsne(runs, tmp_path / "figs", notes, points=60)
    stem = "tsne_synthetic_noise0_px64_random-0_nut"
    assert [e[1].name for e in entries] == [stem] and not notes
    assert (tmp_path / "figs" / f"{stem}.png").stat().st_size > 5000
    # A data root that is not there, or a category without runs: a note, not a failure.
    assert teacher_tsne(runs, tmp_path / "figs", notes, data_root=str(tmp_path / "nowhere"),
                        points=60) == []
    assert teacher_tsne(runs, tmp_path / "figs", notes, categories=["screw"]) == []
    assert "nut: not drawn" in notes[0] and "category screw" in notes[1]
    # A rendering without --tsne keeps and lists the figures an earlier one drew.
    figures = tmp_path / "out" / "figures"
    figures.mkdir(parents=True)
    for ext in ("png", "pdf"):
        (figures / f"{stem}.{ext}").write_bytes((tmp_path / "figs" / f"{stem}.{ext}")
                                                .read_bytes())
    index = render_report(res, tmp_path / "out", bootstrap=0).read_text()
    assert (figures / f"{stem}.png").is_file()
    assert f"figures/{stem}.png" in index and "from an earlier rendering" in index


def test_roles_of_the_toy_maps():
    from bench.toy import _Column, _role

    all44, student1 = _Column("a", None, None, {}), _Column("b", None, 0, {})
    assert _role(0, all44) == "in training" and _role(None, all44) == "held out"
    assert _role(0, student1) == "in domain" and _role(1, student1) == "out of domain"
    assert _role(None, student1) == "held out"
