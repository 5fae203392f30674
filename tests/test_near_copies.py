"""The near-copy check finds copies (issue 26): exact and jittered copies of training images, and fused images that
all carry the one image of a one-image tail class, are flagged in `report`'s scores and in `evaluate`'s quality
table; real test images are not."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conftest import subset_manifest
from tailfuse.cli import main
from tailfuse.nearcopy import RegionIndex, describe, load_images
from tailfuse.store import RunStore

pytestmark = [pytest.mark.shared, pytest.mark.slow]
ONE = "VASC"  # the tail class cut to a single training image


def _jitter(img: Image.Image, kind: str, rng) -> Image.Image:
    a = np.asarray(img.convert("RGB")).astype(np.float32)
    if kind == "shift":  # a few pixels
        return Image.fromarray(np.roll(a, tuple(int(v) for v in rng.integers(2, 5, 2) * rng.choice([-1, 1], 2)),
                                       (0, 1)).astype(np.uint8))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=75)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return Image.fromarray(np.clip(a * np.array([1.05, 0.98, 1.0]) + 6, 0, 255).astype(np.uint8))  # slight colour


@pytest.fixture(scope="module")
def one_image_run(tmp_path_factory, isic_dir, taesd_path):
    """ISIC2018-LT (a subset) with the VASC training images cut to one, run through `tailfuse run` with the default
    training (a model trained for a few epochs only pastes arbitrary regions: its maps do not find the lesion)."""
    root = tmp_path_factory.mktemp("onerun")
    m = pd.read_csv(subset_manifest(isic_dir, root / "all.csv", per_label=25))
    vasc = m[(m["split"] == "train") & (m[ONE] == 1)]
    m.drop(index=vasc.index[1:]).to_csv(root / "m.csv", index=False)
    conf = root / "run.yaml"
    conf.write_text(yaml.safe_dump({"data": {"tail_labels": ["BCC", "AKIEC", "DF", ONE]},
                                    "fuse": {"per_class": 12}}))
    run = root / "run"
    assert main(["run", "--data", str(root / "m.csv"), "--vae", str(taesd_path), "--run", str(run), "--config",
                 str(conf), "--quiet"]) == 0
    return run


def test_report_flags_copies_and_the_one_source_images_but_not_real_test_images(one_image_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_image_run, run)
    store = RunStore(run)
    assert main(["report", "--run", str(run), "--quiet"]) == 0
    scores = pd.read_csv(run / "synthetic" / "scores.csv").set_index("synth_id")
    prov = pd.read_json(run / "synthetic" / "provenance.jsonl", lines=True).set_index("synth_id")
    one = prov["tail_label"] == ONE
    assert prov.loc[one, "tail_sample_id"].nunique() == 1 and one.sum() == 12
    assert scores.loc[one[one].index, "near_copy"].mean() >= 0.8  # made from one image: near-copies of it
    # the review page says so for those images
    text = (run / "synthetic" / "report" / "data.js").read_text()
    items = json.loads(text[text.index("{") : text.rindex("}") + 1])["items"]
    shown = [it["near_copy"] for it in items if it["tail_label"] == ONE]
    assert len(shown) == 12 and np.mean(shown) >= 0.8

    # copies of training images, exact and jittered, against real test images: the scorer the report uses
    from tailfuse.scoring import RealScorer, run_image_features

    samples = store.samples()
    train = samples[samples["split"] == "train"].reset_index(drop=True)
    rng = np.random.default_rng(0)
    picked = train["abs_path"].to_numpy()[rng.choice(len(train), 15, replace=False)]
    copies = []
    for i, p in enumerate(picked):
        img = Image.open(p)
        for kind in ("exact", "shift", "jpeg", "colour"):
            out = tmp_path / "probes" / f"{kind}-{i}.png"
            out.parent.mkdir(exist_ok=True)
            (img.convert("RGB") if kind == "exact" else _jitter(img, kind, rng)).save(out)
            copies.append(str(out))
    test_paths = samples.loc[samples["split"] == "test", "abs_path"].tolist()
    scorer = RealScorer.fit(store)
    paths = copies + test_paths
    s = scorer.score(run_image_features(store, paths), ["BCC"] * len(paths), paths)
    flagged = s["near_copy"]
    assert flagged[: len(copies)].mean() >= 0.9, flagged[: len(copies)].reshape(-1, 4).mean(0)
    assert flagged[len(copies):].mean() <= 0.06  # real test images: about the share the threshold allows
    exact_ids = np.asarray(s["nn_sample_id"][: len(copies)]).reshape(-1, 4)[:, 0]
    assert (exact_ids == [train.set_index("abs_path").loc[p, "sample_id"] for p in picked]).all()


def test_evaluate_quality_table_counts_the_one_source_images_as_near_copies(one_image_run, tmp_path):
    from tailfuse.evaluation.config import EvaluateConfig
    from tailfuse.evaluation.harness import run_evaluate

    run = tmp_path / "run"
    shutil.copytree(one_image_run, run)
    res = run_evaluate(str(run), EvaluateConfig(arms=["real", "vae-roundtrip", "tailfuse"], seeds=[0], per_class=12,
                                                bootstrap=0, fid_max_images=40), progress=False)
    sets = res["quality"]["sets"]
    tf = sets["tailfuse"]["memorisation"]
    assert tf["per_label"][ONE] >= 0.8  # every VASC image is made from the one VASC training image
    assert sets["vae-roundtrip"]["memorisation"]["share"] >= 0.8  # round trips of training images are copies
    floor = next(v for k, v in sets.items() if k.startswith("floor"))["memorisation"]
    assert floor["share"] <= 0.06  # real test images
    md = (run / "eval" / "results.md").read_text()
    assert "pixel region" in md


def test_flat_regions_never_match_and_a_partial_copy_does():
    """Windows without texture (a black border, a flat background) are not compared: two different images that
    share only flat corners are not copies; an image that carries another's textured region at the same place is."""
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(40, 3, 64, 64, generator=g)
    ref[:, :, :24, :24] = 0.0  # every image shares a black corner
    index = RegionIndex.build(ref, quantile=0.02)
    other = torch.rand(50, 3, 64, 64, generator=g)
    other[:, :, :24, :24] = 0.0
    part = other[:5].clone()
    part[:, :, 24:, 24:] = ref[:5, :, 24:, 24:]  # a textured region copied in place
    _, ok = describe(ref[:1])
    assert not ok[0, 0]  # the flat corner window is left out
    r = index.query(torch.cat([other, part]))
    # were flat windows compared, every image would be at distance 0 from every other: all of them "copies"
    assert r["nn_distance"][:50].min() > 0.5 * np.median(index.calibration) and r["near_copy"][:50].mean() < 0.5
    assert r["near_copy"][50:].all() and (r["nn_id"][50:] == np.arange(5)).all()
    assert load_images([], 64, "center-crop").shape == (0, 3, 64, 64)
