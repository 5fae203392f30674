"""The Python API: TailFuseSampler (imbalanced-learn's resampler contract and estimator checks; images, latents and
feature vectors), tailfuse.run / tailfuse.evaluate, the augmented Dataset, and the examples run on real data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from imblearn.utils.estimator_checks import parametrize_with_checks

import tailfuse
from conftest import subset_manifest
from tailfuse import TailFuseSampler
from tailfuse.datasets import AugmentedImageDataset, weighted_sampler
from tailfuse.errors import TailfuseError

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(generations=1, epochs=1, imitation_epochs=1, k=8)
# imbalanced-learn's checks that cannot apply, and why (README, "Python API")
NOT_APPLICABLE = {
    "check_target_type": "tailfuse over-samples multi-label targets (a 0/1 matrix with several labels per row), which "
                         "this check requires a sampler to refuse",
}


@parametrize_with_checks([TailFuseSampler(**FAST)], expected_failed_checks=lambda e: NOT_APPLICABLE)
def test_imbalanced_learn_estimator_checks(estimator, check):
    check(estimator)


def test_feature_vectors_multiclass_and_multilabel():
    from sklearn.datasets import make_classification, make_multilabel_classification

    X, y = make_classification(n_samples=300, n_classes=3, n_informative=4, weights=[0.1, 0.3, 0.6], random_state=1)
    s = TailFuseSampler(sampling_strategy={0: 150, 1: 150}, random_state=3, **FAST)
    Xr, yr = s.fit_resample(X.astype(np.float32), y.astype(np.int32))
    assert Xr.dtype == np.float32 and yr.dtype == np.int32
    assert np.bincount(yr).tolist() == [150, 150, np.bincount(y)[2]]
    assert np.array_equal(Xr[: len(X)], X.astype(np.float32)) and np.array_equal(yr[: len(y)], y)
    prov = s.provenance_
    assert len(prov) == len(Xr) - len(X) and set(prov["tail_label"].astype(int)) == {0, 1}
    assert (y[prov["tail_sample_id"]] == prov["tail_label"].astype(int)).all()  # each new row from a real rare row
    assert (y[prov["head_sample_id"]] == 2).all()  # and a common one
    frame = pd.DataFrame(X[:, :3], columns=["a", "b", "c"])
    s = TailFuseSampler(random_state=0, **FAST)
    Xf, yf = s.fit_resample(frame, y)
    assert list(Xf.columns) == ["a", "b", "c"] and len(Xf) == len(yf) > len(frame) and Xf.iloc[:300].equals(frame)
    assert list(s.get_feature_names_out()) == ["a", "b", "c"]
    Xm, Ym = make_multilabel_classification(n_samples=200, n_classes=4, n_labels=2, random_state=0)
    Ym[:, 3] = (np.arange(200) % 9 == 0)  # a rare label
    Xr, Yr = TailFuseSampler(**FAST).fit_resample(Xm, Ym)
    assert Yr.shape[1] == 4 and len(Xr) == len(Yr) > len(Xm) and Yr[len(Ym):, 3].sum() > 0
    with pytest.raises(ValueError, match="labels_policy"):
        TailFuseSampler(labels_policy="all").fit_resample(X, y)
    with pytest.raises(ValueError, match="at least two classes"):
        TailFuseSampler(**FAST).fit_resample(X, np.zeros(len(X)))


@pytest.mark.shared
def test_images_paths_arrays_and_latents(tmp_path, isic_dir, taesd_path):
    m = pd.read_csv(isic_dir / "manifest.csv")
    m = pd.concat([m[m["NV"] == 1].head(24), m[m["DF"] == 1].head(6)])
    paths = [str(isic_dir / p) for p in m["path"]]
    y = np.where(m["DF"] == 1, "DF", "NV")
    s = TailFuseSampler(vae=str(taesd_path), run=str(tmp_path / "run"), **FAST)
    Xr, yr = s.fit_resample(paths, y.tolist())
    assert isinstance(Xr, list) and isinstance(yr, list) and Xr[:30] == paths and yr.count("DF") == 24
    assert all(Path(p).is_file() for p in Xr[30:]) and s.run_ == str(tmp_path / "run")
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # 30 x 128 x 128 x 3 uint8
    Xa, ya = TailFuseSampler(vae=str(taesd_path), **FAST).fit_resample(arr, y)
    assert Xa.dtype == np.uint8 and Xa.shape == (48, 128, 128, 3) and (ya == "DF").sum() == 24
    z = torch.randn(30, 4, 16, 16)
    Xz, yz = TailFuseSampler(input="latents", **FAST).fit_resample(z, y)
    assert isinstance(Xz, torch.Tensor) and Xz.shape == (48, 4, 16, 16) and torch.equal(Xz[:30], z)


@pytest.mark.shared
def test_run_evaluate_and_the_augmented_dataset(tmp_path, isic_dir, taesd_path):
    manifest = subset_manifest(isic_dir, tmp_path / "in" / "m.csv", per_label=3)
    res = tailfuse.run(data=str(manifest), run=str(tmp_path / "run"), vae=str(taesd_path), per_class=6,
                       tail_labels=["BCC", "AKIEC", "DF", "VASC"], generations=1, epochs=1, progress=False)
    assert res.n_images == 24 and res.manifest.is_file() and len(res.table()) == 24
    with pytest.raises(TailfuseError, match="unknown setting"):
        tailfuse.run(data=str(manifest), run=str(tmp_path / "run"), per_clas=6)
    ev = tailfuse.evaluate(str(tmp_path / "run"), arms=["real", "oversample", "tailfuse"], seeds=[0], per_class=4,
                           quality=False, bootstrap=20, progress=False)
    t = ev.table()
    assert list(t.index) == ["real", "oversample", "tailfuse"] and "delta_tail_vs_real" in t.columns
    ds = AugmentedImageDataset(str(tmp_path / "run"))
    img, lab, syn = ds[0]
    assert img.shape == (3, 128, 128) and lab.shape == (7,) and syn is False
    assert sum(s for _, _, s in ds.items) == 24 and len(ds) == len(ds.real_paths) + 24
    half = AugmentedImageDataset(str(tmp_path / "run"), synthetic_ratio=0.5)
    assert len(half) == len(half.real_paths) + min(24, round(0.5 * len(half.real_paths)))
    rep = AugmentedImageDataset(str(tmp_path / "run"), synthetic_prob=1.0, seed=0)
    tail_rows = [i for i, (_, y, _) in enumerate(rep.items) if y[[2, 3, 5, 6]].sum() > 0]
    assert all(rep[i][2] for i in tail_rows)  # every tail image replaced by a synthetic one of its label
    idx = list(weighted_sampler(ds, num_samples=2000))
    drawn = ds.label_matrix()[idx].sum(0)
    assert drawn.min() > 0.4 * drawn.max()  # about balanced


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("script", ["augment_and_train.py", "resample_in_a_pipeline.py"])
def test_examples_run(script, tmp_path, isic_dir, taesd_path):
    args = [sys.executable, str(ROOT / "examples" / script)]
    if script == "augment_and_train.py":
        manifest = subset_manifest(isic_dir, tmp_path / "in" / "m.csv", per_label=4)
        args += ["--data", str(manifest), "--vae", str(taesd_path), "--run", str(tmp_path / "run"), "--per-class", "8",
                 "--epochs", "1", "--train-generations", "1"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("test AP per label" in r.stdout) if script == "augment_and_train.py" else ("with tailfuse" in r.stdout)
