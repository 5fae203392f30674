"""Paired differences (tail mAP, or a decision metric with --metric) between any two arms of a finished
`tailfuse evaluate`, from its saved predictions.

    python benchmarks/compare_arms.py RESULTS_DIR --pairs 'A:B;C:D' [--metric balanced_accuracy] [--out FILE.md] [--json FILE.json]

RESULTS_DIR is the folder with the evaluation's results.json and scores.npz (`<run>/eval`, or the pooled folder of a
`--folds K` evaluation). The tables of `tailfuse evaluate` give each arm against the controls (real, oversample, cmo,
vae-roundtrip); this gives arm A minus arm B for any pair, e.g. one fusion setting against another, with the same
paired bootstrap over test images (seed-averaged, the evaluation's own resample count and seed). FID and
separability AUC of both arms are shown beside it when the evaluation measured them. Prints a markdown table;
``--out`` appends it to a file as a section, with the command; ``--json`` stores the pairs under the key 'pairs'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from _results import command_line, commit_line, git_state  # noqa: E402  (benchmarks/, beside this script)
from tailfuse.evaluation.config import EvaluateConfig  # noqa: E402
from tailfuse.evaluation.harness import MAIN, load_scores, tail_delta  # noqa: E402
from tailfuse.evaluation.tables import DECISION_NAMES  # noqa: E402


def pair_rows(raw: dict, cfg: EvaluateConfig, pairs: list[tuple[str, str]], metric: str = "map_tail") -> list[dict]:
    """Arm A minus arm B in ``metric`` (tail mAP, or a decision metric: balanced_accuracy, macro_f1, tail_recall,
    tail_precision) at the main budget, for each (A, B), on raw predictions."""
    if not cfg.bootstrap:
        raise SystemExit("pairwise differences need bootstrap resamples (the evaluation ran with --bootstrap 0)")
    if metric != "map_tail" and not raw.get("decisions"):
        raise SystemExit(f"--metric {metric} needs the evaluation's decisions.npz (written since the decision metrics)")
    delta = tail_delta(raw, cfg, metric)
    known = {k.split("|")[0] for k in raw["scores"]}
    for a, b in pairs:
        for arm in (a, b):
            if arm not in known:
                raise SystemExit(f"arm '{arm}' is not in the evaluation; it has {', '.join(sorted(known))}")
    return [{"a": a, "b": b, "metric": metric, **delta(a, MAIN, b)} for a, b in pairs]


# the tables' names of their decision metrics, and the one compared here only (metrics.EXTRA_DECISION_METRICS)
METRIC_NAMES = {"map_tail": "tail mAP", **DECISION_NAMES, "tail_precision": "tail precision"}


def pairs_markdown(rows: list[dict], quality: dict | None = None) -> str:
    sets = (quality or {}).get("sets", {})

    def q(arm: str) -> str:
        s = sets.get(arm)
        if not s:
            return "-"
        return f"{s['fid']:.0f} / {s['separability']['auc']:.3f}" if s.get("separability") else f"{s['fid']:.0f} / -"

    name = METRIC_NAMES[rows[0].get("metric", "map_tail")] if rows else "tail mAP"
    lines = [f"## Pairwise differences: {name}", "",
             f"{name[0].upper() + name[1:]} of arm A minus arm B, paired bootstrap over test images (seed-averaged), "
             "95 % interval; "
             "FID / separability AUC of each arm's tail images where measured.", "",
             f"| A | B | Δ {name} | 95 % interval | share of resamples A better | A: FID / sep. | B: FID / sep. |",
             "|---|---|---|---|---|---|---|"]
    for p in rows:
        lines.append(f"| {p['a']} | {p['b']} | {p['mean']:+.3f} | [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] | "
                     f"{p['p_better']:.2f} | {q(p['a'])} | {q(p['b'])} |")
    return "\n".join(lines) + "\n"


def parse_pairs(text: str) -> list[tuple[str, str]]:
    out = []
    for part in [p for p in text.split(";") if p.strip()]:
        a, sep, b = part.partition(":")
        if not sep or not a.strip() or not b.strip():
            raise SystemExit(f"--pairs: '{part}' is not A:B")
        out.append((a.strip(), b.strip()))
    return out


def load(results_dir: Path) -> tuple[dict, EvaluateConfig, dict]:
    """The raw predictions (as ``summarise`` takes them), the evaluation's seeds / bootstrap, and its results."""
    res_file, npz_file = results_dir / "results.json", results_dir / "scores.npz"
    for f in (res_file, npz_file):
        if not f.is_file():
            raise SystemExit(f"{f} is missing: give the folder of a finished `tailfuse evaluate`")
    res = json.loads(res_file.read_text())
    proto = res["protocol"]
    cfg = EvaluateConfig(seeds=list(proto["seeds"]), bootstrap=int((proto["bootstrap"] or {}).get("resamples", 0)),
                         data_seed=int(proto["data_seed"]))
    raw = {"meta": res["dataset"], **load_scores(results_dir)}
    return raw, cfg, res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--pairs", required=True, help="A:B;C:D (';' between pairs: arm names may hold commas)")
    ap.add_argument("--metric", default="map_tail", choices=list(METRIC_NAMES),
                    help="what is compared (default tail mAP; the decision metrics need decisions.npz)")
    ap.add_argument("--out", type=Path, help="markdown file to append the table to")
    ap.add_argument("--json", type=Path, help="JSON file to store the pairs in (key 'pairs'; an existing file keeps its other keys)")
    a = ap.parse_args()
    raw, cfg, res = load(a.results_dir)
    rows = pair_rows(raw, cfg, parse_pairs(a.pairs), a.metric)
    md = pairs_markdown(rows, res.get("quality"))
    print(md)
    cmd, git = command_line(), git_state()
    if a.out:
        old = a.out.read_text().rstrip("\n") + "\n\n" if a.out.is_file() else ""
        made_at = commit_line(git)
        a.out.write_text(old + md + f"\nMade by `{cmd}`." + (f" {made_at}" if made_at else "") + "\n")
    if a.json:
        doc = json.loads(a.json.read_text()) if a.json.is_file() else {}
        doc["pairs" if a.metric == "map_tail" else f"pairs_{a.metric}"] = {"command": cmd, **git, "rows": rows}
        a.json.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
