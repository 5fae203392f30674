"""results.md (markdown tables) and the PNG plots of `tailfuse evaluate`."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _f(v, d=3) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{d}f}"


def _ms(entry: dict, k: str) -> str:
    return f"{_f(entry.get(k))} ± {_f(entry.get(k + '_std'))}" if entry.get(k) is not None else "–"


def results_markdown(r: dict) -> str:
    ds, pr, arms = r["dataset"], r["protocol"], r["arms"]
    multi = ds["multi_label"]
    seeds = pr["seeds"]
    lines = [f"# Downstream evaluation: {Path(r['run']).name}", ""]
    if r.get("command"):
        lines += ["Command:", "", "```", r["command"], "```", ""]
    lines += [
        f"Run `{r['run']}`; {'multi-label' if multi else 'multi-class'}; {ds['n']['train']} train / {ds['n']['val']} val / "
        f"{ds['n']['test']} test images at {ds['image_size']} px. Head: {', '.join(ds['head_labels'])}. "
        f"Tail: {', '.join(ds['tail_labels'])}.",
        f"Classifier: `{pr['classifier']}` ({pr['epochs']} epochs, lr {pr['lr']:g}, selection on val mAP); "
        f"seeds {', '.join(map(str, seeds))}; figures are mean ± standard deviation over seeds, on the test set.",
        f"Budget: {pr['budget']['rule']}: " + ", ".join(f"{k} +{v}" for k, v in pr["budget"]["per_label"].items()) + ".",
        f"Δ tail mAP: arm minus real-only, paired bootstrap over test images ({pr['bootstrap']['resamples']} "
        "resamples, seed-averaged), 95 % interval in brackets.",
    ]
    if ds["labels_without_test_positives"]:
        lines.append(f"Labels without a test positive (left out of every mAP): {', '.join(ds['labels_without_test_positives'])}.")
    lines.append("")
    head = ["arm", "mAP all", "mAP head", "mAP tail", "Δ tail mAP vs real [95% CI]", "AUROC"]
    if not multi:
        head += ["bal. acc."]
    head += ["added", "seconds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, e in arms.items():
        d = e.get("delta_map_tail_vs_real")
        delta = f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "–"
        secs = sum(v for v in e.get("seconds", {}).values() if isinstance(v, (int, float)))
        row = [arm, _ms(e, "map_all"), _ms(e, "map_head"), _ms(e, "map_tail"), delta, _ms(e, "auroc_macro")]
        if not multi:
            row.append(_ms(e, "balanced_accuracy"))
        row += [str(e["n_added"]), f"{secs:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Per-label AP (mean over seeds)", ""]
    labs = ds["labels"]
    lines += ["| arm | " + " | ".join(f"{lab}{' (tail)' if lab in ds['tail_labels'] else ''}" for lab in labs) + " |",
              "|" + "---|" * (len(labs) + 1)]
    for arm, e in arms.items():
        lines.append(f"| {arm} | " + " | ".join(_f(e["per_label_ap"][lab]) for lab in labs) + " |")
    lines.append("| test positives | " + " | ".join(str(ds["test_positives"][lab]) for lab in labs) + " |")
    lines.append("| train positives | " + " | ".join(str(ds["train_positives"][lab]) for lab in labs) + " |")
    q = r.get("quality")
    if q and q.get("sets"):
        lines += ["", "## Image quality of the tail images", "",
                  f"Against {q['n_real_test']} {q['reference_set']}; {q['subsample']}. Lower FID / FD is closer; the "
                  "floor (real train vs real test) is what real images of the same labels score. Precision / recall: "
                  "k-NN manifolds (k = 3), Inception and EfficientNet-Lite0 (domain) features.", "",
                  "| set | images | FID | FD domain | precision | recall | precision (domain) | recall (domain) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in q["sets"].items():
            if "fid" not in s:
                lines.append(f"| {name} | {s.get('n_synthetic', 0)} | – | – | – | – | – | – |")
                continue
            lines.append(f"| {name} | {s['n_images']} of {s['n_available']} | {_f(s['fid'], 1)} | {_f(s['fd_domain'], 1)} | "
                         f"{_f(s['precision'], 2)} | {_f(s['recall'], 2)} | {_f(s['precision_domain'], 2)} | "
                         f"{_f(s['recall_domain'], 2)} |")
    elif q and q.get("note"):
        lines += ["", f"Image quality: {q['note']}."]
    t = r["timings"]
    lines += ["", "## Timings (seconds)", "",
              "| arm | synthetic set, this run | synthetic set, when made (fuse + decode / SMOTE + decode) | classifier (all seeds) |",
              "|---|---|---|---|"]
    for arm, e in arms.items():
        s = e.get("seconds", {})
        made = e.get("synthetic_set") or {}
        made_s = made.get("seconds")
        if made_s is None and made.get("decode_seconds") is not None:
            made_s = (made.get("fuse_seconds") or 0) + made["decode_seconds"]
        lines.append(f"| {arm} | {_f(s.get('synthetic_set'), 1)} | {_f(made_s, 1)} | {_f(s.get('classifier_all_seeds'), 1)} |")
    lines.append("")
    lines.append(f"Total {t['total_seconds']:.0f} s, of which the evaluation (without training missing sparse models) "
                 f"{t.get('evaluation_seconds', t['total_seconds']):.0f} s; EfficientNet-Lite0 features {_f(t.get('features_seconds'), 0)} s "
                 "(cached across runs)" + (f"; quality {q['seconds']:.0f} s" if q and "seconds" in q else "") + ".")
    for k, v in (t.get("extra") or {}).items():
        lines.append(f"{k}: {v} s.")
    return "\n".join(lines) + "\n"


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
    return out
