"""Evaluate arms on the fold runs of a finished `tailfuse evaluate --folds K` and pool the folds given, without
retraining any sparse model: for arms added after the K-fold run (e.g. a new decode option), on some or all folds.

    python benchmarks/evaluate_fold_subset.py OUT --folds-dir DIR --only 0,1,2 -- <tailfuse evaluate arguments>

DIR holds the fold runs (`<run>/eval/folds-K-seed<s>/fold-k`, or a copy of them: an arm whose fused set was made by
another version of the code is made again in DIR, so work on a copy to keep the K-fold run as it was). The evaluate
arguments are the CLI's (`--run`, `--folds K`, `--arms`, `--seeds`, ...). Writes OUT/fold-k/results.{json,md} per
fold and OUT/pooled/results.{json,md} (the folds' test predictions pooled, as `--folds` does). A fold whose
OUT/fold-k/results.json exists with quality figures for the same arms reuses those figures (the classifier fits are
cached by evaluate itself), so adding folds later costs only the new ones. ``--pairs 'A:B;C:D'`` adds the tail-mAP
difference of arm A minus arm B on the pooled predictions, with the same paired bootstrap as the tables
(OUT/pooled/pairs.json and a section at the end of results.md; `compare_arms.py` does the same for any finished
evaluation). ``--make-folds`` makes a missing fold run and trains its sparse model first, as `--folds K` does, so
two calls with disjoint ``--only`` build and evaluate the folds side by side:

    python benchmarks/evaluate_fold_subset.py OUT --folds-dir RUN/eval/folds-5-seed0 --only 0,1 --make-folds \
        -- --run RUN --folds 5 ...
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tailfuse.evaluation.cli_args import add_evaluate_parser, evaluate_config  # noqa: E402
from tailfuse.evaluation.folds import pool  # noqa: E402
from tailfuse.evaluation.harness import _write, evaluate_split, save_scores, summarise, validate  # noqa: E402
from tailfuse.store import RunStore, write_json_atomic  # noqa: E402

from _results import Load, commit_line, parse, parser, provenance  # noqa: E402  (benchmarks/, beside this script)
from compare_arms import pair_rows, pairs_markdown, parse_pairs  # noqa: E402


def make_fold(run: str, cfg, folds_dir: Path, i: int) -> None:
    """Fold i's run under ``folds_dir`` and its sparse model, as `tailfuse evaluate --folds K` makes them (the same
    split, settings and note; each skipped when done)."""
    from tailfuse.evaluation.folds import assign_folds, fold_train_config, make_fold_run
    from tailfuse.train import run_train

    if not cfg.folds:
        raise SystemExit("--make-folds needs --folds K among the evaluate arguments")
    store = RunStore(run)
    split = assign_folds(store, int(cfg.folds), cfg.fold_val_fraction, cfg.data_seed)[i]
    fold = make_fold_run(store, folds_dir / f"fold-{i}", split, f"fold {i + 1} of {int(cfg.folds)} (seed {cfg.data_seed})")
    if (fold.stage("train") or {}).get("status") != "done":
        print(f"fold {i}: training its sparse model", flush=True)
        run_train(str(fold.root), fold_train_config(store), progress=False)


def main() -> int:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = parser(__doc__, threads=1, out=False)
    ap.add_argument("out")
    ap.add_argument("--folds-dir", required=True)
    ap.add_argument("--only", required=True, help="comma-separated fold indices, e.g. 0,1,2")
    ap.add_argument("--make-folds", action="store_true",
                    help="make a missing fold run from --run (the folds `--folds K` makes) and train its sparse model "
                         "with the run's train settings, as `tailfuse evaluate --folds K` does; several calls with "
                         "disjoint --only can then make the folds side by side")
    ap.add_argument("--pairs", default="", help="A:B;C:D (';' between pairs: arm names may hold commas): tail-mAP differences arm A - arm B on the pooled predictions")
    a = parse(ap, argv[:cut])  # sets torch's thread count to --threads
    load = Load()
    p = argparse.ArgumentParser()
    add_evaluate_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["evaluate", *argv[cut + 1:]])
    cfg = evaluate_config(args)
    specs = validate(cfg)
    out = Path(a.out)
    inner = replace(cfg, folds=None)
    raws = []
    for i in [int(f) for f in a.only.split(",")]:
        fold = RunStore(Path(a.folds_dir) / f"fold-{i}")
        if a.make_folds:
            make_fold(args.run, cfg, Path(a.folds_dir), i)
        if (fold.stage("train") or {}).get("status") != "done":
            raise SystemExit(f"fold {i}: no trained sparse model in {fold.root}")
        saved = out / f"fold-{i}" / "results.json"
        old = json.loads(saved.read_text()) if saved.is_file() else {}
        reuse = bool(old.get("quality")) and set(old.get("arms", {})) == {s.name for s in specs}
        raw = evaluate_split(fold, replace(inner, quality=False) if reuse else inner, specs, False, False)
        if reuse:
            raw["quality"] = old["quality"]
        (out / f"fold-{i}").mkdir(parents=True, exist_ok=True)
        _write(summarise(raw, inner, specs), out / f"fold-{i}")
        raws.append(raw)
        print(f"fold {i} done" + (" (quality figures reused)" if reuse else ""), flush=True)
    (out / "pooled").mkdir(parents=True, exist_ok=True)
    pooled = pool(raws, len(raws), cfg)
    save_scores(pooled, out / "pooled")
    results = _write(summarise(pooled, cfg, specs), out / "pooled")
    md = out / "pooled" / "results.md"
    if a.pairs:
        rows = pair_rows(pooled, cfg, parse_pairs(a.pairs))
        (out / "pooled" / "pairs.json").write_text(json.dumps(rows, indent=1))
        md.write_text(md.read_text().rstrip("\n") + "\n\n" + pairs_markdown(rows, results.get("quality")))
    # what made the pooled tables (as bench_evaluate.py records it): under "benchmark", beside the evaluation's own
    results["benchmark"] = provenance(load, a)
    write_json_atomic(out / "pooled" / "results.json", results)
    made_at = commit_line(results["benchmark"])
    md.write_text(md.read_text().rstrip("\n") + f"\n\nMade by `{results['benchmark']['command']}`."
                  + (f" {made_at}" if made_at else "") + "\n")
    print(f"pooled folds {a.only}: {out / 'pooled' / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
