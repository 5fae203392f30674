"""End to end: `tailfuse run` on small real subsets (ISIC2018-LT multi-class, COVID CXR multi-label) with TAESD, and
the demo's dataset."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tailfuse.cli import main
from tailfuse.demo import DEMO_HEAD_CAP, DEMO_TAIL, GRADES, elpv_manifest
from tailfuse.store import RunStore

from conftest import subset_manifest

PER_CLASS = 6


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["isic", "covid"])
def test_run_end_to_end_on_a_real_subset(tmp_path, dataset, isic_dir, covid_dir, taesd_path, capsys):
    src = isic_dir if dataset == "isic" else covid_dir
    manifest = subset_manifest(src, tmp_path / "in" / "m.csv", per_label=8, splits=("train", "val"))
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({"train": {"generations": 2, "epochs": 1, "imitation_epochs": 1},
                                    "fuse": {"per_class": PER_CLASS}}))
    run = tmp_path / "run"
    argv = ["run", "--data", str(manifest), "--vae", str(taesd_path), "--run", str(run), "--config", str(conf), "--quiet"]
    assert main(argv) == 0
    assert "done: images in" in capsys.readouterr().out

    store = RunStore(run)
    info = store.labels()
    labels, tail, multi = info["labels"], info["tail_labels"], info["multi_label"]
    assert multi == (dataset == "covid") and tail
    samples = store.samples().set_index("sample_id")
    syn = run / "synthetic"
    man = pd.read_csv(syn / "manifest.csv")
    # the input's layout: its path column, split 'synthetic', one 0/1 column per label
    assert list(man.columns) == ["path", "split", *labels] and (man["split"] == "synthetic").all()
    assert man[labels].isin([0, 1]).all().all()
    prov = [json.loads(x) for x in (syn / "provenance.jsonl").read_text().splitlines()]
    assert len(prov) == len(man) == PER_CLASS * len(tail)
    assert pd.Series([p["tail_label"] for p in prov]).value_counts().to_dict() == {lab: PER_CLASS for lab in tail}
    digests = set()
    for p, (_, row) in zip(prov, man.iterrows()):
        img = Image.open(syn / row["path"])
        assert img.format == "PNG" and img.size == (128, 128) and img.mode == "RGB"
        digests.add(np.asarray(img).tobytes())
        t, h = samples.loc[p["tail_sample_id"]], samples.loc[p["head_sample_id"]]
        assert t["split"] == h["split"] == "train"
        assert t[p["tail_label"]] == 1 and not any(h[lab] == 1 for lab in tail)  # head pool: no tail label
        y_t, y_h = t[labels].to_numpy(int), h[labels].to_numpy(int)
        expect = np.maximum(y_t, y_h) if multi else (np.array(labels) == p["tail_label"]).astype(int)
        assert (row[labels].to_numpy(int) == expect).all()  # union policy (multi-label), tail label (multi-class)
        assert 0 < p["tail_share"] < 1 and p["detail"] == "residual"
    assert len(digests) == len(man)  # no two synthetic images identical

    resolved = yaml.safe_load((run / "run.yaml").read_text())
    assert {"data", "vae", "encode", "train"} <= set(resolved) and resolved["train"]["generations"] == 2
    # a second call finds every stage done and rewrites nothing
    before = {p: p.stat().st_mtime_ns for p in syn.rglob("*") if p.is_file()}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in syn.rglob("*") if p.is_file()} == before
    out = capsys.readouterr().out
    assert "done: images in" in out


def test_demo_manifest_keeps_every_tail_image_and_caps_the_head(tmp_path):
    csv = elpv_manifest(tmp_path / "m.csv")
    m = pd.read_csv(csv)
    grades = list(GRADES.values())
    assert (m[grades].sum(axis=1) == 1).all()  # one grade per cell: multi-class
    counts = m[grades].sum().to_dict()
    full = pd.read_csv(elpv_manifest(tmp_path / "all.csv", head_cap=None))
    for g in grades:
        if g in DEMO_TAIL:
            assert counts[g] == full[g].sum() > 0
        else:
            assert counts[g] == min(DEMO_HEAD_CAP, full[g].sum())
    assert len(full) == 2624
    assert all(Image.open(p).size == (300, 300) for p in m["path"].head(5))
