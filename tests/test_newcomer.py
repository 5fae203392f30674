"""What a newcomer tripped over (issue 14): a label column of class names, the demo's pairs within cell type and
greyscale output, validation before work, hints that are commands, `tailfuse info` on any folder, nothing written
outside the run folder, progress labels, the resolution note."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import subset_manifest
from tailfuse.cli import build_parser, main
from tailfuse.config import DataConfig
from tailfuse.data import load_dataset
from tailfuse.errors import TailfuseError
from tailfuse.stage import redo_command
from tailfuse.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
ISIC_LABELS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def _names_manifest(isic_dir: Path, out: Path, per_label: int = 4) -> Path:
    """The ISIC subset in the most common layout: one column 'diagnosis' of class names, no 0/1 columns."""
    m = pd.read_csv(subset_manifest(isic_dir, out.parent / "onehot.csv", per_label=per_label))
    m["diagnosis"] = [ISIC_LABELS[int(np.argmax(r))] for r in m[ISIC_LABELS].to_numpy()]
    m.drop(columns=ISIC_LABELS).to_csv(out, index=False)
    return out


def test_label_column_rules(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    rows = [{"path": f"{i}.png", "finding": f, "site": s} for i, (f, s) in
            enumerate([("A", "x"), ("B", "y"), ("A|C", "x"), ("C", "y")] * 3)]
    csv = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    ds = load_dataset(DataConfig(data=str(csv), label_column="finding"))
    assert ds.labels == ["A", "B", "C"] and ds.multi_label and ds.label_column == "finding"
    assert ds.table.loc[ds.table["path"] == "2.png", ["A", "B", "C"]].to_numpy().tolist() == [[1, 0, 1]]
    assert "finding" in ds.metadata_columns and "site" in ds.metadata_columns
    with pytest.raises(TailfuseError, match="could hold class names .*finding, site"):
        load_dataset(DataConfig(data=str(csv)))  # two candidate columns: the user must choose
    with pytest.raises(TailfuseError, match="not both"):
        load_dataset(DataConfig(data=str(csv), label_column="finding", labels=["A"]))
    rows[3]["finding"] = " "
    pd.DataFrame(rows).to_csv(csv, index=False)
    with pytest.raises(TailfuseError, match=r"'finding' is empty at line\(s\) 5"):
        load_dataset(DataConfig(data=str(csv), label_column="finding"))


@pytest.mark.shared
@pytest.mark.slow
def test_a_run_on_class_names_with_hints_info_and_nothing_outside_the_run(tmp_path, isic_dir, taesd_path):
    manifest = _names_manifest(isic_dir, tmp_path / "in" / "names.csv")
    home = tmp_path / "home"
    home.mkdir()
    run = tmp_path / "run"
    conf = tmp_path / "run.yaml"
    conf.write_text("train: {generations: 2, epochs: 1, imitation_epochs: 1, k: 16}\nfuse: {per_class: 3}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MPL"))}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    # no --labels, no --label-column: the one column of class names is found
    r = subprocess.run([sys.executable, "-m", "tailfuse", "run", "--data", str(manifest), "--vae", str(taesd_path),
                        "--run", str(run), "--config", str(conf)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "class names in column 'diagnosis'" in r.stderr
    assert "train (generation 2/2, interaction)" in r.stderr and "train train" not in r.stderr  # progress labels
    assert not list(home.rglob("*"))  # matplotlib (via pytorch-grad-cam) kept its cache inside the run folder
    assert (run / ".cache" / "matplotlib").is_dir()
    lab = RunStore(run).labels()
    assert lab["labels"] == sorted(ISIC_LABELS) and lab["label_column"] == "diagnosis" and not lab["multi_label"]
    man = pd.read_csv(run / "synthetic" / "manifest.csv")
    assert "diagnosis" in man.columns and len(man) == 3 * len(lab["tail_labels"])
    for _, row in man.iterrows():  # the names column agrees with the 0/1 columns
        assert row["diagnosis"] == "|".join(x for x in lab["labels"] if row[x] == 1)
    assert set(man["diagnosis"]) == set(lab["tail_labels"])
    # info: pipeline order, how many synthetic images and where
    r = subprocess.run([sys.executable, "-m", "tailfuse", "info", "--run", str(run)], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0 and f"synthetic set 'synthetic': {len(man)} images, manifest {run / 'synthetic'}" in r.stdout
    stages = [ln.split(":")[0].strip() for ln in r.stdout.split("stages:")[1].splitlines() if ln.strip()]
    assert stages.index("encode") < stages.index("train") < stages.index("fuse-synthetic") < stages.index("decode-synthetic")
    # every redo hint the stages print is a command the parser accepts, with --run
    parser = build_parser()
    for name in RunStore(run).stages():
        hint = redo_command(RunStore(run), name.split("/")[0]).replace("...", str(manifest))
        assert hint.startswith("tailfuse ") and f"--run {run}" in hint, hint
        parser.parse_args(hint.split()[1:])  # SystemExit on an unknown argument


def test_info_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    assert main(["info", "--run", str(tmp_path / "photos")]) != 0
    assert "is not a tailfuse run folder" in capsys.readouterr().err


@pytest.mark.shared
def test_every_setting_is_checked_before_any_work(tmp_path, isic_dir, taesd_path, capsys):
    manifest = subset_manifest(isic_dir, tmp_path / "in" / "m.csv", per_label=2)
    for args, msg in ((["--vae", str(tmp_path / "no-vae")], "does not exist"),
                      (["--vae", str(taesd_path), "--per-class", "-3"], "--per-class -3"),
                      (["--vae", str(taesd_path), "--image-size", "0"], "positive multiple of 8")):
        assert main(["run", "--data", str(manifest), "--run", str(tmp_path / "r"), *args]) != 0
        err = capsys.readouterr().err
        assert msg in err and "head:" not in err  # failed before the data was even summarised
        assert not (tmp_path / "r").exists()
    for cmd in ("train", "fuse", "decode"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "created if needed" not in capsys.readouterr().out


@pytest.mark.shared
@pytest.mark.slow
def test_the_demo_pairs_within_cell_type_writes_grey_and_owns_its_images(tmp_path, taesd_path, caplog):
    from tailfuse.demo import DEMO_TAIL, demo_configs, elpv_manifest
    from tailfuse.pipeline import run_all

    run = tmp_path / "demo"
    manifest = elpv_manifest(run / "demo-data" / "manifest.csv", copy=True, per_grade=24)
    m = pd.read_csv(manifest)
    assert all(p.startswith("images/") and (manifest.parent / p).is_file() for p in m["path"])  # no venv paths
    cfg = demo_configs(manifest, str(taesd_path), "cpu")
    cfg["train"].generations, cfg["train"].epochs, cfg["train"].imitation_epochs = 1, 1, 1
    cfg["fuse"].per_class = 8
    with caplog.at_level(logging.INFO, logger="tailfuse"):
        out = run_all(str(run), **cfg, progress=False)
    assert "the input images are 300 px" in caplog.text  # ELPV is 300 px, brought to 128
    assert out["decode"]["n_images"] == 8 * len(DEMO_TAIL)
    samples = RunStore(run).samples().set_index("sample_id")
    prov = [json.loads(x) for x in (run / "synthetic" / "provenance.jsonl").read_text().splitlines()]
    hybrids = sum(samples.loc[p["tail_sample_id"], "cell_type"] != samples.loc[p["head_sample_id"], "cell_type"]
                  for p in prov)
    assert hybrids == 0 and {samples.loc[p["tail_sample_id"], "cell_type"] for p in prov} == {"mono", "poly"}
    assert RunStore(run).labels()["greyscale"] is True
    man = pd.read_csv(run / "synthetic" / "manifest.csv")
    assert all(Image.open(run / "synthetic" / p).mode == "L" for p in man["path"])  # grey in, grey out
