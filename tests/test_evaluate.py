"""`tailfuse evaluate`: metrics against scikit-learn, Frechet distance, resamplers, classifiers, every arm end to end."""

import argparse
import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

from tailfuse.config import DataConfig, EncodeConfig, TrainConfig, VAEConfig
from tailfuse.encode import run_encode
from tailfuse.errors import TailfuseError
from tailfuse.evaluation import metrics as M
from tailfuse.evaluation.classifier import DEFAULT_C_GRID, TrainSet, class_weights, fit_images, fit_linear
from tailfuse.evaluation.cli_args import add_evaluate_parser, cmd_evaluate
from tailfuse.evaluation.config import ARMS, EvaluateConfig
from tailfuse.evaluation.harness import run_evaluate
from tailfuse.evaluation.quality import frechet_distance, knn_precision_recall
from tailfuse.budget import budget, strategy_from_flags
from tailfuse.evaluation.resample import mixup_pairs, mlsmote, oversample_rows, smote_multiclass
from tailfuse.store import RunStore
from tailfuse.train import run_train
from tiny import tiny_autoencoder_tiny

QUIET = dict(progress=False)
TINY_TRAIN = dict(generations=1, epochs=1, k=8, dim=4, tau=0.3, width_e=8, blocks_e=1, width_d=8, blocks_d=1,
                  width_c=8, batch_size=16)


# ---- metrics ------------------------------------------------------------------------------------------------


def test_average_precision_and_auroc_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 50))
        y = (rng.random((n, 4)) < 0.3).astype(int)
        s = np.round(rng.random((n, 4)), 1)  # many ties
        ap, au = M.average_precision(y, s), M.auroc(y, s)
        for j in range(4):
            if y[:, j].sum() == 0:
                assert np.isnan(ap[j]) and np.isnan(au[j])
                continue
            assert ap[j] == pytest.approx(average_precision_score(y[:, j], s[:, j]), abs=1e-12)
            if y[:, j].sum() < n:
                assert au[j] == pytest.approx(roc_auc_score(y[:, j], s[:, j]), abs=1e-12)
    # hand value: ranks 1, 3 positive -> (1/1 + 2/3) / 2
    assert M.average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(5 / 6)


def test_summary_means_over_head_tail_and_balanced_accuracy():
    labels, head, tail = ["h", "t1", "t2"], ["h"], ["t1", "t2"]
    y = np.eye(3)[[0, 0, 0, 1, 1, 0]]  # no t2 in the test set
    s = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.9, 0.05, 0.05]])
    r = M.summary(y, s, labels, head, tail, multi_label=False)
    ap = [average_precision_score(y[:, j], s[:, j]) for j in range(2)]
    assert r["map_head"] == pytest.approx(ap[0]) and r["map_tail"] == pytest.approx(ap[1])
    assert r["map_all"] == pytest.approx(np.mean(ap)) and r["labels_without_positives"] == ["t2"]
    assert r["per_label_ap"]["t2"] is None
    assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y.argmax(1), s.argmax(1)))


def test_paired_bootstrap_is_zero_for_identical_arms_and_positive_for_a_better_one():
    rng = np.random.default_rng(1)
    y = (rng.random((80, 3)) < 0.25).astype(int)
    noisy = [y + rng.normal(0, 1.5, y.shape) for _ in range(3)]
    better = [y + rng.normal(0, 0.3, y.shape) for _ in range(3)]
    idx = M.bootstrap_indices(80, 300, 0)
    same = M.paired_bootstrap(y, noisy, noisy, [1, 2], idx)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0]
    up = M.paired_bootstrap(y, better, noisy, [1, 2], idx)
    assert up["ci95"][0] > 0 and up["mean"] > 0 and up["p_better"] > 0.95
    # the vectorised resampled tail mAP equals sklearn on one resample
    r = idx[7]
    want = np.mean([average_precision_score(y[r, j], noisy[0][r, j]) for j in (1, 2) if y[r, j].sum() > 0])
    assert M.tail_map_resampled(y, noisy[0], [1, 2], idx[7:8])[0] == pytest.approx(want)


# ---- quality ------------------------------------------------------------------------------------------------


def _fd_direct(x, y):
    from scipy.linalg import sqrtm

    mx, my = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(((mx - my) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm(s1 @ s2).real))


def test_frechet_distance_is_zero_on_itself_grows_with_shift_and_matches_sqrtm():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    y = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) * 0.5
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-8)
    d = [frechet_distance(x, x + s) for s in (0.5, 1.0, 2.0)]
    assert d == pytest.approx([8 * 0.25, 8 * 1.0, 8 * 4.0])  # a pure shift adds |shift|^2
    assert frechet_distance(x, y) == pytest.approx(_fd_direct(x, y), rel=1e-6)
    small_x, small_y = rng.normal(size=(12, 30)), rng.normal(size=(9, 30)) + 0.3  # n < d: singular covariances
    assert frechet_distance(small_x, small_y) == pytest.approx(_fd_direct(small_x, small_y), rel=1e-5)
    assert frechet_distance(small_x, small_x) == pytest.approx(0, abs=1e-8)


def test_knn_precision_recall():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5))
    assert knn_precision_recall(x, x.copy(), 3)[("precision")] == 1.0
    far = knn_precision_recall(x, x + 100, 3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    collapsed = knn_precision_recall(x, np.repeat(x[:1], 50, 0) + 1e-3 * rng.normal(size=(50, 5)), 3)
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.2  # mode collapse: precise, no recall
    assert knn_precision_recall(x[:3], x, 3)["precision"] is None


# ---- budget and resamplers -------------------------------------------------------------------------------------


def test_budget_rules():
    counts = {"h1": 100, "h2": 60, "h3": 80, "t1": 30, "t2": 4, "t3": 0}
    b = budget(counts, ["h1", "h2", "h3"], ["t1", "t2", "t3"])
    assert b["target"] == 80 and b["per_label"] == {"t1": 50, "t2": 16, "t3": 0}  # t2 capped at 5x, t3 has none
    assert budget(counts, ["h1"], ["t1"], strategy_from_flags(balance_to=40))["per_label"] == {"t1": 10}
    assert budget(counts, ["h1"], ["t1", "t3"], strategy_from_flags(per_class=7))["per_label"] == {"t1": 7, "t3": 0}
    # the imbalanced-learn shapes: a ratio of the median head count, target totals, a callable
    assert budget(counts, ["h1", "h2", "h3"], ["t1", "t2"], 0.5)["per_label"] == {"t1": 10, "t2": 16}
    assert budget(counts, ["h1"], ["t1", "t2"], {"t1": 45})["per_label"] == {"t1": 15, "t2": 0}
    assert budget(counts, ["h1"], ["t1", "t2"], lambda c: {k: 2 * v for k, v in c.items()})["per_label"] == {"t1": 30, "t2": 4}
    with pytest.raises(TailfuseError):
        strategy_from_flags(balance_to=-1)
    with pytest.raises(TailfuseError, match="not tail labels"):
        budget(counts, ["h1"], ["t1"], {"h1": 200})
    with pytest.raises(TailfuseError, match="ratio must be > 0"):
        budget(counts, ["h1"], ["t1"], -0.5)
    with pytest.raises(TailfuseError, match="only one of"):
        strategy_from_flags(per_class=3, balance_to=9)


def test_oversampling_gives_the_requested_counts():
    rng = np.random.default_rng(0)
    cls = np.r_[np.zeros(50, int), np.ones(8, int), np.full(5, 2)]
    y = np.eye(3, dtype=int)[cls]
    dup = oversample_rows(y, {1: 12, 2: 20}, multi_label=False, seed=0)
    assert np.bincount(cls[dup], minlength=3).tolist() == [0, 12, 20]
    ym = (rng.random((60, 4)) < [0.6, 0.5, 0.1, 0.05]).astype(int)
    ym[0, 3] = 1
    dup = oversample_rows(ym, {2: 9, 3: 4}, multi_label=True, seed=1)
    assert len(dup) == 13 and ym[dup[:9], 2].all() and ym[dup[9:], 3].all()
    assert not np.array_equal(dup, oversample_rows(ym, {2: 9, 3: 4}, multi_label=True, seed=2))


def test_smote_multiclass_counts_and_interpolation():
    rng = np.random.default_rng(0)
    cls = np.r_[np.zeros(40, int), np.ones(6, int), np.full(3, 2), [3]]
    y = np.eye(4, dtype=int)[cls]
    x = rng.normal(size=(len(cls), 4, 2, 2)).astype(np.float32) + cls[:, None, None, None] * 10
    nx, ny, notes = smote_multiclass(x, y, {1: 10, 2: 5, 3: 2}, k=5, seed=0)
    assert nx.shape == (17, 4, 2, 2) and np.bincount(ny.argmax(1), minlength=4).tolist() == [0, 10, 5, 2]
    assert ny.sum(1).tolist() == [1] * 17 and notes["k_neighbors"] == 2 and "copies" in notes[3]
    for v, c in zip(nx, ny.argmax(1)):  # inside the class's bounding box (convex combinations)
        members = x[cls == c].reshape(-1, 16)
        assert (v.reshape(-1) >= members.min(0) - 1e-5).all() and (v.reshape(-1) <= members.max(0) + 1e-5).all()


def test_mlsmote_counts_labels_and_interpolation():
    rng = np.random.default_rng(0)
    n = 80
    y = np.zeros((n, 4), dtype=int)
    y[:, 0] = rng.random(n) < 0.7
    y[:, 1] = rng.random(n) < 0.4
    y[:8, 2] = 1  # tail label t2 (col 2), co-occurring with col 1 in most of its samples
    y[:7, 1] = 1
    y[40:43, 3] = 1
    x = rng.normal(size=(n, 6)).astype(np.float32)
    nx, ny, prov = mlsmote(x, y, {2: 20, 3: 5}, k=3, seed=0)
    assert nx.shape == (25, 6) and ny.shape == (25, 4) and set(np.unique(ny)) <= {0, 1}
    assert ny[:20, 2].all() and ny[20:, 3].all()  # the minority label is always on
    assert ny[:20, 1].all()  # col 1 is on in >= half of every t2 neighbourhood (7 of 8 samples)
    for v, p in zip(nx, prov):  # seed + u (reference - seed)
        s, r = x[p["seed_row"]], x[p["reference_row"]]
        np.testing.assert_allclose(v, s + p["u"] * (r - s), rtol=1e-5, atol=1e-5)
        assert y[p["seed_row"], p["label_column"]] == 1 and y[p["reference_row"], p["label_column"]] == 1
    again = mlsmote(x, y, {2: 20, 3: 5}, k=3, seed=0)
    np.testing.assert_array_equal(nx, again[0])


def test_mixup_pairs_and_class_weights():
    y = np.zeros((30, 3), int)
    y[:, 0] = 1
    y[:4, 2] = 1
    a, b, lam = mixup_pairs(y, {2: 11}, alpha=0.4, seed=0)
    assert len(a) == 11 and y[a, 2].all() and (lam >= 0.5).all() and (lam <= 1).all()
    w = class_weights(y, multi_label=True)
    assert w.tolist() == pytest.approx([0.0, 1.0, 26 / 4])  # neg/pos; a label without positives gets 1
    yc = np.eye(3, dtype=int)[[0] * 6 + [1] * 3 + [2]]
    assert class_weights(yc, multi_label=False).tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])


# ---- classifiers ----------------------------------------------------------------------------------------------


def _separable(n=120, seed=0):
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    x[np.arange(n), cls] += 3
    return x, np.eye(3, dtype=np.float32)[cls]


def test_linear_classifier_learns_is_deterministic_and_selects_c_on_val():
    x, y = _separable()
    tr, va, te = np.arange(80), np.arange(80, 100), np.arange(100, 120)
    ts = TrainSet(tr, tr, np.ones(80), y[tr])
    p1, info = fit_linear(x, ts, va, y[va], te, multi_label=False, weights=None)
    p2, _ = fit_linear(x, ts, va, y[va], te, multi_label=False, weights=None)
    assert np.array_equal(p1, p2)
    assert np.mean(M.average_precision(y[te], p1)) > 0.9 and np.allclose(p1.sum(1), 1, atol=1e-5)
    assert set(info["val_map_by_c"]) == {f"{c:g}" for c in DEFAULT_C_GRID}
    assert info["val_map"] == pytest.approx(max(v for v in info["val_map_by_c"].values() if v is not None), abs=1e-5)
    assert info["val_map_by_c"][f"{info['c']:g}"] == pytest.approx(info["val_map"], abs=1e-5)
    pm, _ = fit_linear(x, ts, va, y[va], te, multi_label=True, weights=None)
    assert not np.allclose(pm.sum(1), 1)  # sigmoids


def test_linear_classifier_equals_scikit_learn_logistic_regression():
    """The harness's classifier is scikit-learn's LogisticRegression on standardised features at the chosen C: its
    test probabilities equal a plain LogisticRegression fit (the check asked of the evaluation)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = _separable(n=150)
    tr, va, te = np.arange(90), np.arange(90, 120), np.arange(120, 150)
    p, info = fit_linear(x, TrainSet(tr, tr, np.ones(90), y[tr]), va, y[va], te, multi_label=False, weights=None,
                         c_grid=[0.01, 0.1])
    sc = StandardScaler().fit(x[tr])
    ref = LogisticRegression(C=info["c"], max_iter=2000, tol=1e-8).fit(sc.transform(x[tr]), y[tr].argmax(1))
    np.testing.assert_allclose(p, ref.predict_proba(sc.transform(x[te])), atol=2e-3)
    # multi-label: one binary model per label
    ym = (np.random.default_rng(3).random((150, 2)) < 0.4).astype(np.float32)
    ym[:, 0] = np.maximum(ym[:, 0], y[:, 0])
    pm, im = fit_linear(x, TrainSet(tr, tr, np.ones(90), ym[tr]), va, ym[va], te, multi_label=True, weights=None,
                        c_grid=[0.05])
    for j in range(2):
        ref = LogisticRegression(C=0.05, max_iter=2000, tol=1e-8).fit(sc.transform(x[tr]), ym[tr, j])
        np.testing.assert_allclose(pm[:, j], ref.predict_proba(sc.transform(x[te]))[:, 1], atol=2e-3)


def test_soft_targets_and_class_weights_enter_as_exact_sample_weights():
    """Row expansion: the weighted loss of the expanded rows equals the soft-target loss (CE and weighted BCE)."""
    from tailfuse.evaluation.classifier import _expand_binary, _expand_multiclass

    rng = np.random.default_rng(0)
    n, k = 12, 3
    x = rng.normal(size=(n, 5))
    logits = torch.tensor(rng.normal(size=(n, k)))
    y = rng.dirichlet(np.ones(k), n)
    y[:4] = np.eye(k)[[0, 1, 2, 0]]  # some hard rows
    w = np.array([1.0, 2.5, 0.5])
    xs, cls, sw = _expand_multiclass(x, y, w)
    item = [int(np.flatnonzero((x == r).all(1))[0]) for r in xs]
    expanded = float((torch.tensor(sw) * torch.nn.functional.cross_entropy(logits[item], torch.tensor(cls),
                                                                           reduction="none")).sum())
    soft = float(-(torch.tensor(y * w[None]) * torch.log_softmax(logits, 1)).sum())
    assert expanded == pytest.approx(soft, rel=1e-9)
    yj, pw = rng.random(n), 3.0
    yj[:3] = [0.0, 1.0, 1.0]
    xs, yb, sw = _expand_binary(x, yj, pw)
    item = [int(np.flatnonzero((x == r).all(1))[0]) for r in xs]
    z = logits[item, 0]
    expanded = float((torch.tensor(sw) * torch.nn.functional.binary_cross_entropy_with_logits(
        z, torch.tensor(yb, dtype=torch.float64), reduction="none")).sum())
    want = float(torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 0], torch.tensor(yj), pos_weight=torch.tensor(pw), reduction="sum"))
    assert expanded == pytest.approx(want, rel=1e-9)


def test_separability_auc_is_half_for_one_distribution_and_high_for_two():
    from tailfuse.evaluation.quality import separability_auc

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(120, 20)), rng.normal(size=(90, 20))
    same = separability_auc(a, b, seed=0)
    assert same["n_per_class"] == 90 and abs(same["auc"] - 0.5) < 0.12
    shifted = separability_auc(a, b + 1.0, seed=0)
    assert shifted["auc"] > 0.95
    assert separability_auc(a[:3], b, seed=0)["auc"] is None  # too few for 5 folds


@pytest.mark.parametrize("kind", ["cnn", "finetune"])
def test_image_classifiers_train_and_score(kind):
    rng = np.random.default_rng(0)
    cls = np.arange(8) % 2
    imgs = torch.from_numpy(rng.integers(0, 60, (8, 3, 32, 32)).astype(np.uint8))
    imgs[cls == 1, 0] += 150  # red images are class 1
    y = np.eye(2, dtype=np.float32)[cls]
    tr = np.arange(4)
    ts = TrainSet(tr, tr[::-1].copy(), np.r_[np.ones(2), np.full(2, 0.7)], y[tr])  # two mixed items
    p, info = fit_images(kind, imgs, ts, np.arange(4, 6), y[4:6], np.arange(6, 8), multi_label=False, weights=None,
                         seed=0, epochs=1, lr=1e-3, weight_decay=0.0, batch_size=4)
    assert p.shape == (2, 2) and np.isfinite(p).all() and info["best_epoch"] == 0


# ---- end to end on tiny runs ------------------------------------------------------------------------------------


def _tiny_run(root, multi_label: bool, n: int = 90):
    """n images (64 px; 60 % train, 18 % val, the rest test) with a colour cue per label; a tiny VAE; a tiny
    'train' model."""
    from PIL import Image

    vae = str(tiny_autoencoder_tiny(root / "vae"))
    rng = np.random.default_rng(0)
    (root / "in" / "img").mkdir(parents=True)
    colours = {"a": (200, 40, 40), "b": (40, 200, 40), "t1": (40, 40, 220), "t2": (220, 220, 40)}
    rows = []
    for i in range(n):
        split = "train" if i < 0.6 * n else ("val" if i < 0.78 * n else "test")
        t1, t2 = int(i % 7 == 1), int(i % 9 == 4)
        if multi_label:
            lab = {"a": int(i % 2 == 0), "b": int(i % 3 == 0), "t1": t1, "t2": t2}
        else:
            c = "t1" if t1 else "t2" if t2 else ("a" if i % 3 else "b")
            lab = {k: int(k == c) for k in colours}
        img = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
        for k, on in lab.items():
            if on:
                q = list(colours).index(k)
                img[16 * q : 16 * q + 16] = colours[k]
        Image.fromarray(img).save(root / "in" / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "split": split, **lab})
    pd.DataFrame(rows).to_csv(root / "in" / "m.csv", index=False)
    run = root / "run"
    run_encode(DataConfig(data=str(root / "in" / "m.csv"), image_size=64, tail_labels=["t1", "t2"]), VAEConfig(vae=vae),
               EncodeConfig(batch_size=32, shard_size=64), str(run), **QUIET)
    run_train(str(run), TrainConfig(**TINY_TRAIN), **QUIET)
    return run


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("eval-ml"), multi_label=True)


@pytest.fixture(scope="module")
def ml_results(ml_run):
    cfg = EvaluateConfig(seeds=[0, 1, 2], per_class=4, bootstrap=50, threads=2, budgets=[0.5, 1])
    t = time.time()
    res = run_evaluate(str(ml_run), cfg, **QUIET, command="tailfuse evaluate --run RUN --per-class 4")
    return res, time.time() - t


def test_every_arm_end_to_end_multi_label(ml_run, ml_results):
    res, _ = ml_results
    ev = ml_run / "eval"
    on_disk = json.loads((ev / "results.json").read_text())
    assert set(on_disk["arms"]) == set(ARMS)
    for arm, e in on_disk["arms"].items():
        for k in ("map_all", "map_head", "map_tail"):
            assert e[k] is not None and 0 <= e[k] <= 1, (arm, k)
        assert set(e["seeds"]) == {"0", "1", "2"}
        assert set(e["seeds"]["0"]["per_label_ap"]) == {"a", "b", "t1", "t2"}
        if arm != "real":
            d = e["delta_map_tail_vs_real"]
            assert d["ci95"][0] <= d["ci95"][1] and d["n_test"] == on_disk["dataset"]["n"]["test"] == 19
        want_added = 0 if arm in ("real", "reweight") else 8
        assert e["n_added"] == want_added, arm
    # the same number of new samples per tail label in every augmentation arm
    for arm in ("oversample", "smote", "mixup", "vae-roundtrip", "tailfuse", "tailfuse-no-imitation", "reference"):
        added = on_disk["arms"][arm]["added_positives_per_label"]
        least = 2 if arm == "mixup" else 4  # mixup: soft labels, the tail sample's weight lambda >= 0.5
        assert added["t1"] >= least - 1e-9 and added["t2"] >= least - 1e-9, arm
    # image arms: PNG files + manifest rows under <run>/eval/<arm>
    for arm in ("smote", "cmo", "vae-roundtrip", "tailfuse", "tailfuse-no-imitation", "reference"):
        man = pd.read_csv(ev / arm / "manifest.csv")
        assert (man["split"] == "synthetic").all() and set(man.columns) >= {"path", "a", "b", "t1", "t2"}
        assert all((ev / arm / p).is_file() for p in man["path"])
        assert set(man[["a", "b", "t1", "t2"]].to_numpy().ravel()) <= {0, 1}
    over = pd.read_csv(ev / "oversample" / "manifest-seed0.csv")  # duplicates point at the real originals
    assert len(over) == 8 and over["path"].map(lambda p: p in set(RunStore(ml_run).samples()["abs_path"])).all()
    pairs = pd.read_csv(ev / "mixup" / "pairs-seed1.csv")
    assert len(pairs) == 8 and (pairs["lambda"] >= 0.5).all()
    ref = pd.read_csv(ev / "reference" / "samples.csv")
    assert (ref["cam"] == "eigencam").all()
    assert RunStore(ml_run).stage("train-no-imitation")["status"] == "done"  # trained because it was missing
    # the round trip: the tail training images themselves, decoded from their latents, cycled through each label
    rt = pd.read_csv(ev / "vae-roundtrip" / "provenance.csv")
    samples = RunStore(ml_run).samples().set_index("sample_id")
    assert len(rt) == 14 and (rt["tail_label"] == "t1").sum() == 8  # made for the sweep's largest budget (x1)
    for r in rt.itertuples():
        assert samples.loc[r.sample_id, "split"] == "train" and samples.loc[r.sample_id, r.tail_label] == 1
        assert r.path.endswith(f"roundtrip/{r.sample_id:06d}.png")
    q = on_disk["quality"]["sets"]
    assert set(q) == {"floor (real train)", "smote", "cmo", "vae-roundtrip", "tailfuse", "tailfuse-no-imitation",
                      "reference"}
    # CMO: a tail image's box pasted into a training image, the target mixed by the box's exact area
    cmo = pd.read_csv(ev / "cmo" / "provenance.csv")
    assert len(cmo) == 14 and (cmo["tail_label"] == "t1").sum() == 8
    for _, r in cmo.iterrows():
        fg, bg = samples.loc[r["foreground_sample_id"]], samples.loc[r["background_sample_id"]]
        assert fg["split"] == bg["split"] == "train" and fg[r["tail_label"]] == 1
        y0, y1, x0, x1 = json.loads(r["box"])
        lam = r["lambda"]
        assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 64 ** 2)  # the background's kept area
        for lab in ("a", "b", "t1", "t2"):
            assert r[f"soft_{lab}"] == pytest.approx(lam * bg[lab] + (1 - lam) * fg[lab])
    # decision metrics beside mAP, with their intervals against the controls (multi-label: macro-F1, tail recall)
    tf = on_disk["arms"]["tailfuse"]
    assert 0 <= tf["macro_f1"] <= 1 and 0 <= tf["tail_recall"] <= 1 and "balanced_accuracy" not in tf
    assert set(tf["delta_macro_f1"]) == set(tf["delta_tail_recall"]) == {"real", "oversample", "cmo", "vae-roundtrip"}
    assert (ev / "decisions.npz").is_file() and on_disk["protocol"]["selection"] == "map"
    for s in q.values():
        assert s["fid"] >= 0 and s["fd_domain"] >= 0 and s["n_images"] >= 2 and s["n_real_test"] >= 2
        sep = s["separability"]
        assert sep["auc"] is None or 0 <= sep["auc"] <= 1
    # every arm is compared with each control present, and the budget sweep covers every augmentation arm
    assert set(on_disk["arms"]["tailfuse"]["delta_map_tail"]) == {"real", "oversample", "cmo", "vae-roundtrip"}
    sweep = on_disk["sweep"]
    assert set(sweep) == set(ARMS) - {"real", "reweight"}
    assert sweep["tailfuse"]["x0.5"]["per_label"] == {"t1": 4, "t2": 3} and sweep["tailfuse"]["x1"]["per_label"] == {"t1": 8, "t2": 6}
    for rows in sweep.values():
        assert all(v["map_tail"] is not None and v["delta_vs_real"]["n_test"] == 19 for v in rows.values())
    assert (ev / "budget_sweep.png").stat().st_size > 0 and "Budget sweep" in (ev / "results.md").read_text()
    md = (ev / "results.md").read_text()
    assert "mAP tail" in md and "tailfuse-no-imitation" in md and "tailfuse evaluate --run RUN" in md
    assert (ev / "per_label_ap.png").stat().st_size > 0 and (ev / "class_histograms.png").stat().st_size > 0


def test_optional_kept_arm_labels_follow_the_kept_head_region(ml_run, ml_results):
    cfg = EvaluateConfig(seeds=[0], per_class=4, bootstrap=0, quality=False, arms=["real", "tailfuse-kept"])
    res = run_evaluate(str(ml_run), cfg, **QUIET)
    assert res["arms"]["tailfuse-kept"]["n_added"] == 8
    table = pd.read_csv(ml_run / "eval" / "tailfuse-kept" / "samples.csv")
    samples = RunStore(ml_run).samples().set_index("sample_id")
    for _, r in table.iterrows():
        y_t = samples.loc[r["tail_sample_id"], ["a", "b", "t1", "t2"]].to_numpy(int)
        y_h = samples.loc[r["head_sample_id"], ["a", "b", "t1", "t2"]].to_numpy(int)
        want = np.maximum(y_t, y_h) if r["head_specific_kept"] >= 0.5 else y_t
        assert (r[["a", "b", "t1", "t2"]].to_numpy(int) == want).all()
    with pytest.raises(TailfuseError, match="unknown arm"):
        run_evaluate(str(ml_run), EvaluateConfig(arms=["real", "nope"]), **QUIET)


def test_rerun_is_cached_and_identical(ml_run, ml_results):
    res, first = ml_results
    cfg = EvaluateConfig(seeds=[0, 1, 2], per_class=4, bootstrap=50, quality=False, budgets=[0.5, 1],
                         arms=["real", "oversample", "tailfuse", "smote"])
    t = time.time()
    again = run_evaluate(str(ml_run), cfg, **QUIET)
    assert time.time() - t < first / 2
    for arm in cfg.arms:
        assert again["arms"][arm]["map_tail"] == res["arms"][arm]["map_tail"]
        assert again["arms"][arm]["delta_map_tail_vs_real" if arm != "real" else "map_all"] == \
            res["arms"][arm]["delta_map_tail_vs_real" if arm != "real" else "map_all"]


def test_multiclass_run_smote_and_cli(tmp_path):
    run = _tiny_run(tmp_path, multi_label=False, n=60)
    ap = argparse.ArgumentParser()
    add_evaluate_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["evaluate", "--run", str(run), "--arms", "real,reweight,smote,tailfuse,tailfuse[soft_labels=true]", "--seeds", "0,1",
                          "--per-class", "5", "--bootstrap", "20", "--no-quality", "--quiet"])
    assert cmd_evaluate(args) == 0
    res = json.loads((run / "eval" / "results.json").read_text())
    assert "--per-class 5" in res["command"] and "--no-quality" in res["command"]
    for arm in ("real", "reweight", "smote", "tailfuse", "tailfuse[soft_labels=true]"):
        e = res["arms"][arm]
        assert e["balanced_accuracy"] is not None and e["map_tail"] is not None
    man = pd.read_csv(run / "eval" / "smote" / "manifest.csv")
    assert len(man) == 10 and man[["t1", "t2"]].sum().tolist() == [5, 5] and (man[["a", "b", "t1", "t2"]].sum(axis=1) == 1).all()
    # hard labels by default: each fused sample carries its tail label whole
    assert res["arms"]["tailfuse"]["added_positives_per_label"] == {"a": 0, "b": 0, "t1": 5, "t2": 5}
    tf = res["arms"]["tailfuse[soft_labels=true]"]["added_positives_per_label"]
    # multi-class with soft labels: each fused sample's unit of label mass is split between its tail
    # label (1 - h^0.8) and its head image's label (h^0.8), h the head image's share
    assert sum(tf.values()) == pytest.approx(10, abs=0.05) and 0 < tf["t1"] < 5 and 0 < tf["t2"] < 5 and tf["a"] + tf["b"] > 0
    assert res["quality"] is None


def test_errors(tmp_path, ml_run):
    with pytest.raises(TailfuseError, match="unknown arm"):
        run_evaluate(str(ml_run), EvaluateConfig(arms=["real", "gan"]), **QUIET)
    with pytest.raises(TailfuseError, match="either --per-class or --balance-to"):
        run_evaluate(str(ml_run), EvaluateConfig(per_class=3, balance_to=9), **QUIET)
    with pytest.raises(TailfuseError, match="does not exist"):
        run_evaluate(str(tmp_path / "nope"), EvaluateConfig(), **QUIET)
    run = tmp_path / "run"
    shutil.copytree(ml_run, run, ignore=shutil.ignore_patterns("train-no-imitation", "eval"))
    (run / "stages" / "train-no-imitation.json").unlink(missing_ok=True)
    with pytest.raises(TailfuseError, match="no model 'train-no-imitation'"):
        run_evaluate(str(run), EvaluateConfig(arms=["real", "tailfuse-no-imitation"], train_missing=False), **QUIET)


def test_folds_group_and_stratify():
    from tailfuse.evaluation.folds import _split_groups

    strata = np.array(["t"] * 10 + ["h"] * 30, dtype=object)
    groups = np.array([f"p{i // 2}" for i in range(40)], dtype=object)  # patients with two images each
    fold = _split_groups(strata, groups, 5, seed=0)
    assert sorted(np.unique(fold)) == [0, 1, 2, 3, 4]
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1  # a patient never spans two folds
    assert all((strata[fold == k] == "t").sum() >= 1 for k in range(5))  # every fold gets tail images


def test_k_fold_evaluation_pools_every_image_once(ml_run):
    cfg = EvaluateConfig(folds=2, seeds=[0], per_class=3, bootstrap=20, quality=False,
                         arms=["real", "oversample", "vae-roundtrip", "tailfuse"])
    res = run_evaluate(str(ml_run), cfg, **QUIET)
    out = ml_run / "eval" / "folds-2-seed0"
    assert res["output"] == str(out) and (out / "results.json").is_file() and (out / "results.md").is_file()
    samples = RunStore(ml_run).samples()
    with np.load(out / "scores.npz") as z:
        ids = z["test_ids"]
        assert sorted(ids.tolist()) == sorted(samples["sample_id"].tolist())  # every image a test image once
        assert z["tailfuse__main__0"].shape == (len(samples), 4)
    assert res["dataset"]["n"]["test"] == len(samples) == 90
    assert res["arms"]["tailfuse"]["delta_map_tail"]["real"]["n_test"] == 90
    for k in range(2):
        fold = RunStore(out / f"fold-{k}")
        assert fold.stage("train")["status"] == "done"  # the sparse model of the fold
        fs = fold.samples().set_index("sample_id")
        assert set(fs["split"]) == {"train", "val", "test"}
        # the fold's synthetic images come from its own training images only
        prov = pd.read_json(fold.root / "eval" / "tailfuse" / "provenance.jsonl", lines=True)
        assert (fs.loc[prov["tail_sample_id"], "split"] == "train").all()
        assert (fs.loc[prov["head_sample_id"], "split"] == "train").all()
        assert len(fold.latents()) == len(samples)  # read from the parent run, not copied
        assert not (fold.root / "latents").exists()
    tests = [set(RunStore(out / f"fold-{k}").samples().query("split == 'test'")["sample_id"]) for k in range(2)]
    assert not tests[0] & tests[1]
