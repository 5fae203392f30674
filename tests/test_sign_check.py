"""benchmarks/sign_check.py: the verdicts and the comparison of two committed evaluations (the GPU sign check)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from sign_check import compare, verdict  # noqa: E402


def test_verdicts_follow_the_intervals():
    zero, up, down = (0.01, -0.05, 0.07), (0.10, 0.04, 0.16), (-0.10, -0.16, -0.04)
    assert verdict(zero, (-0.02, -0.08, 0.05)) == "agree"  # neither sees a difference
    assert verdict(up, up) == "agree" and verdict(down, down) == "agree"
    assert verdict(zero, up) == "same sign"
    assert verdict((-0.01, -0.06, 0.05), up) == "differs"
    assert verdict(up, down) == "opposite"


def test_compare_reads_the_tables_own_differences():
    res = ROOT / "benchmarks" / "results"
    cheap = json.loads((res / "evaluate-isic2018_lt-gpu-partial.json").read_text())
    ref = json.loads((res / "evaluate-isic2018_lt-gpu-finetune.json").read_text())
    rows = compare(cheap, ref, "real", ["map_tail", "balanced_accuracy"])
    assert {r["arm"] for r in rows} == {"oversample", "cmo", "vae-roundtrip", "tailfuse"}
    assert len(rows) == 8
    for r in rows:
        d = ref["arms"][r["arm"]]["delta_map_tail" if r["metric"] == "map_tail" else f"delta_{r['metric']}"]["real"]
        assert r["reference"] == [d["mean"], *d["ci95"]]
        assert r["verdict"] == verdict(tuple(r["cheap"]), tuple(r["reference"]))
