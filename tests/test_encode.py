import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import subset_manifest
from tailfuse.cli import main
from tailfuse.config import DataConfig, EncodeConfig, VAEConfig
from tailfuse.encode import run_encode
from tailfuse.errors import TailfuseError
from tailfuse.info import run_info
from tailfuse.store import RunStore
from tiny import tiny_autoencoder_tiny


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return str(tiny_autoencoder_tiny(tmp_path_factory.mktemp("vae")))


def _make_input(root: Path, n: int = 24, bad: bool = True) -> Path:
    """A small input folder: n random PNGs in a manifest, plus broken files when ``bad``."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "split": ["train", "train", "val", "test"][i % 4], "a": int(i % 3 == 0), "b": int(i % 3 != 0)})
    if bad:
        (root / "img" / "zero.png").write_bytes(b"")
        (root / "img" / "text.png").write_text("hello")
        data = (root / "img" / "0.png").read_bytes()
        (root / "img" / "trunc.png").write_bytes(data[: len(data) // 2])
        for name in ("zero.png", "text.png", "trunc.png", "missing.png"):
            rows.append({"path": f"img/{name}", "split": "train", "a": 0, "b": 1})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def _snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _encode(manifest, vae, run, **kw):
    data_kw = {k: kw.pop(k) for k in list(kw) if k in DataConfig.__dataclass_fields__}
    enc_kw = {k: kw.pop(k) for k in list(kw) if k in EncodeConfig.__dataclass_fields__}
    return run_encode(
        DataConfig(data=str(manifest), image_size=32, **data_kw),
        VAEConfig(vae=vae),
        EncodeConfig(**{"batch_size": 4, "shard_size": 8, **enc_kw}),
        str(run),
        progress=False,
        **kw,
    )


def test_unreadable_images_skipped_and_reported_input_untouched(tmp_path, tiny_vae):
    manifest = _make_input(tmp_path / "in")
    before = _snapshot(tmp_path / "in")
    # read-only input: any attempt to write there would fail
    for p in (tmp_path / "in").rglob("*"):
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    (tmp_path / "in").chmod(0o555)
    try:
        rec = _encode(manifest, tiny_vae, tmp_path / "run")
    finally:
        (tmp_path / "in").chmod(0o755)
    assert _snapshot(tmp_path / "in") == before
    assert rec["status"] == "done" and rec["n_encoded"] == 24 and rec["n_skipped"] == 4
    skipped = pd.read_csv(tmp_path / "run" / "skipped.csv")
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    assert reasons["img/zero.png"] == "zero-byte file"
    assert reasons["img/missing.png"] == "file not found"
    assert "not a readable image" in reasons["img/text.png"]
    assert "truncated" in reasons["img/trunc.png"]
    assert list(skipped["line"]) == sorted(skipped["line"]) and min(skipped["line"]) == 26
    store = RunStore(tmp_path / "run")
    samples = store.samples()
    assert len(samples) == 24 and not samples["path"].isin(reasons).any()
    ids, lat = store.latents().load_all()
    assert lat.shape == (24, 4, 4, 4) and sorted(ids.tolist()) == samples["sample_id"].tolist()
    info = run_info(str(tmp_path / "run"))
    assert info["samples"] == 24 and info["latent_shape"] == [4, 4, 4] and info["skipped"] == 4
    assert info["stages"]["encode"]["status"] == "done"


def test_strict_makes_unreadable_images_fatal_and_keeps_finished_shards(tmp_path, tiny_vae):
    manifest = _make_input(tmp_path / "in")
    with pytest.raises(TailfuseError, match=r"zero-byte file.*drop --strict"):
        _encode(manifest, tiny_vae, tmp_path / "run", strict=True)
    # pre-scan catches missing and zero-byte files before any work; remove those rows and the truncated one
    m = pd.read_csv(manifest)
    m = m[~m["path"].isin(["img/zero.png", "img/missing.png"])]
    m.to_csv(manifest, index=False)
    with pytest.raises(TailfuseError, match=r"line 26: img/text.png: not a readable image"):
        _encode(manifest, tiny_vae, tmp_path / "run", strict=True)
    rec = RunStore(tmp_path / "run").stage("encode")
    markers = list((tmp_path / "run" / "stages" / "encode.shards").glob("*.json"))
    assert rec["status"] == "running" and len(markers) == 3  # 24 good rows = 3 finished shards kept


def test_run_folder_inside_input_refused(tmp_path, tiny_vae):
    manifest = _make_input(tmp_path / "in", bad=False)  # images in in/img/
    for run in (tmp_path / "in" / "img" / "run", tmp_path / "in"):  # among the images; the manifest's own folder
        with pytest.raises(TailfuseError, match="never writes into its input"):
            _encode(manifest, tiny_vae, run)
    assert _encode(manifest, tiny_vae, tmp_path / "in" / "runs" / "x")["status"] == "done"  # beside them: fine


def test_rerun_skips_done_stage_and_refuses_other_settings(tmp_path, tiny_vae):
    manifest = _make_input(tmp_path / "in", bad=False)
    rec1 = _encode(manifest, tiny_vae, tmp_path / "run")
    mtimes = _snapshot(tmp_path / "run" / "latents")
    rec2 = _encode(manifest, tiny_vae, tmp_path / "run")
    assert rec2["finished_at"] == rec1["finished_at"] and _snapshot(tmp_path / "run" / "latents") == mtimes
    with pytest.raises(TailfuseError, match="other settings.*--force"):
        _encode(manifest, tiny_vae, tmp_path / "run", shard_size=5)
    rec3 = _encode(manifest, tiny_vae, tmp_path / "run", shard_size=5, force=True)
    assert rec3["n_shards"] == 5 and len(list((tmp_path / "run" / "latents").iterdir())) == 5


def test_cli_prints_clear_errors(tmp_path, capsys, tiny_vae):
    bad = tmp_path / "in" / "bad.csv"
    bad.parent.mkdir()
    bad.write_text("file,a\nx.png,1\n")
    rc = main(["encode", "--data", str(bad), "--vae", tiny_vae, "--run", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no path column 'path'" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # an early failure leaves no run folder behind
    rc = main(["info", "--run", str(tmp_path / "nowhere")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_shards_stream_without_loading_everything(tmp_path, tiny_vae):
    manifest = _make_input(tmp_path / "in", n=40, bad=False)
    _encode(manifest, tiny_vae, tmp_path / "run", shard_size=8)
    shards = RunStore(tmp_path / "run").latents()
    shards._cache_shards = 1
    seen = []
    for ids, z in shards.iter_batches(batch_size=3):
        assert len(shards._cache) <= 1 and z.shape[1:] == (4, 4, 4)
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(40))
    _, all_lat = shards.load_all()
    torch.testing.assert_close(shards.get([33, 2, 17]), all_lat[[33, 2, 17]])
    sub = [i for batch_ids, _ in shards.iter_batches(batch_size=100, ids=np.array([5, 39, 12])) for i in batch_ids]
    assert sorted(sub) == [5, 12, 39]


# ---- real data, real TAESD -------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.slow
def test_kill_and_resume_gives_identical_latents(tmp_path, isic_dir, taesd_path):
    manifest = subset_manifest(isic_dir, tmp_path / "in" / "isic.csv", per_label=2)  # 42 real images
    n = len(pd.read_csv(manifest))
    args = ["encode", "--data", str(manifest), "--vae", str(taesd_path), "--batch-size", "3", "--shard-size", "6", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "tailfuse", *args]
    proc = subprocess.Popen([*cmd, "--run", str(tmp_path / "killed")], env=env, stderr=subprocess.PIPE)
    rec_path = tmp_path / "killed" / "stages" / "encode.json"
    marker_dir = tmp_path / "killed" / "stages" / "encode.shards"  # one done-marker per finished shard
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if marker_dir.is_dir() and len(list(marker_dir.glob("*.json"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rec = json.loads(rec_path.read_text())
    markers = {p.stem: json.loads(p.read_text()) for p in marker_dir.glob("*.json")}
    assert rec["status"] == "running" and 3 <= len(markers) < rec["n_shards"]
    done_files = {k: (tmp_path / "killed" / v["file"]) for k, v in markers.items()}
    stamps = {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in done_files.items()}
    subprocess.run([*cmd, "--run", str(tmp_path / "killed")], env=env, check=True, capture_output=True)
    for k, p in done_files.items():  # finished shards were not redone
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamps[k]
    subprocess.run([*cmd, "--run", str(tmp_path / "whole")], env=env, check=True, capture_output=True)
    ids_a, lat_a = RunStore(tmp_path / "killed").latents().load_all()
    ids_b, lat_b = RunStore(tmp_path / "whole").latents().load_all()
    assert np.array_equal(ids_a, ids_b) and len(ids_a) == n
    assert torch.equal(lat_a, lat_b)
    assert lat_a.shape[1:] == (4, 16, 16)


@pytest.mark.shared
@pytest.mark.slow
def test_encode_real_multilabel_covid_subset(tmp_path, covid_dir, taesd_path, capsys):
    manifest = subset_manifest(covid_dir, tmp_path / "in" / "covid.csv", per_label=2, splits=("train", "test"))
    rc = main(["encode", "--data", str(manifest), "--vae", str(taesd_path), "--run", str(tmp_path / "run"), "--quiet"])
    assert rc == 0
    capsys.readouterr()
    rc = main(["info", "--run", str(tmp_path / "run"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and info["multi_label"] and len(info["labels"]) == 15
    assert info["latent_shape"] == [4, 16, 16]  # 224 px grey -> 128 px RGB -> 4x16x16
    assert info["samples"] == len(pd.read_csv(manifest))
    assert "COVID-19" in info["head_labels"] and set(info["tail_labels"]) | set(info["head_labels"]) == set(info["labels"])
    assert set(info) >= {"samples", "latent_shape", "labels", "tail_labels", "stages"}
