"""A forest plot of a finished `tailfuse evaluate`: each arm's difference to one control, with its paired bootstrap
95 % interval, in a decision metric and in tail mAP side by side (the README's summary figure).

    python benchmarks/plot_deltas.py benchmarks/results/evaluate-isic2018_lt-5fold-partial.json \
        --control real --out benchmarks/results/evaluate-isic2018_lt-5fold-partial-deltas.png

Reads only the results.json that `tailfuse evaluate` (or bench_evaluate.py) wrote: the differences and intervals are
the tables' own. The decision metric is balanced accuracy on multi-class data, macro-F1 on multi-label data. The
PNG's Description field holds the command and commit that made it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from _results import command_line, commit_line, git_state  # noqa: E402  (benchmarks/, beside this script)
from compare_arms import METRIC_NAMES  # noqa: E402


def rows(res: dict, control: str, metric: str) -> list[tuple[str, float, float, float]]:
    """(arm, mean, low, high) of every arm against ``control`` in ``metric`` (``map_tail`` or a decision metric)."""
    key = "delta_map_tail" if metric == "map_tail" else f"delta_{metric}"
    out = []
    for arm, e in res["arms"].items():
        d = (e.get(key) or {}).get(control)
        if arm != control and d:
            out.append((arm, d["mean"], d["ci95"][0], d["ci95"][1]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="results.json of a finished evaluation")
    ap.add_argument("--control", default="real")
    ap.add_argument("--out", type=Path, required=True, help="PNG file")
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    res = json.loads(a.results.read_text())
    decision = "macro_f1" if res["dataset"]["multi_label"] else "balanced_accuracy"
    panels = [(m, rows(res, a.control, m)) for m in (decision, "map_tail")]
    if not any(r for _, r in panels):
        raise SystemExit(f"{a.results}: no arm has differences to '{a.control}' (bootstrap 0, or the control missing)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r[0] for r in panels[0][1]] or [r[0] for r in panels[1][1]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(arms) + 1.6), sharey=True)
    for ax, (metric, rs) in zip(axes, panels):
        by = {r[0]: r for r in rs}
        for i, arm in enumerate(arms):
            if arm not in by:
                continue
            _, m, lo, hi = by[arm]
            colour = "tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:grey"
            ax.errorbar(m, i, xerr=[[m - lo], [hi - m]], fmt="o", color=colour, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"Δ {METRIC_NAMES[metric]} vs {a.control} (95 % interval)")
        ax.grid(axis="x", alpha=0.3)
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    axes[0].set_yticks(range(len(arms)))
    axes[0].set_yticklabels(arms)
    axes[0].invert_yaxis()
    fig.suptitle(a.title or f"{Path(res['run']).name}: {res['protocol'].get('classifier')} classifier, "
                 f"arm minus {a.control}")
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    made = " ".join(x for x in (f"Made by {command_line()}.", commit_line(git_state())) if x)
    fig.savefig(a.out, dpi=110, metadata={"Description": made})  # the PNG says what made it (a tEXt chunk)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
