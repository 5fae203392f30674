"""Evaluation as users train (issue 27): decision metrics with val thresholds, a partial fine-tune of EfficientNet-Lite0
on frozen maps, deferred re-weighting, pools drawn afresh each epoch, and CMO, end to end on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score

from tailfuse.errors import TailfuseError
from tailfuse.evaluation import metrics as M
from tailfuse.evaluation.classifier import PartialMaps, PartialNet, TrainSet, fit_images
from tailfuse.evaluation.config import EvaluateConfig
from tailfuse.evaluation.features import Backbone
from tailfuse.evaluation.harness import _draw_per_label, run_evaluate

from test_evaluate import _tiny_run


def test_decision_metrics_match_sklearn_and_val_thresholds_maximise_val_f1():
    rng = np.random.default_rng(0)
    y = np.eye(5)[rng.integers(0, 5, 300)]
    s = rng.random((300, 5)) + 0.3 * y
    d = M.decisions(s, multi_label=False)
    dm = M.decision_metrics(y, d, tail_idx=[3, 4])
    yt, yp = y.argmax(1), s.argmax(1)
    assert dm["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yt, yp))
    assert dm["macro_f1"] == pytest.approx(f1_score(yt, yp, average="macro"))
    assert dm["tail_recall"] == pytest.approx(recall_score(yt, yp, average=None)[[3, 4]].mean())
    whole = np.arange(len(yt))[None]
    assert M.decision_metrics_resampled("tail_precision", y, d, [3, 4], whole)[0] == pytest.approx(
        precision_score(yt, yp, average=None, zero_division=0)[[3, 4]].mean())
    ym = (rng.random((300, 4)) < 0.2).astype(int)
    sm = rng.random((300, 4)) + 0.4 * ym
    t = M.val_thresholds(ym[:120], sm[:120])
    for j in range(4):  # no threshold does better on val than the one chosen
        best = max(f1_score(ym[:120, j], sm[:120, j] >= c) for c in np.unique(sm[:120, j]))
        assert f1_score(ym[:120, j], sm[:120, j] >= t[j]) == pytest.approx(best)
    dd = M.decisions(sm[120:], multi_label=True, thresholds=t)
    assert M.decision_metrics(ym[120:], dd, [2, 3])["macro_f1"] == pytest.approx(f1_score(ym[120:], dd, average="macro"))
    # the paired bootstrap of a decision metric: zero for identical arms, positive for a better one
    idx = M.bootstrap_indices(len(yt), 200, 0)
    same = M.paired_bootstrap(y, [d], [d], [3, 4], idx, metric="balanced_accuracy")
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0]
    better = M.decisions(s + 0.5 * y, multi_label=False)
    up = M.paired_bootstrap(y, [better], [d], [3, 4], idx, metric="tail_recall")
    assert up["mean"] > 0 and up["ci95"][0] > 0


def test_the_partial_network_is_the_whole_network_split_in_two():
    """The frozen maps plus the trained blocks reproduce EfficientNet-Lite0's own features at the run's image size,
    and the mirror image's maps are those of the flipped image."""
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    trunk = PartialMaps(trainable_blocks=3, image_size=64)
    maps = trunk.unflatten(trunk(x).numpy())
    assert maps.shape == (3, 2, *trunk.shape) and trunk.first == 13
    net = PartialNet(n_out=2, trainable_blocks=3).eval()
    with torch.no_grad():
        h = maps[:, 0]
        for b in net.blocks:
            h = b(h)
        mine = net.act(net.bn1(net.conv_head(h))).mean((2, 3))
        whole = Backbone().net.extract_features((x * 255 - 127) / 128).mean((2, 3))
        torch.testing.assert_close(mine, whole, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(maps[:, 1], trunk.unflatten(trunk(x.flip(-1)).numpy())[:, 0], rtol=1e-5, atol=1e-5)


def _toy_maps(n=24, seed=0):
    """Frozen maps of 64 px images: class 1 images are red."""
    rng = np.random.default_rng(seed)
    cls = np.arange(n) % 2
    imgs = rng.random((n, 3, 64, 64)).astype(np.float32) * 0.3
    imgs[cls == 1, 0] += 0.6
    trunk = PartialMaps(trainable_blocks=1, image_size=64)
    return trunk.unflatten(trunk(torch.from_numpy(imgs)).numpy()), np.eye(2, dtype=np.float32)[cls]


def test_partial_fine_tune_learns_and_deferred_reweighting_starts_late():
    maps, y = _toy_maps()
    tr, va, te = np.arange(12), np.arange(12, 18), np.arange(18, 24)
    ts = TrainSet(tr, tr, np.ones(12), y[tr])
    kw = dict(multi_label=False, seed=0, epochs=10, lr=3e-3, weight_decay=0.0, batch_size=4, trainable_blocks=1,
              select="balanced_accuracy")
    p, info = fit_images("partial", maps, ts, va, y[va], te, weights=None, **kw)
    assert p.shape == (6, 2) and info["select"] == "balanced_accuracy" and info["val_scores"].shape == (6, 2)
    assert (p.argmax(1) == y[te].argmax(1)).mean() >= 5 / 6  # red or not: learned from the frozen maps
    w = torch.tensor([1.0, 5.0])
    late, _ = fit_images("partial", maps, ts, va, y[va], te, weights=w, weights_from=10, **kw)  # never reached
    np.testing.assert_array_equal(late, p)
    early, _ = fit_images("partial", maps, ts, va, y[va], te, weights=w, weights_from=0, **kw)
    assert not np.array_equal(early, p)


def test_a_pool_is_drawn_afresh_each_epoch_and_the_same_for_a_seed():
    tl = ["a"] * 10 + ["b"] * 15
    fixed = _draw_per_label(tl, {"a": 2, "b": 3}, 1, seed=0, epoch=5)
    assert fixed.tolist() == [0, 1, 10, 11, 12]  # pool 1: the first n_l of each label, every epoch
    draws = [_draw_per_label(tl, {"a": 2, "b": 3}, 4, seed=0, epoch=e) for e in range(6)]
    for d in draws:
        assert len(d) == 5 and len(set(d)) == 5 and set(d) <= set(range(8)) | set(range(10, 22))  # pool: 4 x n_l
    assert len({tuple(d) for d in draws}) > 1
    np.testing.assert_array_equal(draws[2], _draw_per_label(tl, {"a": 2, "b": 3}, 4, seed=0, epoch=2))


@pytest.mark.slow
def test_evaluate_with_the_partial_fine_tune_cmo_drw_and_a_pool(tmp_path):
    run = _tiny_run(tmp_path, multi_label=False, n=60)
    with pytest.raises(TailfuseError, match="trained in epochs"):
        run_evaluate(str(run), EvaluateConfig(arms=["real", "drw"], seeds=[0]), progress=False)
    cfg = EvaluateConfig(arms=["real", "drw", "oversample", "cmo", "tailfuse"], seeds=[0], classifier="partial",
                         trainable_blocks=1, epochs=2, per_class=4, pool=2, bootstrap=30, quality=False)
    res = run_evaluate(str(run), cfg, progress=False)
    assert res["protocol"]["selection"] == "balanced_accuracy"  # multi-class: the decision metric picks the epoch
    for arm, e in res["arms"].items():
        assert 0 <= e["balanced_accuracy"] <= 1 and 0 <= e["macro_f1"] <= 1, arm
        if arm != "real":
            assert set(e["delta_balanced_accuracy"]) >= {"real"} and e["delta_tail_recall"]["real"]["n_test"] == 13
    assert res["arms"]["drw"]["n_added"] == 0 and res["arms"]["cmo"]["n_added"] == 8
    made = json.loads((run / "eval" / "results.json").read_text())["arms"]["tailfuse"]["synthetic_set"]
    assert made["n_made"] == 16  # pool 2: twice the budget made, the budget drawn from it each epoch
    md = (run / "eval" / "results.md").read_text()
    assert "## Decisions: balanced accuracy, macro-F1 and tail recall" in md and "pool of 2x the budget" in md
    assert "chosen by val balanced accuracy);" in md  # the selection named once


def test_a_multi_label_table_heads_its_decisions_with_the_metrics_it_has():
    from tailfuse.evaluation.tables import _md_decisions

    arms = {"real": {"macro_f1": 0.16, "tail_recall": 0.2},
            "cmo": {"macro_f1": 0.15, "tail_recall": 0.23,
                    "delta_macro_f1": {"real": {"mean": -0.006, "ci95": [-0.035, 0.025]}}}}
    lines = _md_decisions(arms, ["macro_f1", "tail_recall"], ["real"])
    assert lines[0] == "## Decisions: macro-F1 and tail recall"  # no balanced accuracy on multi-label data
    assert lines[2] == "| arm | macro-F1 | tail recall | Δ macro-F1 vs real | Δ tail recall vs real |"
    assert lines[5].startswith("| cmo | 0.150 ± – | 0.230 ± – | -0.006 [-0.035, +0.025] | – |")
    alone = _md_decisions({"cmo": arms["cmo"]}, ["macro_f1", "tail_recall"], [])  # no control among the arms
    assert alone[2:] == ["| arm | macro-F1 | tail recall |", "|---|---|---|", "| cmo | 0.150 ± – | 0.230 ± – |"]


def test_the_weighted_loss_weights_each_arm_by_its_own_training_set():
    from tailfuse.evaluation.harness import loss_weights

    y_real = np.eye(3)[[0] * 8 + [1] * 4 + [2] * 2].astype(np.float32)
    y_arm = np.r_[y_real, np.eye(3)[[2] * 6]].astype(np.float32)  # the arm tops label 2 up to 8
    assert loss_weights("ce", "oversample", y_real, y_arm, False) is None
    np.testing.assert_allclose(loss_weights("ce", "reweight", y_real, y_real, False), [14 / 24, 14 / 12, 14 / 6])
    np.testing.assert_allclose(loss_weights("weighted", "oversample", y_real, y_arm, False), [20 / 24, 20 / 12, 20 / 24])
    soft = y_arm.copy()
    soft[-6:] = [0.5, 0, 0.5]  # soft targets count by their mass
    np.testing.assert_allclose(loss_weights("weighted", "tailfuse", y_real, soft, False), [20 / 33, 20 / 12, 20 / 15])


@pytest.mark.slow
def test_under_the_weighted_loss_real_is_the_reweighted_baseline(tmp_path):
    run = _tiny_run(tmp_path, multi_label=False, n=60)
    common = dict(seeds=[0], per_class=4, bootstrap=0, quality=False)
    with pytest.raises(TailfuseError, match="leave reweight out"):
        run_evaluate(str(run), EvaluateConfig(arms=["real", "reweight"], loss="weighted", **common), progress=False)
    plain = run_evaluate(str(run), EvaluateConfig(arms=["reweight", "oversample"], **common), progress=False)
    weighted = run_evaluate(str(run), EvaluateConfig(arms=["real", "oversample"], loss="weighted", **common),
                            progress=False)
    assert weighted["arms"]["real"]["map_all"] == pytest.approx(plain["arms"]["reweight"]["map_all"], abs=1e-9)
    assert weighted["arms"]["oversample"]["map_all"] != pytest.approx(plain["arms"]["oversample"]["map_all"], abs=1e-6)
    assert "Loss: class-weighted for every arm" in (run / "eval" / "results.md").read_text()
