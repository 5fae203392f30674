"""Does a cheap protocol agree with a reference one? Two finished `tailfuse evaluate` results of the same arms on the
same split (e.g. ``--classifier partial`` and ``--classifier finetune`` on the same synthetic sets), compared arm by
arm: each arm's difference to a control in each metric under both, with the tables' own paired bootstrap 95 %
intervals, and whether the two agree in sign.

    python benchmarks/sign_check.py CHEAP.json REFERENCE.json --control real --out benchmarks/results/NAME

Per arm and metric the verdict is:

* ``agree``: both intervals exclude zero on the same side, or both include it (neither protocol sees a difference);
* ``same sign``: one interval excludes zero, the other includes it, and the means have the same sign;
* ``differs``: one interval excludes zero, the other includes it, and the means have opposite signs;
* ``opposite``: the intervals exclude zero on opposite sides.

It also gives each protocol's ranking of the arms per metric. Writes ``NAME.json`` and ``NAME.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from _results import provenance, write_results  # noqa: E402  (benchmarks/, beside this script)
from compare_arms import METRIC_NAMES  # noqa: E402
from plot_deltas import rows  # noqa: E402


def verdict(a: tuple[float, float, float], b: tuple[float, float, float]) -> str:
    """Agreement of two (mean, low, high) differences (see the module doc)."""
    def side(d):
        return 1 if d[1] > 0 else -1 if d[2] < 0 else 0

    sa, sb = side(a), side(b)
    if sa == sb:
        return "agree"
    if sa and sb:
        return "opposite"
    return "same sign" if (a[0] > 0) == (b[0] > 0) else "differs"


def compare(cheap: dict, ref: dict, control: str, metrics: list[str]) -> list[dict]:
    out = []
    for m in metrics:
        a = {r[0]: r[1:] for r in rows(cheap, control, m)}
        b = {r[0]: r[1:] for r in rows(ref, control, m)}
        for arm in [x for x in a if x in b]:
            out.append({"metric": m, "arm": arm, "cheap": list(a[arm]), "reference": list(b[arm]),
                        "verdict": verdict(a[arm], b[arm])})
    return out


def ranking(res: dict, metric: str) -> list[str]:
    arms = res["arms"]
    return sorted(arms, key=lambda k: -float(arms[k][metric]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cheap", type=Path, help="results.json of the cheap protocol")
    ap.add_argument("reference", type=Path, help="results.json of the reference protocol")
    ap.add_argument("--control", default="real")
    ap.add_argument("--metrics", default="balanced_accuracy,macro_f1,tail_recall,map_tail",
                    help="comma-separated: map_tail and decision metrics (default: all four)")
    ap.add_argument("--out", type=Path, required=True, help="results path without suffix (NAME.json, NAME.md)")
    ap.add_argument("--note", default=None, help="a paragraph written under the title")
    a = ap.parse_args()
    cheap, ref = json.loads(a.cheap.read_text()), json.loads(a.reference.read_text())
    metrics = a.metrics.split(",")
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise SystemExit(f"unknown metric(s) {unknown}; choose from {sorted(METRIC_NAMES)}")
    pc, pr = cheap["protocol"]["classifier"], ref["protocol"]["classifier"]
    found = compare(cheap, ref, a.control, metrics)
    if not found:
        raise SystemExit(f"no arm has differences to '{a.control}' in both results")

    def fmt(d):
        return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"

    md = [f"# Sign check: `{pc}` against `{pr}`", ""]
    if a.note:
        md += [a.note, ""]
    md += [f"Cheap: `{a.cheap}` ({cheap.get('command', '')}).", "",
           f"Reference: `{a.reference}` ({ref.get('command', '')}).", "",
           f"Each arm minus `{a.control}`, paired bootstrap 95 % intervals over test images (the tables' own).", ""]
    rankings = {m: {pc: ranking(cheap, m), pr: ranking(ref, m)} for m in metrics}
    for m in metrics:
        sel = [r for r in found if r["metric"] == m]
        if not sel:
            continue
        md += [f"## {METRIC_NAMES[m]}", "", f"| arm | {pc} | {pr} | verdict |", "|---|---|---|---|"]
        md += [f"| {r['arm']} | {fmt(r['cheap'])} | {fmt(r['reference'])} | {r['verdict']} |" for r in sel]
        md += ["", f"Ranking under {pc}: {' > '.join(rankings[m][pc])}; under {pr}: {' > '.join(rankings[m][pr])}.", ""]
    counts = {v: sum(r["verdict"] == v for r in found) for v in ("agree", "same sign", "differs", "opposite")}
    md += ["## Summary", "", ", ".join(f"{k}: {v}" for k, v in counts.items()) + f" (of {len(found)} arm-metric pairs)."]
    res = {"cheap": str(a.cheap), "reference": str(a.reference), "control": a.control, "rows": found,
           "counts": counts, "rankings": rankings,
           **provenance(args=a)}
    md += ["", "Produced by `" + res["command"] + "`."]
    write_results(a.out.parent, a.out.name, res, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
