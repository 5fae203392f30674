"""End to end: `tailfuse run` on small real subsets (ISIC2018-LT multi-class, COVID CXR multi-label) with TAESD, and
the demo's dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
                                    "fuse": {"per_class": PER_CLASS, "soft_labels": True}}))  # off by default
    run = tmp_path / "run"
    argv = ["run", "--data", str(manifest), "--vae", str(taesd_path), "--run", str(run), "--config", str(conf), "--quiet"]
    assert main(argv) == 0
    assert "done: images in" in capsys.readouterr().out

    store = RunStore(run)
    info = store.labels()
    labels, tail, multi = info["labels"], info["tail_labels"], info["multi_label"]
    assert multi == (dataset == "covid") and tail
    assert info["greyscale"] == (dataset == "covid")  # chest X-rays are grey: written back grey
    samples = store.samples().set_index("sample_id")
    syn = run / "synthetic"
    man = pd.read_csv(syn / "manifest.csv")
    # the input's layout: its path column, split 'synthetic', one 0/1 column per label, then the soft targets (asked
    # for in run.yaml above): multi-class, a unit of label mass split between the tail label and the head image's label
    soft = [f"soft_{lab}" for lab in labels]
    # and the input's other columns (ISIC: isic_id; COVID: patient_id, view, license), valued as the tail source
    meta = [c for c in pd.read_csv(manifest).columns if c not in ("path", "split", *labels)]
    assert meta and list(man.columns) == ["path", "split", *labels, *meta, *soft] and (man["split"] == "synthetic").all()
    assert man[labels].isin([0, 1]).all().all() and ((man[soft] >= 0) & (man[soft] <= 1)).all().all()
    if not multi:
        assert np.allclose(man[soft].sum(axis=1), 1.0)
    prov = [json.loads(x) for x in (syn / "provenance.jsonl").read_text().splitlines()]
    assert len(prov) == len(man) == PER_CLASS * len(tail)
    assert pd.Series([p["tail_label"] for p in prov]).value_counts().to_dict() == {lab: PER_CLASS for lab in tail}
    digests = set()
    for p, (_, row) in zip(prov, man.iterrows()):
        img = Image.open(syn / row["path"])
        assert img.format == "PNG" and img.size == (128, 128) and img.mode == ("L" if info["greyscale"] else "RGB")
        digests.add(np.asarray(img).tobytes())
        t, h = samples.loc[p["tail_sample_id"]], samples.loc[p["head_sample_id"]]
        assert t["split"] == h["split"] == "train"
        assert t[p["tail_label"]] == 1 and not any(h[lab] == 1 for lab in tail)  # head pool: no tail label
        y_t, y_h = t[labels].to_numpy(int), h[labels].to_numpy(int)
        expect = np.maximum(y_t, y_h) if multi else (np.array(labels) == p["tail_label"]).astype(int)
        assert (row[labels].to_numpy(int) == expect).all()  # union policy (multi-label), tail label (multi-class)
        assert 0 < p["tail_share"] < 1 and p["detail"] == "residual"
        assert [str(row[c]) for c in meta] == [str(t[c]) for c in meta]  # e.g. the tail source's patient and view
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


def _tiny_run_project(tmp_path, n_images: int, generations: int, epochs: int) -> tuple[dict, list[str], list[str]]:
    """A tiny AutoencoderTiny, a coloured 3-label manifest of ``n_images`` and a run.yaml of small models, for
    `tailfuse run` in subprocesses: returns their environment (one thread, this checkout's src), the launcher
    (`python -m tailfuse`, where `--processes N` goes) and the command's arguments without `--run`."""
    import os
    import sys

    from tiny import coloured_manifest, tiny_autoencoder_tiny

    tiny_autoencoder_tiny(tmp_path / "vae")
    coloured_manifest(tmp_path, n_images, 48, seed=0)
    (tmp_path / "run.yaml").write_text(
        f"train: {{generations: {generations}, epochs: {epochs}, k: 8, dim: 4, tau: 0.3, width_e: 8, blocks_e: 1, "
        "width_d: 8, blocks_d: 1, width_c: 8, batch_size: 16}\nencode: {batch_size: 8, shard_size: 16}\n"
        "fuse: {per_class: 20, shard_size: 8, batch_size: 4}\ndecode: {shard_size: 8}\n"
        "data: {image_size: 64, tail_labels: [t]}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return env, [sys.executable, "-m", "tailfuse"], ["run", "--data", str(tmp_path / "in" / "m.csv"), "--vae",
                                                     str(tmp_path / "vae"), "--config", str(tmp_path / "run.yaml"),
                                                     "--quiet"]


def test_two_processes_write_the_same_bytes_as_one(tmp_path):
    """`tailfuse --processes 2 run` (torch.distributed.run, gloo on CPUs; each process takes every other shard) writes
    byte-identical latents, images, manifest and provenance to one process (one thread per process in both)."""
    import hashlib
    import subprocess

    env, base, args = _tiny_run_project(tmp_path, 60, generations=1, epochs=1)
    for run, extra in (("one", []), ("two", ["--processes", "2"])):
        r = subprocess.run([*base, *extra, *args, "--run", str(tmp_path / run)], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]

    def digest(root):  # what the stages wrote (records and logs carry times and process ids; they are left out)
        files = [*root.glob("latents/*"), root / "samples.csv", root / "labels.json", *root.glob("train/gen-*/*"),
                 *root.glob("saliency/*/*"), *root.rglob("synthetic/**/*")]
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files) if p.is_file()}

    one, two = digest(tmp_path / "one"), digest(tmp_path / "two")
    assert one.keys() == two.keys() and len([k for k in one if k.startswith("synthetic/images/")]) == 20
    assert [k for k in one if one[k] != two[k]] == []
    rec = RunStore(tmp_path / "two").stage("fuse-synthetic")
    assert rec["status"] == "done" and sorted(rec["shards"]) == ["0", "1", "2"]  # shards from both processes


def test_the_main_process_progress_bar_ends_at_the_total_with_uneven_shares():
    """With N processes the main process's bar moves N steps for each of its own items; 25 shards of 8 over 2
    processes give the main process 13 of them, and its bar must end at 200 of 200, not 208."""
    import io

    from tqdm import tqdm

    from tailfuse.dist import Dist

    out = io.StringIO()
    bar = tqdm(total=200, file=out, mininterval=0)
    seen = []
    for shard in range(25):
        if Dist(rank=0, world=2).owns(shard):
            Dist(rank=0, world=2).advance(bar, 8)
            seen.append(bar.n)
    bar.close()
    assert seen == sorted(seen) and seen[-1] == 200 and len(seen) == 13
    counts = [int(n) for n in re.findall(r"(\d+)/200\b", out.getvalue())]  # the bar's counter, not its speed
    assert counts and counts[-1] == 200 and max(counts) == 200


def test_a_stop_of_the_multi_process_launcher_stops_every_process_and_the_run_resumes(tmp_path):
    """`kill` (SIGTERM) of the `tailfuse --processes 2` process alone reaches torchrun and both workers: all of them
    end, the launcher returns 130 as one process does, no process of the tree outlives it (they would hold the run's
    lock and go on writing), and the same command then finishes the run."""
    import signal
    import subprocess
    import time

    import psutil

    env, base, args = _tiny_run_project(tmp_path, 200, generations=3, epochs=40)
    cmd = [*base, "--processes", "2", *args, "--run", str(tmp_path / "r")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((tmp_path / "r" / "train").glob("gen-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # stop it while the workers train (the encode stage has finished by then)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) >= 4  # the launcher, torchrun and two workers
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err, err[-3000:]
    time.sleep(1)
    assert [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert not (tmp_path / "r" / "synthetic" / "manifest.csv").exists()  # it was stopped before the end
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "r" / "synthetic" / "manifest.csv")) == 20


def test_data_parallel_training_matches_one_process(tmp_path):
    """`tailfuse --processes 2 train --ddp`: both processes train on halves of every batch with averaged gradients;
    the model's figures equal single-process training up to floating-point order."""
    import os
    import subprocess
    import sys

    from tiny import coloured_manifest, tiny_autoencoder_tiny

    tiny_autoencoder_tiny(tmp_path / "vae")
    coloured_manifest(tmp_path, 48, 40, seed=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    base = [sys.executable, "-m", "tailfuse"]
    enc = ["encode", "--data", str(tmp_path / "in" / "m.csv"), "--vae", str(tmp_path / "vae"), "--image-size", "64",
           "--tail-labels", "t", "--quiet"]
    train = ["train", "--generations", "2", "--epochs", "2", "--imitation-epochs", "1", "--k", "8", "--dim", "4",
             "--tau", "0.3", "--batch-size", "16", "--quiet"]
    for run, extra in (("one", []), ("two", ["--processes", "2"])):
        subprocess.run([*base, *enc, "--run", str(tmp_path / run)], env=env, check=True, capture_output=True)
        r = subprocess.run([*base, *extra, *train, "--ddp", "--run", str(tmp_path / run)], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / r / "train" / "metrics.jsonl").read_text().splitlines()[-1]) for r in ("one", "two"))
    assert two["generation"] == one["generation"] == 1
    for k in ("recon_rel_l1", "recon_rel_l1_hard", "sparsity"):
        assert abs(one[k] - two[k]) < 0.05 * abs(one[k]), (k, one[k], two[k])
    assert RunStore(tmp_path / "two").stage("train")["status"] == "done"
