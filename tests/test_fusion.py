"""Saliency, neighbours, the fusion rule, label policies, provenance, determinism and resume."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from tailfuse.config import DataConfig, DecodeConfig, EncodeConfig, FuseConfig, TrainConfig, VAEConfig
from tailfuse.decode import run_decode
from tailfuse.encode import run_encode
from tailfuse.errors import TailfuseError
from tailfuse.fusion.fuse import fuse_latents, fusion_masks, plan, splice
from tailfuse.fusion.neighbours import nearest
from tailfuse.fusion.saliency import compute_maps, gaussian_smooth, rank_normalise, saliency_targets
from tailfuse.fusion.stage import run_fuse, run_neighbours, synthetic_latents
from tailfuse.store import RunStore, ShardSet, save_tensors_atomic
from tailfuse.train import run_train
from tiny import tiny_autoencoder_tiny

QUIET = dict(progress=False)


# ---- the rule on hand-made maps ---------------------------------------------------------------------------


def test_masks_follow_the_fusion_rule_exactly():
    s_t = torch.tensor([[[0.9, 0.9], [0.1, 0.1]]])  # tail-specific (S_t > 0.5): top row
    s_h = torch.tensor([[[0.1, 0.9], [0.1, 0.9]]])  # head-generic (S_h < 0.5): left column
    q = torch.tensor([0.5])
    g = torch.Generator().manual_seed(0)
    for fill, open_cell in ((0.0, False), (1.0, True)):
        m = fusion_masks(s_t, s_h, q, q, fill, g)
        assert m["T"].tolist() == [[[True, True], [False, False]]]
        assert m["G"].tolist() == [[[True, False], [True, False]]]
        # T & ~G -> tail (0,1); G & ~T -> head (1,0); T & G (0,0) and neither (1,1) -> fill
        assert m["take_tail"].tolist() == [[[open_cell, True], [False, open_cell]]]
    code_t, code_h = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    fused = splice(code_t, code_h, torch.tensor([[[True, False], [False, True]]]))
    assert fused[0, :, 0, 0].tolist() == [1, 1, 1] and fused[0, :, 0, 1].tolist() == [0, 0, 0]


def test_random_fill_is_per_position_with_the_given_probability():
    s = torch.full((1, 64, 64), 0.5)  # T empty and G empty at q = 0.5: every position is open
    m = fusion_masks(s, s, torch.tensor([0.5]), torch.tensor([0.5]), 0.3, torch.Generator().manual_seed(1))
    assert abs(m["take_tail"].float().mean().item() - 0.3) < 0.03


def test_rank_normalisation_gives_quantiles_and_shares_ties():
    maps = torch.tensor([[[0.0, 10.0], [5.0, 7.0]], [[1.0, 1.0], [1.0, 3.0]]])
    r = rank_normalise(maps)
    torch.testing.assert_close(r[0], torch.tensor([[0.0, 1.0], [1 / 3, 2 / 3]]))
    torch.testing.assert_close(r[1], torch.tensor([[1 / 3, 1 / 3], [1 / 3, 1.0]]))
    # a contrast change does not change which share of positions passes a threshold
    torch.testing.assert_close(rank_normalise(maps[:1] ** 3), r[:1])


def test_fuse_latents_codes_and_residual_detail():
    from tailfuse.sparse.nets import SparseModel

    torch.manual_seed(0)
    m = SparseModel(4, 3, False, 8, 4, 0.5, 8, 1, 8, 1, 8).eval()
    z_t, z_h = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    every, none = torch.ones(2, 6, 6, dtype=torch.bool), torch.zeros(2, 6, 6, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(fuse_latents(m, z_t, z_h, every), m.decode(m.hard_code(z_t)))
        torch.testing.assert_close(fuse_latents(m, z_t, z_h, none, "soft"), m.decode(m.code(z_h)))
    # with the residual, taking everything from one sample gives that sample back exactly
    torch.testing.assert_close(fuse_latents(m, z_t, z_h, every, detail="residual"), z_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(fuse_latents(m, z_t, z_h, none, detail="residual"), z_h, atol=1e-5, rtol=0)
    half = torch.zeros(2, 6, 6, dtype=torch.bool)
    half[:, :, :3] = True
    mixed = fuse_latents(m, z_t, z_h, half, detail="residual")
    assert not torch.allclose(mixed, z_t) and not torch.allclose(mixed, z_h)


def test_feathering_mixes_only_near_borders():
    from tailfuse.fusion.fuse import feather_weights
    from tailfuse.sparse.nets import SparseModel

    torch.manual_seed(0)
    m = SparseModel(4, 3, False, 8, 4, 0.5, 8, 1, 8, 1, 8).eval()
    z_t, z_h = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    half = torch.zeros(2, 16, 16, dtype=torch.bool)
    half[:, :, :8] = True
    w = feather_weights(half, 1.0)[:, 0]
    torch.testing.assert_close(w[:, :, :4], torch.ones(2, 16, 4), atol=1e-6, rtol=0)  # 3 sigma from the border
    torch.testing.assert_close(w[:, :, 12:], torch.zeros(2, 16, 4), atol=1e-6, rtol=0)
    assert ((w[:, :, 6:10] > 0) & (w[:, :, 6:10] < 1)).all()  # mixed only near the border
    assert torch.equal(feather_weights(half, 0)[:, 0], half.float())
    # nothing to feather: one source everywhere gives that source back, as without feathering
    every = torch.ones(2, 16, 16, dtype=torch.bool)
    torch.testing.assert_close(fuse_latents(m, z_t, z_h, every, detail="residual", feather=1.0), z_t, atol=1e-5, rtol=0)
    plain = fuse_latents(m, z_t, z_h, half, detail="residual")
    soft = fuse_latents(m, z_t, z_h, half, detail="residual", feather=1.0)
    assert not torch.allclose(plain, soft)


def test_gaussian_smoothing_keeps_mass_and_makes_regions():
    m = torch.zeros(1, 16, 16)
    m[0, 8, 8] = 1
    s = gaussian_smooth(m, 1.0)
    assert s.shape == m.shape and abs(s.sum().item() - 1) < 1e-5 and s[0, 8, 8] < 0.2 and s[0, 8, 9] > 0.05
    r = rank_normalise(s)
    assert r[0, 8, 8] == 1.0


def test_plan_cycles_tail_rows_then_neighbour_ranks_then_repeats():
    items = plan({"A": [10, 11], "B": [20]}, {"A": 5, "B": 0}, k=2)
    assert [i[:4] for i in items] == [("A", 10, 0, 0), ("A", 11, 0, 0), ("A", 10, 1, 0), ("A", 11, 1, 0), ("A", 10, 0, 1)]
    assert [i[4:] for i in items] == [(s, 0) for s in range(5)]  # one candidate per slot
    # candidates: M per slot, same tail row, the next neighbour ranks; slots numbered over all labels
    items = plan({"A": [10, 11], "B": [20]}, {"A": 2, "B": 1}, k=3, candidates=3)
    assert items == [("A", 10, 0, 0, 0, 0), ("A", 10, 1, 0, 0, 1), ("A", 10, 2, 0, 0, 2),
                     ("A", 11, 0, 0, 1, 0), ("A", 11, 1, 0, 1, 1), ("A", 11, 2, 0, 1, 2),
                     ("B", 20, 0, 0, 2, 0), ("B", 20, 1, 0, 2, 1), ("B", 20, 2, 0, 2, 2)]


def test_saliency_targets_are_always_labels_the_sample_carries():
    labels = ["h1", "h2", "t1", "t2"]
    samples = pd.DataFrame({"sample_id": [5, 6, 7, 8], "h1": [1, 1, 0, 0], "h2": [0, 1, 0, 1], "t1": [0, 0, 1, 0], "t2": [0, 0, 1, 0]})
    probs = np.array([[0.1, 0.9, 0.0, 0.0], [0.2, 0.7, 0.1, 0.0], [0.9, 0.1, 0.5, 0.4], [0.9, 0.05, 0.0, 0.0]])
    t = saliency_targets(samples, labels, ["t1", "t2"], probs)
    rows = [tuple(r) for r in t[["sample_id", "role", "target"]].itertuples(index=False)]
    # 5: only h1 present (h2 more confident but absent); 6: h2 (the more confident present one);
    # 7: one map per tail label it carries; 8: h2 is its only label although h1 is predicted
    assert rows == [(5, "head", 0), (6, "head", 1), (7, "tail", 2), (7, "tail", 3), (8, "head", 1)]
    empty = pd.DataFrame({"sample_id": [1], "h1": [0], "h2": [0], "t1": [0], "t2": [0]})
    assert saliency_targets(empty, labels, ["t1", "t2"], np.zeros((1, 4))).empty  # no label: left out


def test_neighbour_positions_map_back_to_the_right_samples(tmp_path):
    """Tail rows and the head pool are interleaved in the table with non-contiguous ids: a lookup by position in
    the full table (the reference code's bug) would return the wrong samples."""
    rng = np.random.default_rng(0)
    roles = ["head", "tail", "head", "head", "tail", "head", "head"]
    sample_ids = [101, 57, 33, 250, 12, 64, 8]
    maps = torch.from_numpy(rng.random((7, 4, 4)).astype(np.float32))
    maps[5] = maps[1] + 0.01  # head 64 is the twin of tail 57
    maps[2] = maps[4] - 0.01  # head 33 is the twin of tail 12
    table = pd.DataFrame({"row_id": np.arange(7) + 1000, "sample_id": sample_ids, "role": roles, "target": [0, 1, 0, 0, 1, 0, 0]})
    save_tensors_atomic(tmp_path / "m.safetensors", {"maps": maps, "row_id": torch.arange(7) + 1000})
    shards = ShardSet(tmp_path, ["m.safetensors"], id_key="row_id", key="maps")
    cfg = FuseConfig(neighbours=2, saliency_norm="minmax", index="exact")
    nb = run_neighbours(table, shards, tmp_path, cfg, ["h", "t"])
    first = nb[nb["rank"] == 0].set_index("tail_sample_id")
    assert first.loc[57, "head_sample_id"] == 64 and first.loc[12, "head_sample_id"] == 33
    assert first.loc[57, "head_row"] == 1005 and first.loc[12, "head_row"] == 1002
    assert set(nb["head_sample_id"]) <= {101, 33, 250, 64, 8}  # only the head pool
    d_exact, p_exact = nearest(maps[[1, 4]], maps[[0, 2, 3, 5, 6]], 3, "exact")
    d_flat, p_flat = nearest(maps[[1, 4]], maps[[0, 2, 3, 5, 6]], 3, "faiss-flat")
    assert np.array_equal(p_exact, p_flat) and np.allclose(d_exact, d_flat, atol=1e-4)


def test_gradcam_is_class_aware_eigencam_is_not():
    from tailfuse.sparse.nets import SparseModel

    torch.manual_seed(0)
    m = SparseModel(4, 3, False, 8, 4, 0.5, 8, 1, 8, 1, 8).eval()
    z = torch.randn(2, 4, 8, 8)
    g0, g1 = compute_maps(m, z, [0, 0]), compute_maps(m, z, [1, 1])
    assert g0.shape == (2, 8, 8) and g0.min() >= 0 and g0.max() <= 1
    assert not torch.allclose(g0, g1)
    e0, e1 = compute_maps(m, z, [0, 0], "eigencam"), compute_maps(m, z, [1, 1], "eigencam")
    torch.testing.assert_close(e0, e1)


# ---- the stage on a tiny run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A multi-label run (tiny VAE, random images) with a short-trained model."""
    root = tmp_path_factory.mktemp("fuse")
    vae = str(tiny_autoencoder_tiny(root / "vae"))
    rng = np.random.default_rng(0)
    from PIL import Image

    (root / "in" / "img").mkdir(parents=True)
    rows = []
    for i in range(60):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "in" / "img" / f"{i}.png")
        a, b = int(i % 2 == 0), int(i % 3 == 0)
        t1, t2 = int(i % 10 == 1), int(i % 15 == 4)
        rows.append({"path": f"img/{i}.png", "split": "train" if i < 48 else "val", "a": a, "b": b, "t1": t1, "t2": t2,
                     "site": "north" if i % 4 < 2 else "south"})
    pd.DataFrame(rows).to_csv(root / "in" / "m.csv", index=False)
    run = root / "run"
    run_encode(DataConfig(data=str(root / "in" / "m.csv"), image_size=64, tail_labels=["t1", "t2"]), VAEConfig(vae=vae),
               EncodeConfig(batch_size=16, shard_size=32), str(run), **QUIET)
    run_train(str(run), TrainConfig(generations=1, epochs=1, k=8, dim=4, tau=0.3, width_e=8, blocks_e=1, width_d=8,
                                    blocks_d=1, width_c=8, batch_size=16), **QUIET)
    return run


def _fuse(run, **kw):
    return run_fuse(str(run), FuseConfig(**{"per_class": 7, "shard_size": 5, "batch_size": 3, **kw}), **QUIET)


def test_provenance_complete_and_consistent(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    rec = _fuse(run)
    run_decode(str(run), DecodeConfig(), **QUIET)
    store = RunStore(run)
    samples = store.samples().set_index("sample_id")
    labels, tail = ["a", "b", "t1", "t2"], ["t1", "t2"]
    syn = pd.read_csv(run / "synthetic" / "samples.csv")
    assert rec["n_synthetic"] == 14 and rec["per_label"] == {"t1": 7, "t2": 7}
    assert syn["synth_id"].tolist() == list(range(14))
    for r in syn.itertuples():
        t, h = samples.loc[r.tail_sample_id], samples.loc[r.head_sample_id]
        assert t["split"] == "train" and h["split"] == "train"
        assert t[r.tail_label] == 1  # the tail sample carries the tail label claimed
        assert h[tail].sum() == 0  # the head sample carries no tail label
        union = np.maximum(t[labels].to_numpy(dtype=int), h[labels].to_numpy(dtype=int))
        assert [getattr(r, lab) for lab in labels] == union.tolist()  # label policy union (multi-label data)
        assert 0 < r.q1 < 1 and 0 < r.q2 < 1 and 0 <= r.tail_share <= 1
        assert len(r.model_sha256) == 64 and r.cam == "gradcam"
    man = pd.read_csv(run / "synthetic" / "manifest.csv")
    # hard labels by default (no soft_<label> columns); the input's metadata column 'site' too, valued as each image's
    # tail source
    assert list(man.columns) == ["path", "split", *labels, "site"] and (man["split"] == "synthetic").all()
    assert man["site"].tolist() == [samples.loc[i, "site"] for i in syn["tail_sample_id"]]
    assert all((run / "synthetic" / p).is_file() for p in man["path"])
    prov = [json.loads(x) for x in (run / "synthetic" / "provenance.jsonl").read_text().splitlines()]
    assert all(p["pixel_detail"] for p in prov)  # on by default for a fused set
    assert len(prov) == 14 and prov[3]["synth_id"] == 3 and set(prov[3]["labels"]) >= {prov[3]["tail_label"]}
    from PIL import Image

    with Image.open(run / "synthetic" / man["path"][0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_saliency_targets_in_the_stage_match_the_classifier_where_it_has_to_choose(tmp_path, trained):
    """The stage asks C only about head samples that carry two or more head labels: its targets are the ones the
    probabilities of every training sample give (saliency_targets on a full pass), and the data has such samples."""
    from tailfuse.fusion.stage import model_identity
    from tailfuse.sparse.nets import SparseModel

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _fuse(run)
    store = RunStore(run)
    labels, tail = ["a", "b", "t1", "t2"], ["t1", "t2"]
    train = store.samples().query("split == 'train'").reset_index(drop=True)
    assert ((train[["a", "b"]].sum(axis=1) == 2) & (train[tail].sum(axis=1) == 0)).sum() >= 5
    gen, _ = model_identity(store, FuseConfig().model, None)
    model = SparseModel.from_run(store, FuseConfig().model, gen)
    with torch.no_grad():
        z = store.latents().get(train["sample_id"].to_numpy())
        probs = model.probabilities(model.classify(model.code(z))).numpy()
    want = saliency_targets(train, labels, tail, probs)
    got = pd.read_csv(next((run / "saliency").glob("*/maps.csv")))
    pd.testing.assert_frame_equal(got[["sample_id", "role", "target"]], want, check_dtype=False)


def test_fixed_mmap_threshold_is_set_on_glibc_and_a_user_setting_is_kept(monkeypatch):
    import platform

    from tailfuse.fusion.saliency import fix_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert fix_mmap_threshold() is False  # the user's own threshold stays
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert fix_mmap_threshold() is True


def test_tail_label_policy_and_balance_to(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    run_fuse(str(run), FuseConfig(balance_to=9, labels_policy="tail", name="bal", batch_size=4), **QUIET)
    samples = RunStore(run).samples().set_index("sample_id")
    syn = pd.read_csv(run / "bal" / "samples.csv")
    train = samples[samples["split"] == "train"]
    assert (syn["tail_label"] == "t1").sum() == 9 - train["t1"].sum()
    assert (syn["tail_label"] == "t2").sum() == 9 - train["t2"].sum()
    for r in syn.itertuples():
        assert [getattr(r, lab) for lab in ("a", "b", "t1", "t2")] == samples.loc[r.tail_sample_id, ["a", "b", "t1", "t2"]].astype(int).tolist()


def test_kept_label_policy_follows_the_head_region_kept(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    run_fuse(str(run), FuseConfig(per_class=10, labels_policy="kept", name="kept", batch_size=4), **QUIET)
    samples = RunStore(run).samples().set_index("sample_id")
    syn = pd.read_csv(run / "kept" / "samples.csv")
    labels = ["a", "b", "t1", "t2"]
    for r in syn.itertuples():
        y_t = samples.loc[r.tail_sample_id, labels].to_numpy(dtype=int)
        y_h = samples.loc[r.head_sample_id, labels].to_numpy(dtype=int)
        want = np.maximum(y_t, y_h) if r.head_specific_kept >= 0.5 else y_t
        assert [getattr(r, lab) for lab in labels] == want.tolist()
        assert 0 <= r.head_specific_kept <= 1


def test_fuse_is_deterministic_and_resumes_identically(tmp_path, trained, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(trained, a)
    shutil.copytree(trained, b)
    _fuse(a)
    import tailfuse.fusion.stage as st

    orig = st.save_tensors_atomic

    def failing(path, tensors, metadata=None):
        if "latents/00001" in str(path):
            raise KeyboardInterrupt
        return orig(path, tensors, metadata)

    monkeypatch.setattr(st, "save_tensors_atomic", failing)
    with pytest.raises(KeyboardInterrupt):
        _fuse(b)
    monkeypatch.setattr(st, "save_tensors_atomic", orig)
    assert RunStore(b).stage("fuse-synthetic")["status"] == "running"
    _fuse(b)
    ia, za = synthetic_latents(RunStore(a)).load_all()
    ib, zb = synthetic_latents(RunStore(b)).load_all()
    assert np.array_equal(ia, ib) and torch.equal(za, zb)
    assert len(torch.unique(za.reshape(len(za), -1), dim=0)) == len(za)  # no two synthetic samples identical
    pa = pd.read_csv(a / "synthetic" / "samples.csv")
    pb = pd.read_csv(b / "synthetic" / "samples.csv")
    pd.testing.assert_frame_equal(pa, pb)


def test_fuse_errors(tmp_path, trained):
    with pytest.raises(TailfuseError, match="either --per-class or --balance-to"):
        run_fuse(str(trained), FuseConfig(per_class=3, balance_to=5), **QUIET)
    with pytest.raises(TailfuseError, match="no trained model 'nope'"):
        run_fuse(str(trained), FuseConfig(model="nope"), **QUIET)
    with pytest.raises(TailfuseError, match="saliency method|--cam"):
        run_fuse(str(trained), FuseConfig(cam="xcam"), **QUIET)


def test_candidates_soft_labels_and_neighbours_within(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    rec = run_fuse(str(run), FuseConfig(per_class=4, candidates=3, soft_labels=True, neighbours_within="site",
                                        name="cand", batch_size=5), **QUIET)
    assert rec["n_synthetic"] == 24  # 2 tail labels x 4 slots x 3 candidates
    samples = RunStore(run).samples().set_index("sample_id")
    syn = pd.read_csv(run / "cand" / "samples.csv")
    labels = ["a", "b", "t1", "t2"]
    assert syn.groupby("slot")["candidate"].apply(list).tolist() == [[0, 1, 2]] * 8
    for slot, g in syn.groupby("slot"):
        assert g["tail_sample_id"].nunique() == 1 and g["tail_label"].nunique() == 1  # one tail image per slot
    for r in syn.itertuples():
        t, h = samples.loc[r.tail_sample_id], samples.loc[r.head_sample_id]
        assert t["site"] == h["site"] and r.within_group  # partners share the metadata value
        # soft targets (multi-label): the tail image's labels 1, the head image's other labels its kept share
        for lab in labels:
            want = 1.0 if t[lab] == 1 else (r.head_specific_kept if h[lab] == 1 else 0.0)
            assert getattr(r, f"soft_{lab}") == pytest.approx(want, abs=1e-6)
    with pytest.raises(TailfuseError, match="not a metadata column"):
        run_fuse(str(run), FuseConfig(per_class=2, neighbours_within="colour", name="x"), **QUIET)
    with pytest.raises(TailfuseError, match="--candidates"):
        run_fuse(str(run), FuseConfig(per_class=2, candidates=0, name="x"), **QUIET)

    # decode keeps the best candidate of every slot by the real-data classifier's tail probability
    dec = run_decode(str(run), DecodeConfig(name="cand"), **QUIET)
    prov = pd.read_json(run / "cand" / "provenance.jsonl", lines=True)
    man = pd.read_csv(run / "cand" / "manifest.csv")
    assert dec["n_images"] == 8 and dec["selection"]["n_candidates"] == 24 and len(man) == 8
    assert prov["selected"].sum() == 8 and prov["tail_prob"].between(0, 1).all() and (prov["nn_distance"] > 0).all()
    for slot, g in prov.groupby("slot"):
        best = g.loc[g["tail_prob"].idxmax()]
        assert bool(best["selected"]) and g["selected"].sum() == 1
    assert man["path"].tolist() == prov.loc[prov["selected"], "path"].tolist()
    assert [c for c in man.columns if c.startswith("soft_")] == [f"soft_{lab}" for lab in labels]
    assert all((run / "cand" / p).is_file() for p in prov["path"])  # every candidate's image is kept for review

    # the pixel composite control: every image is W x_tail + (1 - W) x_head of its source images, nothing decoded
    from PIL import Image

    from tailfuse.decode import pixel_composite
    from tailfuse.images import load_image
    from tailfuse.latentset import LatentSet

    run_decode(str(run), DecodeConfig(name="cand", pixel_composite=True), force=True, **QUIET)
    prov = pd.read_json(run / "cand" / "provenance.jsonl", lines=True)
    assert prov["pixel_composite"].all() and not prov["pixel_detail"].any()
    masks = LatentSet.open(RunStore(run), "cand").shards.get(prov["synth_id"].tolist(), key="mask")
    for r, m in zip(prov.itertuples(), masks):
        got = torch.from_numpy(np.asarray(Image.open(run / "cand" / r.path).convert("RGB"), dtype=np.float32) / 255)
        src = lambda i: load_image(samples.loc[int(i), "abs_path"], got.shape[0])[None]  # noqa: E731
        want = pixel_composite(m[None], float(r.feather), src(r.tail_sample_id), src(r.head_sample_id))[0]
        assert (got.permute(2, 0, 1) - want).abs().max() <= 1 / 255 + 1e-6
    with pytest.raises(TailfuseError, match="exclude each other"):
        run_decode(str(run), DecodeConfig(name="cand", pixel_composite=True, pixel_detail=True), force=True, **QUIET)


def test_select_samples_takes_the_best_eligible_candidate_per_slot():
    from tailfuse.decode import select_samples

    table = pd.DataFrame({"slot": [0, 0, 0, 1, 1, 2]})
    sc = {"tail_prob": np.array([0.2, 0.9, 0.5, 0.4, 0.3, 0.8]),
          "near_copy": np.array([False, True, False, False, False, True])}
    assert select_samples(table, sc, drop_near_copies=False).tolist() == [False, True, False, True, False, True]
    # near-copies excluded: slot 0 falls back to its next best, slot 2 (only a near-copy) gets none
    assert select_samples(table, sc, drop_near_copies=True).tolist() == [False, False, True, True, False, False]


def test_soft_targets_multiclass_split_by_the_head_share():
    from tailfuse.fusion.stage import soft_targets

    y_t, y_h = np.array([0, 0, 1]), np.array([1, 0, 0])
    np.testing.assert_allclose(soft_targets(y_t, y_h, 1.0, 0.0, False, 2), [0, 0, 1])
    h = 0.4 ** 0.8
    np.testing.assert_allclose(soft_targets(y_t, y_h, 0.6, 0.0, False, 2), [h, 0, 1 - h])
    np.testing.assert_allclose(soft_targets(y_t, y_h, 0.0, 0.0, False, 2), [1, 0, 0])


@pytest.mark.shared
def test_pixel_detail_restores_the_original_pixels_of_unfused_regions(isic_dir, taesd_path):
    """On real ISIC images and TAESD: where the mask takes one source, pixel detail gives back that source's own
    pixels (the decode's error removed); near the border the decoder's blend remains."""
    from tailfuse.codec import VAECodec
    from tailfuse.decode import pixel_detail
    from tailfuse.images import load_image

    paths = [str(isic_dir / "images" / f"{i:05d}.png") for i in (0, 1, 2, 3)]
    x = torch.stack([load_image(p, 128) for p in paths])
    codec = VAECodec.load(str(taesd_path))
    with torch.no_grad():
        z = codec.encode(x)
        rt = codec.decode(z).float()
    x_t, x_h, rt_t, rt_h = x[:2], x[2:], rt[:2], rt[2:]
    every = torch.ones(2, 16, 16, dtype=torch.bool)
    out = pixel_detail(rt_t, every, 1.0, x_t, rt_t, x_h, rt_h)
    assert (out - x_t).abs().max() < 1e-5  # nothing fused: the original image, not its decode
    assert (rt_t - x_t).abs().mean() > 0.01  # which the plain decode is not
    half = torch.zeros(2, 16, 16, dtype=torch.bool)
    half[:, :, :8] = True
    w = half[:, None].float()
    with torch.no_grad():
        dec = codec.decode(w * z[:2] + (1 - w) * z[2:]).float()  # a latent fused along a vertical border
    out = pixel_detail(dec, half, 1.0, x_t, rt_t, x_h, rt_h)
    far_t, far_h = (slice(None), slice(None), slice(None), slice(0, 24)), (slice(None), slice(None), slice(None), slice(104, 128))
    assert (out[far_t] - x_t[far_t]).abs().mean() < 0.5 * (dec[far_t] - x_t[far_t]).abs().mean()
    assert (out[far_h] - x_h[far_h]).abs().mean() < 0.5 * (dec[far_h] - x_h[far_h]).abs().mean()
    # the pixel composite (no decoder): each source's own pixels away from the border, a blend across it
    from tailfuse.decode import pixel_composite

    comp = pixel_composite(half, 1.0, x_t, x_h)
    assert torch.allclose(comp[far_t], x_t[far_t], atol=1e-4) and torch.allclose(comp[far_h], x_h[far_h], atol=1e-4)
    mid = comp[:, :, :, 62:66]
    assert (mid - x_t[:, :, :, 62:66]).abs().mean() > 0.01 and (mid - x_h[:, :, :, 62:66]).abs().mean() > 0.01


def test_exact_search_over_pool_blocks_equals_one_block(monkeypatch):
    """The exact search compares a bounded block of the pool at a time and merges each block's best k: the result
    is the one a single comparison against the whole pool gives (a duplicate map in another block is found too)."""
    from tailfuse.fusion import neighbours

    g = torch.Generator().manual_seed(0)
    pool = torch.rand(300, 8, 8, generator=g)
    pool[250] = pool[7]  # a duplicate in another block
    queries = torch.cat([torch.rand(40, 8, 8, generator=g), pool[7:8] + 1e-3])
    d1, p1 = nearest(queries, pool, 5, "exact")
    monkeypatch.setattr(neighbours, "POOL_BLOCK_VALUES", 64 * 64)  # 64 maps per block: 5 blocks
    d2, p2 = nearest(queries, pool, 5, "exact", block=16)
    assert np.array_equal(p1[:-1], p2[:-1]) and np.allclose(d1, d2)
    assert set(p2[-1, :2]) == {7, 250} and np.array_equal(p1[-1, 2:], p2[-1, 2:])  # the tie in either order



@pytest.mark.parametrize("index", ["faiss-flat", "faiss-hnsw"])
def test_faiss_takes_the_pool_block_by_block(index, monkeypatch):
    """A faiss index is filled from the pool's blocks (Rows), never from the pool as one tensor beside it (the pool
    is then held once, in the index): the neighbours are those of the exact search over the whole pool."""
    from tailfuse.fusion.neighbours import Rows

    g = torch.Generator().manual_seed(1)
    pool = torch.rand(700, 6, 6, generator=g)
    queries = pool[[3, 250, 699]] + 1e-3 * torch.rand(3, 6, 6, generator=g)
    d_exact, p_exact = nearest(queries, pool, 4, "exact")
    seen = []

    def blocks():
        for a in range(0, len(pool), 128):
            seen.append(a)
            yield pool[a : a + 128]

    monkeypatch.setattr(Rows, "tensor", lambda self: pytest.fail("the whole pool was built as one tensor"))
    d, p = nearest(queries, Rows(len(pool), blocks), 4, index)
    assert seen == list(range(0, 700, 128))
    assert np.array_equal(p[:, 0], [3, 250, 699])
    if index == "faiss-flat":
        assert np.array_equal(p, p_exact) and np.allclose(d, d_exact, atol=1e-4)


def test_exact_search_over_rows_equals_the_tensor():
    """Exact search takes Rows as the one tensor their blocks fill (the values the tensor itself gives)."""
    from tailfuse.fusion.neighbours import Rows

    g = torch.Generator().manual_seed(2)
    pool = torch.rand(300, 5, 5, generator=g)
    rows = Rows(len(pool), lambda: (pool[a : a + 64] for a in range(0, 300, 64)))
    assert torch.equal(rows.tensor(), pool.reshape(300, -1))
    queries = torch.rand(10, 5, 5, generator=g)
    d1, p1 = nearest(queries, pool, 3, "exact")
    d2, p2 = nearest(queries, rows, 3, "exact")
    assert np.array_equal(p1, p2) and np.array_equal(d1, d2)


def test_batches_hold_a_bounded_number_of_latent_positions():
    """--batch-size holds at 16 x 16 (TAESD at 128 px); at Stable Diffusion's 64 x 64 a batch is capped at 32."""
    from tailfuse.fusion.stage import _normalise, batch_for

    assert batch_for(256, (4, 16, 16)) == 256 and batch_for(256, (4, 64, 64)) == 32 and batch_for(8, (4, 64, 64)) == 8
    assert batch_for(256, (4, 1024, 1024)) == 1
    maps = torch.rand(50, 6, 6, generator=torch.Generator().manual_seed(1))
    for how in ("rank", "minmax"):  # the same maps whatever the block (up to float rounding, which varies by CPU)
        torch.testing.assert_close(_normalise(maps, how, 1.0, block=7), _normalise(maps, how, 1.0, block=1024),
                                   rtol=0, atol=1e-5)
