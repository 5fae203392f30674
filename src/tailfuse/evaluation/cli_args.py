"""The `tailfuse evaluate` sub-command: its flags and its handler (wired into tailfuse.cli)."""

from __future__ import annotations

import argparse
import shlex

from ..cli_common import add_verbosity_args, csv_list, float_csv, int_csv
from .config import ARMS, CLASSIFIERS, LOSSES, OPTIONAL_ARMS, EvaluateConfig


def _arm_list(s: str) -> list[str]:
    """Comma-separated arms; commas inside brackets belong to an arm's settings (tailfuse[a=1,b=2])."""
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [x.strip() for x in out if x.strip()]


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="downstream classifier on real data vs real + each augmentation (tailfuse and baselines); quality figures",
        description="Train the same downstream classifier on the real training images alone and with each "
        "augmentation arm, over several seeds; report per-label AP, mAP over all / head / tail labels with paired "
        "bootstrap intervals, and FID / domain Frechet distance / precision-recall of the synthetic tail images. "
        "Writes <run>/eval/results.json, results.md and plots. Resumable: features and finished arms are cached.",
    )
    p.add_argument("--run", required=True, help="run folder (encode done; 'train' model for the fusion arms)")
    p.add_argument("--config", help="YAML file with a section 'evaluate' (flags override it)")
    add_verbosity_args(p)
    g = p.add_argument_group("arms and classifier")
    g.add_argument("--arms", type=_arm_list, help=f"comma-separated arms (default: {','.join(ARMS)}; also "
                   f"{','.join(OPTIONAL_ARMS)}, and fusion arms with other settings, e.g. "
                   "'tailfuse[pixel_detail=true,candidates=3]')")
    g.add_argument("--seeds", type=int_csv, help="comma-separated seeds of the arms' draws and of the partial/finetune/cnn classifiers (default 0,1,2)")
    g.add_argument("--classifier", choices=list(CLASSIFIERS), help="linear: logistic regression on frozen EfficientNet-Lite0 features (default); partial: the last --trainable-blocks blocks of EfficientNet-Lite0 and a new head trained on frozen maps at the run's image size; finetune (all layers); cnn (small CNN from scratch)")
    g.add_argument("--select", choices=["map", "balanced_accuracy"], help="what picks C / the epoch / the weight decay on val (default: map for linear; for the other classifiers balanced_accuracy on multi-class data, map on multi-label data)")
    g.add_argument("--c-grid", type=float_csv, help="linear: regularisation values C tried per arm, the best on val kept (default 3e-4,1e-3,3e-3,0.01,0.03,0.1,0.3)")
    g.add_argument("--epochs", type=int, help="partial / finetune / cnn: training epochs (default 20 / 8 / 30)")
    g.add_argument("--lr", type=float, help="partial / finetune / cnn: learning rate (default 5e-4 / 1e-4 / 1e-3)")
    g.add_argument("--weight-decay", type=float_csv, help="partial / finetune / cnn: AdamW weight decays tried per arm, the best on val kept (default 1e-4)")
    g.add_argument("--batch-size", type=int, help="partial / finetune / cnn: batch size (default 64)")
    g.add_argument("--trainable-blocks", type=int, help="partial: the last MBConv blocks of EfficientNet-Lite0 trained (default 3 of 16)")
    g.add_argument("--pool", type=int, help="image arms: each epoch draws the budget afresh from a set of this many times the budget (default 1: the same images every epoch); oversample then redraws its duplicates each epoch")
    g.add_argument("--loss", choices=list(LOSSES), help="every arm's training loss: ce (default) or weighted, class-weighted by the class counts of the arm's own training set (real plus added; the re-balancing a user adds on top of augmentation; then 'real' is the re-weighted baseline, and the arms reweight and drw are refused)")
    g.add_argument("--folds", type=int, help="K-fold evaluation of the whole pipeline: every image a test image once; the sparse model, fusion and decoding of each fold see only its training part")
    g.add_argument("--fold-val-fraction", type=float, help="with --folds: share of each fold's training part kept for validation (default 0.1)")
    g = p.add_argument_group("augmentation budget (the same for every augmentation arm)")
    n = g.add_mutually_exclusive_group()
    n.add_argument("--balance-to", type=int, help="top each tail label up to this many training samples (default: auto, the median head-label train count, at most 5x a label's own)")
    n.add_argument("--per-class", type=int, help="instead: this many new samples per tail label")
    n.add_argument("--sampling-strategy", help="instead: imbalanced-learn's sampling_strategy shape: auto, a ratio of the median head-label count, or a mapping '{BCC: 150}' of target counts")
    g.add_argument("--max-ratio", type=float, help="auto / ratio budgets: a tail label grows to at most this multiple of its real count (default 5)")
    g.add_argument("--budgets", type=float_csv, help="budget sweep: every augmentation arm also at these multiples of each tail label's real train count, e.g. 0.5,1,2,5")
    g.add_argument("--data-seed", type=int, help="seed of the synthetic sets, the folds and the bootstrap (default 0)")
    g.add_argument("--smote-k", type=int, help="neighbours of SMOTE / MLSMOTE (default 5)")
    g.add_argument("--mixup-alpha", type=float, help="mixup Beta(alpha, alpha) (default 0.4)")
    g = p.add_argument_group("statistics and quality")
    g.add_argument("--bootstrap", type=int, help="paired bootstrap resamples of the test images (default 1000; 0 = none)")
    g.add_argument("--no-quality", dest="quality", action="store_false", default=None, help="skip FID / Frechet distance / precision-recall / separability")
    g.add_argument("--fid-max-images", type=int, help="at most this many images per set in the quality figures (default 500)")
    g.add_argument("--pr-k", type=int, help="k of the k-NN precision/recall (default 3)")
    g = p.add_argument_group("models and machine")
    g.add_argument("--no-train-missing", dest="train_missing", action="store_false", default=None, help="fail instead of training the missing 'train-no-imitation' model")
    g.add_argument("--vae", help="VAE for decoding the image arms (default: the one the run was encoded with)")
    g.add_argument("--device", help="cpu (default), cuda, ...")
    p.add_argument("--force", action="store_true", help="redo everything: synthetic sets and every arm (features stay cached)")
    return p


def _command(args: argparse.Namespace) -> str:
    parts = ["tailfuse", "evaluate", "--run", str(args.run)]
    for k, v in vars(args).items():
        if k in ("run", "command", "func", "verbose", "processes") or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if k in ("quality", "train_missing"):  # store_false flags: given when False
            if v is False:
                parts.append("--no-" + k.replace("_", "-"))
        elif v is False:
            continue
        elif v is True:
            parts.append(flag)
        elif isinstance(v, list):
            parts += [flag, ",".join(map(str, v))]
        else:
            parts += [flag, str(v)]
    return " ".join(shlex.quote(x) for x in parts)


def evaluate_config(args: argparse.Namespace) -> EvaluateConfig:
    """The EvaluateConfig of parsed `tailfuse evaluate` arguments (flags over the --config file's section)."""
    from ..config import SECTIONS, load_yaml, register_section, resolve

    if "evaluate" not in SECTIONS:
        register_section("evaluate", EvaluateConfig)
    doc = load_yaml(args.config) if getattr(args, "config", None) else None
    vals = {k: v for k, v in vars(args).items()
            if v is not None and k not in ("run", "config", "quiet", "verbose", "processes", "force", "command")}
    return resolve("evaluate", doc, vals)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .harness import run_evaluate

    cfg = evaluate_config(args)
    res = run_evaluate(args.run, cfg, force=bool(args.force), progress=not args.quiet, command=_command(args))
    args.output = res["output"]  # for callers (benchmarks/bench_evaluate.py)
    rows = []
    for arm, e in res["arms"].items():
        d = e.get("delta_map_tail_vs_real")
        extra = f"  Δtail {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else ""
        fmt = lambda v: "  –  " if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(f"  {arm:<22} mAP {fmt(e['map_all'])}  head {fmt(e['map_head'])}  tail {fmt(e['map_tail'])}{extra}")
    print("\n".join(rows))
    print(f"results: {res['output']}/results.json, results.md and plots")
    return 0
