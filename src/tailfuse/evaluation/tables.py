"""results.md (markdown tables) and the PNG plots of `tailfuse evaluate`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import CONTROLS


def _f(v, d=3) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{d}f}"


def _ms(entry: dict, k: str) -> str:
    return f"{_f(entry.get(k))} ± {_f(entry.get(k + '_std'))}" if entry.get(k) is not None else "–"


def _ci(d: dict | None) -> str:
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "–"


DECISION_NAMES = {"balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1", "tail_recall": "tail recall"}


def results_markdown(r: dict) -> str:
    """results.md: what was measured and how, then the tables (decisions first for a classifier that learns, the
    mAP ranking, per-label AP, the budget sweep, image quality, selection) and the timings."""
    arms = r["arms"]
    decided = [m for m in DECISION_NAMES if any(m in e for e in arms.values())]
    controls = [c for c in CONTROLS if c in arms]
    lines = _md_protocol(r, decided)
    if decided and r["protocol"]["classifier"] != "linear":  # a classifier that learns: lead with the decisions
        lines += _md_decisions(arms, decided, controls) + ["", "## Ranking: mAP", ""]
    lines += _md_ranking(arms, r["dataset"]["multi_label"], decided, controls)
    lines += _md_per_label(r)
    lines += _md_sweep(r.get("sweep") or {}, arms)
    lines += _md_quality(r.get("quality"), bool(r.get("folds")))
    lines += _md_selection(arms)
    lines += _md_timings(r)
    return "\n".join(lines) + "\n"


def _md_protocol(r: dict, decided: list[str]) -> list[str]:
    """The title, the command, and a paragraph on the data, classifier, loss, decisions, budget and intervals."""
    ds, pr = r["dataset"], r["protocol"]
    multi = ds["multi_label"]
    seeds = pr["seeds"]
    cs = pr["classifier_settings"]
    folds = r.get("folds")
    lines = [f"# Downstream evaluation: {Path(r['run']).name}" + (f" ({folds['k']}-fold)" if folds else ""), ""]
    if r.get("command"):
        lines += ["Command:", "", "```", r["command"], "```", ""]
    if folds:
        lines.append(f"{folds['k']}-fold evaluation of the whole pipeline ({folds['method']}): every one of the "
                     f"{ds['n']['test']} images is a test image once; per fold {folds['n_train_mean']:.0f} train / "
                     f"{folds['n_val_mean']:.0f} val images on average. Figures rest on the pooled test predictions.")
    else:
        lines.append(f"{ds['n']['train']} train / {ds['n']['val']} val / {ds['n']['test']} test images.")
    lines += [
        f"Run `{r['run']}`; {'multi-label' if multi else 'multi-class'}; {ds['image_size']} px. "
        f"Head: {', '.join(ds['head_labels'])}. Tail: {', '.join(ds['tail_labels'])}.",
    ]
    if pr["classifier"] == "linear":
        lines.append(f"Classifier: logistic regression on frozen EfficientNet-Lite0 features, C picked per arm on val "
                     f"mAP from {', '.join(f'{c:g}' for c in cs['c_grid'])}; seeds {', '.join(map(str, seeds))} "
                     "(they vary the arms' random draws; the fit itself is deterministic); figures are mean ± "
                     "standard deviation over seeds.")
    else:
        what = {"partial": f"the last {cs.get('trainable_blocks')} blocks of EfficientNet-Lite0 (ImageNet) and a new "
                           "head trained on frozen maps at the run's image size",
                "finetune": "EfficientNet-Lite0, all layers", "cnn": "a small CNN from scratch"}.get(pr["classifier"], "")
        # the recorded name ends in " (epoch and weight decay)", which this sentence says itself; the record keeps it
        # (it is part of every fit's cache key)
        chosen_by = cs.get("selection", "val mAP").removesuffix(" (epoch and weight decay)")
        lines.append(f"Classifier: `{pr['classifier']}`, {what} ({pr['epochs']} epochs, lr {pr['lr']:g}, weight decay "
                     f"picked on val from {', '.join(f'{w:g}' for w in cs['weight_decay_grid'])}, epoch and weight "
                     f"decay chosen by {chosen_by}); seeds {', '.join(map(str, seeds))}; figures "
                     "are mean ± standard deviation over seeds."
                     + (f" Image arms draw their images afresh each epoch from a pool of {cs['pool']}x the budget."
                        if cs.get("pool") else ""))
    if cs.get("loss") == "weighted":
        lines.append("Loss: class-weighted for every arm, the weights from the class counts of the arm's own training "
                     "set (real plus added); `real` is therefore the re-weighted baseline.")
    if decided:
        lines.append("Decisions: " + ("the argmax class" if not multi else "each label's score against the threshold "
                     "that maximised its F1 on val (chosen within each split or fold)") + "; "
                     + ("balanced accuracy (mean recall over classes), " if "balanced_accuracy" in decided else "")
                     + "macro-F1 (mean F1 over labels) and tail recall (mean recall over tail labels) of those "
                     "decisions.")
    lines += [
        f"Budget: {pr['budget']['rule']}: " + ", ".join(f"{k} +{v}" for k, v in pr["budget"]["per_label"].items()) + ".",
        f"Δ tail mAP: arm minus control, paired bootstrap over test images ({pr['bootstrap']['resamples']} "
        "resamples, seed-averaged), 95 % interval in brackets.",
    ]
    if ds["labels_without_test_positives"]:
        lines.append(f"Labels without a test positive (left out of every mAP): {', '.join(ds['labels_without_test_positives'])}.")
    lines.append("")
    return lines


def _md_decisions(arms: dict, decided: list[str], controls: list[str]) -> list[str]:
    """The decision metrics and their differences to each control (the lead metric's and tail recall's)."""
    lead = [m for m in decided if m != "tail_recall"][0]
    names = [DECISION_NAMES[m] for m in decided]
    head = ["arm", *names, *(f"Δ {DECISION_NAMES[lead]} vs {c}" for c in controls),
            *(f"Δ tail recall vs {c}" for c in controls)]
    lines = [f"## Decisions: {', '.join(names[:-1])} and {names[-1]}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, e in arms.items():
        row = [arm, *(_ms(e, m) for m in decided),
               *(_ci((e.get(f"delta_{lead}") or {}).get(c)) for c in controls),
               *(_ci((e.get("delta_tail_recall") or {}).get(c)) for c in controls)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _md_ranking(arms: dict, multi: bool, decided: list[str], controls: list[str]) -> list[str]:
    """mAP (all, head, tail), tail mAP's differences to each control, AUROC and the decision metrics."""
    head = ["arm", "mAP all", "mAP head", "mAP tail"] + [f"Δ tail vs {c}" for c in controls] + ["AUROC"]
    if not multi:
        head += ["bal. acc."]
    if "macro_f1" in decided:
        head += ["macro-F1"]
    head += ["added"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, e in arms.items():
        row = [arm, _ms(e, "map_all"), _ms(e, "map_head"), _ms(e, "map_tail")]
        row += [_ci((e.get("delta_map_tail") or {}).get(c)) for c in controls]
        row.append(_ms(e, "auroc_macro"))
        if not multi:
            row.append(_ms(e, "balanced_accuracy"))
        if "macro_f1" in decided:
            row.append(_ms(e, "macro_f1"))
        row += [str(e["n_added"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _md_per_label(r: dict) -> list[str]:
    ds, arms = r["dataset"], r["arms"]
    labs = ds["labels"]
    lines = ["", "## Per-label AP (mean over seeds)", "",
             "| arm | " + " | ".join(f"{lab}{' (tail)' if lab in ds['tail_labels'] else ''}" for lab in labs) + " |",
             "|" + "---|" * (len(labs) + 1)]
    for arm, e in arms.items():
        lines.append(f"| {arm} | " + " | ".join(_f(e["per_label_ap"][lab]) for lab in labs) + " |")
    lines.append("| test positives | " + " | ".join(str(ds["test_positives"][lab]) for lab in labs) + " |")
    lines.append("| train positives | " + " | ".join(str(ds["train_positives"][lab]) for lab in labs) + " |")
    return lines


def _md_sweep(sweep: dict, arms: dict) -> list[str]:
    """Tail mAP by synthetic budget, against real and (where present) oversample and vae-roundtrip."""
    if not sweep:
        return []
    keys = list(next(iter(sweep.values())))
    real_tail = arms.get("real", {}).get("map_tail")
    columns = ["| arm | " + " | ".join(f"{sweep[next(iter(sweep))][k]['multiple']:g}x" for k in keys) + " |",
               "|" + "---|" * (len(keys) + 1)]
    lines = ["", "## Budget sweep: tail mAP by synthetic budget", "",
             "Each augmentation arm at multiples of each tail label's real train count"
             + (f"; real-only tail mAP {real_tail:.3f}" if real_tail is not None else "")
             + ". Cells: tail mAP (Δ vs real [95% CI]).", "", *columns]
    for arm, rows in sweep.items():
        lines.append(f"| {arm} | " + " | ".join(f"{_f(rows[k]['map_tail'])} ({_ci(rows[k].get('delta_vs_real'))})"
                                                 for k in keys) + " |")
    for c in ("oversample", "vae-roundtrip"):
        if any(f"delta_vs_{c}" in rows[k] for rows in sweep.values() for k in keys):
            lines += ["", f"Δ tail mAP vs {c} at the same budget:", "", *columns]
            for arm, rows in sweep.items():
                if arm == c:
                    continue
                lines.append(f"| {arm} | " + " | ".join(_ci(rows[k].get(f"delta_vs_{c}")) for k in keys) + " |")
    return lines


def _md_quality(q: dict | None, folds: bool) -> list[str]:
    if q and q.get("sets"):
        lines = ["", "## Image quality of the tail images", "",
                 f"Against {q['n_real_test']} {q['reference_set']}; {q['subsample']}. Lower FID / FD is closer; the "
                 "floor (real train vs real test) is what real images of the same labels score. Precision / recall: "
                 "k-NN manifolds (k = 3), Inception and EfficientNet-Lite0 (domain) features. Separability: AUC of a "
                 "cross-validated logistic regression telling the set's images from the real tail training images "
                 "on the frozen EfficientNet-Lite0 features (0.5 = indistinguishable; the floor row: real test images). "
                 "Near-copies: share of images that copy a real training image, whole or in part (tailfuse.nearcopy: "
                 "a pixel region closer to one training image than all but 2 % of the training images are to their "
                 "nearest other one, or nearest / second nearest below 1/3; the floor row: real test images)."
                 + (" Fold figures are means over folds." if folds else ""), "",
                 "| set | images | FID | FD domain | precision | recall | precision (domain) | recall (domain) | separability AUC | near-copies |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in q["sets"].items():
            if "fid" not in s:
                lines.append(f"| {name} | {s.get('n_synthetic', 0)} | – | – | – | – | – | – | – | – |")
                continue
            sep = (s.get("separability") or {}).get("auc")
            mem = (s.get("memorisation") or {}).get("share")
            lines.append(f"| {name} | {s['n_images']} of {s['n_available']} | {_f(s['fid'], 1)} | {_f(s['fd_domain'], 1)} | "
                         f"{_f(s['precision'], 2)} | {_f(s['recall'], 2)} | {_f(s['precision_domain'], 2)} | "
                         f"{_f(s['recall_domain'], 2)} | {_f(sep, 3)} | {_f(mem, 3)} |")
        return lines
    return ["", f"Image quality: {q['note']}."] if q and q.get("note") else []


def _md_selection(arms: dict) -> list[str]:
    sel = {a: e["synthetic_set"]["selection"] for a, e in arms.items() if (e.get("synthetic_set") or {}).get("selection")}
    if not sel:
        return []
    lines = ["", "## Selection", "", "| arm | candidates per sample | candidates | near-copies | kept |",
             "|---|---|---|---|---|"]
    for a, s in sel.items():
        lines.append(f"| {a} | {s['candidates_per_sample']} | {s['n_candidates']} | {s['n_near_copies']} | {s['n_selected']} |")
    return lines


def _md_timings(r: dict) -> list[str]:
    t, q = r["timings"], r.get("quality")
    lines = ["", "## Timings", ""]
    for arm, e in r["arms"].items():
        s = (t.get("per_arm") or {}).get(arm) or {}
        made = e.get("synthetic_set") or {}
        made_s = made.get("seconds")
        if made_s is None and made.get("decode_seconds") is not None:
            made_s = sum(made.get(k) or 0 for k in ("fuse_seconds", "refine_seconds", "sample_seconds", "decode_seconds"))
        parts = [f"{k.replace('_', ' ')} {v:.1f} s" for k, v in s.items() if isinstance(v, (int, float))]
        if made_s is not None:
            parts.append(f"set made in {made_s:.1f} s")
        lines.append(f"- {arm}: " + ("; ".join(parts) if parts else "–"))
    lines.append("")
    lines.append(f"Total {t['total_seconds']:.0f} s, of which the evaluation (without training missing sparse models) "
                 f"{t.get('evaluation_seconds', t['total_seconds']):.0f} s; EfficientNet-Lite0 features {_f(t.get('features_seconds'), 0)} s "
                 "(cached across runs)" + (f"; quality {q['seconds']:.0f} s" if q and "seconds" in q else "") + ".")
    for k, v in (t.get("extra") or {}).items():
        lines.append(f"{k}: {v} s.")
    return lines


def plots(r: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds, arms = r["dataset"], r["arms"]
    labs = ds["labels"]
    names = list(arms)
    out = []
    x = np.arange(len(labs))
    w = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labs) + 2), 4.5))
    for i, a in enumerate(names):
        m = [arms[a]["per_label_ap"][lab] for lab in labs]
        s = [arms[a]["per_label_ap_std"][lab] for lab in labs]
        m = [np.nan if v is None else v for v in m]
        s = [0 if v is None else v for v in s]
        ax.bar(x + (i - (len(names) - 1) / 2) * w, m, w, yerr=s, label=a, capsize=1.5)
    ax.set_xticks(x, [f"{lab}\n(tail)" if lab in ds["tail_labels"] else lab for lab in labs], rotation=0 if len(labs) < 9 else 60, fontsize=8)
    ax.set_ylabel("test AP (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Per-label AP per arm, n_test = {ds['n']['test']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = folder / "per_label_ap.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(str(p))

    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labs) + 2), 4.5))
    hist_arms = [a for a in names if arms[a]["n_added"] > 0]
    sets = [("real train (before)", {lab: ds["train_positives"][lab] for lab in labs})] + \
           [(f"{a} (after)", arms[a]["train_positives_per_label"]) for a in hist_arms]
    w = 0.8 / len(sets)
    for i, (name, counts) in enumerate(sets):
        ax.bar(x + (i - (len(sets) - 1) / 2) * w, [max(counts[lab], 1e-1) for lab in labs], w, label=name)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{lab}\n(tail)" if lab in ds["tail_labels"] else lab for lab in labs], rotation=0 if len(labs) < 9 else 60, fontsize=8)
    ax.set_ylabel("training positives (log)")
    ax.set_title("Class histogram of the training set before and after augmentation")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = folder / "class_histograms.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(str(p))

    sweep = r.get("sweep") or {}
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for a, rows in sweep.items():
            xs = [v["multiple"] for v in rows.values()]
            ys = [np.nan if v["map_tail"] is None else v["map_tail"] for v in rows.values()]
            ax.plot(xs, ys, marker="o", label=a)
        if arms.get("real", {}).get("map_tail") is not None:
            ax.axhline(arms["real"]["map_tail"], color="k", ls="--", lw=1, label="real only")
        ax.set_xscale("log")
        ax.set_xticks([v["multiple"] for v in next(iter(sweep.values())).values()],
                      [f"{v['multiple']:g}x" for v in next(iter(sweep.values())).values()])
        ax.set_xlabel("new samples per tail label (multiple of its real train count)")
        ax.set_ylabel("test tail mAP (mean over seeds)")
        ax.set_title("Tail mAP against the synthetic budget")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = folder / "budget_sweep.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(str(p))
    return out
