"""The `tailfuse` command: one sub-command per stage, plus `info` and `demo`."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from ._version import __version__
from .cli_common import THREADS_HELP, add_verbosity_args, csv_list, int_csv
from .config import load_yaml, resolve
from .errors import TailfuseError, q
from .evaluation.cli_args import add_evaluate_parser, cmd_evaluate



def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--data", help="CSV manifest (path + one 0/1 column per label [+ split]) or a folder with one sub-folder per class")
    g.add_argument("--path-column", help="manifest column holding image paths (default: path)")
    g.add_argument("--labels", type=csv_list, help="comma-separated label columns (default: every column holding only 0/1)")
    g.add_argument("--label-column", help="one column of class names instead of 0/1 columns (e.g. diagnosis: MEL, NV, ...; several labels as A|B); found by itself when it is the only text column")
    g.add_argument("--metadata-columns", type=csv_list, help="comma-separated columns never taken as labels")
    g.add_argument("--group-column", help="column keeping a group in one split when tailfuse splits (default: patient_id if present)")
    g.add_argument("--tail-labels", type=csv_list, help="comma-separated tail labels (default: automatic, see --head-share)")
    g.add_argument("--head-share", type=float, help="automatic head/tail rule: the head is the smallest set of most frequent labels holding this share of train positives (default 0.75)")
    g.add_argument("--image-size", type=int, help="square size images are brought to (default 128; a multiple of the VAE's factor, 8)")
    g.add_argument("--resize", choices=["center-crop", "pad", "stretch"], help="resize policy (default center-crop)")
    g.add_argument("--seed", type=int, help="seed of the split tailfuse makes when the manifest has none (default 0)")
    g.add_argument("--drop-empty-labels", action="store_true", default=None, help="drop label columns with no positive instead of failing")
    g.add_argument("--strict", action="store_true", default=None, help="unreadable images are fatal instead of skipped and reported")


def _add_vae_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("VAE")
    g.add_argument("--vae", help="diffusers AutoencoderKL / AutoencoderTiny folder, Stable Diffusion folder, or hub id (default: $TAILFUSE_VAE)")
    g.add_argument("--device", help="cpu (default), cuda, cuda:N, mps")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="VAE dtype (default float32)")


def _add_fuse_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fusion")
    g.add_argument("--model", help="trained model to use (default train; train-no-imitation for the ablation)")
    g.add_argument("--generation", type=int, help="generation of the model (default: the last)")
    _add_fusion_flags(g)
    g.add_argument("--seed", type=int, help="seed (default 0)")
    g.add_argument("--name", help="output folder in the run (default synthetic)")
    _add_refine_flags(g)


def _add_fusion_flags(g) -> None:
    """How many samples and how they are fused: the flags `fuse` and `run` share."""
    n = g.add_mutually_exclusive_group()
    n.add_argument("--per-class", type=int, help="new samples per tail label (default 100)")
    n.add_argument("--balance-to", type=int, help="top every tail label up to this many training samples")
    n.add_argument("--sampling-strategy", help="the budget as imbalanced-learn's sampling_strategy: auto (each tail label up to the median head-label count, at most --max-ratio x its own), a ratio of the median head-label count, or a mapping '{BCC: 150, DF: 100}' of target counts")
    g.add_argument("--max-ratio", type=float, help="auto / ratio budgets: a tail label grows to at most this multiple of its real count (default 5)")
    g.add_argument("--cam", choices=["gradcam", "hirescam", "eigencam"], help="saliency method (default gradcam)")
    g.add_argument("--cam-layer", choices=["full", "half"], help="layer of C the maps come from: full (latent) resolution (default) or half")
    g.add_argument("--neighbours", type=int, help="head neighbours per tail sample (default 3)")
    g.add_argument("--index", choices=["auto", "exact", "faiss-flat", "faiss-hnsw"], help="neighbour search (default auto: exact up to 50,000 head samples, then faiss HNSW)")
    g.add_argument("--labels-policy", choices=["union", "kept", "tail"], help="labels of a fused sample on multi-label data: tail + head sample's labels (union, default), the head's only when at least half of its salient region was kept (kept), or the tail sample's only (tail)")
    g.add_argument("--code", choices=["hard", "soft"], help="splice one-hot symbols (hard, default) or code probabilities")
    g.add_argument("--detail", choices=["none", "residual"], help="add back what the code does not carry (z - D(code)) from each position's source (default residual)")
    g.add_argument("--feather", type=float, help="mix the two sources near mask borders: sigma of the blurred mask, in latent positions (default 1; 0: hard splice)")
    g.add_argument("--saliency-norm", choices=["rank", "minmax"], help="map normalisation before thresholds (default rank)")
    g.add_argument("--saliency-smooth", type=float, help="Gaussian blur of the maps before thresholds, sigma in latent positions (default 1; 0 turns it off)")
    g.add_argument("--q-spread", type=float, help="q1, q2 ~ N(0.5, q-spread) (default 0.1)")
    g.add_argument("--fill-prob", type=float, help="tail probability where the rule leaves the choice open (default 0.9)")
    g.add_argument("--neighbours-within", help="metadata column: head partners only among head images with the same value (e.g. view, cell_type, site)")
    g.add_argument("--candidates", type=int, help="candidates made per synthetic sample; decode keeps the best by the real-data classifier's probability of the tail label (default 1: no selection)")
    g.add_argument("--soft-labels", action=argparse.BooleanOptionalAction, default=None, help="soft targets by each source's share of the fused sample (columns soft_<label> in the manifest, beside the 0/1 columns; default off: hard labels, which measured higher balanced accuracy and tail recall)")


def _add_refine_flags(g) -> None:
    g.add_argument("--refine", help="then refine the fused latents with the run's prior: d/N, d of N DDIM steps (e.g. 10/50), into the set <name>-refined")
    g.add_argument("--guidance", type=float, help="classifier-free guidance of the refinement toward the sample's labels (default 2)")


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decode")
    if not any(a.dest == "name" for a in p._actions):
        g.add_argument("--name", help="synthetic set to decode (default synthetic)")
    g.add_argument("--vae", help="VAE (default: the one the run was encoded with)")
    g.add_argument("--device", help="cpu (default), cuda, ...")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="VAE dtype (default float32)")
    _add_decode_quality_args(g)


def _add_decode_quality_args(g) -> None:
    g.add_argument("--pixel-detail", action=argparse.BooleanOptionalAction, default=None, help="add each source image's own codec error (x - decode(encode(x))) back where the fusion mask takes it: unfused regions keep their original pixels (default: on for fused sets; --no-pixel-detail decodes the fused latents alone)")
    g.add_argument("--pixel-composite", action="store_true", default=None, help="a control without the decoder: each image is the fusion mask's composite of its two source images in pixel space (saliency-guided CutMix); nothing is decoded")
    g.add_argument("--drop-near-copies", action="store_true", default=None, help="leave near-copies of real training images out of the manifest (an image region closer to one than real images are to each other; see --near-copy-quantile)")
    g.add_argument("--near-copy-quantile", type=float, help="near-copy threshold: this quantile of the real training images' nearest-other-image distances, in pixel regions (default 0.02)")


EXISTING_RUN = "run folder made by `tailfuse encode` or `tailfuse run`"


def _common(p: argparse.ArgumentParser, run_required: bool = True, creates: bool = False) -> None:
    p.add_argument("--run", required=run_required, help="run folder (created if needed)" if creates else EXISTING_RUN)
    p.add_argument("--config", help="YAML file with sections data, vae, encode, ... (flags override it)")
    add_verbosity_args(p)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option prints one line naming it and where the options are listed, not the whole usage
    block of a command with forty options (sub-commands inherit this class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every option)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `tailfuse` parser: the top-level flags and every sub-command's."""
    ap = _Parser(
        prog="tailfuse",
        description="Synthetic training images for the rare classes of long-tailed image datasets, made in the "
        "latent space of a pretrained diffusion VAE by iterated learning of sparse codes and saliency-guided fusion.",
    )
    ap.add_argument("--version", action="version", version=f"tailfuse {__version__}")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    ap.add_argument("--processes", type=int, default=1, help="run in N processes (encode, fuse, refine, sample and "
                    "decode share their shards; output identical to one process)")
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    sub = ap.add_subparsers(dest="command", metavar="command")
    # one function a sub-command, in the order `tailfuse --help` lists them
    for add in (_add_encode_parser, _add_train_parser, _add_fuse_parser, _add_decode_parser, _add_run_parser,
                _add_train_prior_parser, _add_refine_parser, _add_sample_parser, _add_report_parser,
                _add_review_parser, add_evaluate_parser, _add_info_parser, _add_demo_parser):
        add(sub)
    return ap


def _add_encode_parser(sub) -> None:
    """`tailfuse encode`: input, VAE and shard flags."""
    p = sub.add_parser("encode", help="images -> VAE latents in the run folder (resumable)")
    _common(p, creates=True)
    _add_data_args(p)
    _add_vae_args(p)
    g = p.add_argument_group("encode")
    g.add_argument("--batch-size", type=int, help="images per VAE batch (default 32)")
    g.add_argument("--shard-size", type=int, help="latents per shard file (default 512)")
    g.add_argument("--force", action="store_true", help="discard an earlier encode in this run folder and redo it")


def _add_train_parser(sub) -> None:
    """`tailfuse train`: the settings of iterated learning."""
    p = sub.add_parser("train", help="iterated learning of the sparse code on the run's latents (resumable)")
    _common(p)
    g = p.add_argument_group("iterated learning")
    g.add_argument("--generations", type=int, help="generations (default 4)")
    g.add_argument("--epochs", type=int, help="interaction epochs per generation (default 12)")
    g.add_argument("--imitation-epochs", type=int, help="imitation epochs per generation (default 6)")
    g.add_argument("--no-imitation", action="store_true", default=None, help="ablation: interaction phases only (model 'train-no-imitation')")
    g.add_argument("--imitation-targets", choices=["sample", "argmax"], help="imitation target per position: a symbol drawn from the teacher (default) or its argmax")
    g.add_argument("--reset-decoder-classifier", action="store_true", default=None, help="fresh D and C at every generation")
    g.add_argument("--k", type=int, help="symbols of the code (default 64)")
    g.add_argument("--dim", type=int, help="feature/codebook dimension (default 8)")
    g.add_argument("--tau", type=float, help="softmax temperature of the last generation (default 0.05)")
    g.add_argument("--tau-start", type=float, help="temperature of generation 0, annealed geometrically to --tau (default: no annealing)")
    g.add_argument("--batch-size", type=int, help="latents per step (default 32)")
    g.add_argument("--lr", type=float, help="learning rate of the interaction phase (default 2e-3)")
    g.add_argument("--lr-imitation", type=float, help="learning rate of the imitation phase (default 2e-3)")
    g.add_argument("--lambda-rec", type=float, help="weight of the reconstruction loss (default 1)")
    g.add_argument("--lambda-cls", type=float, help="weight of the classification loss (default 0.1)")
    g.add_argument("--lambda-mix", type=float, help="weight of the spliced-code decoder loss (default 0.5)")
    g.add_argument("--hard-frac", type=float, help="share of the one-hot code in the reconstruction loss (default 0.5)")
    g.add_argument("--seed", type=int, help="seed (default 0)")
    g.add_argument("--device", help="cpu (default)")
    g.add_argument("--name", help="model folder in the run (default train, or train-no-imitation)")
    g.add_argument("--ddp", action="store_true", default=None, help="with --processes N: data-parallel training over the processes (else the main process trains alone)")
    g.add_argument("--force", action="store_true", help="discard an earlier model of this name and train again")


def _add_fuse_parser(sub) -> None:
    """`tailfuse fuse`: the fusion flags."""
    p = sub.add_parser("fuse", help="saliency, neighbours and fusion: synthetic tail latents (resumable)")
    _common(p)
    _add_fuse_args(p)
    p.add_argument("--force", action="store_true", help="discard an earlier synthetic set of this name and redo it")


def _add_decode_parser(sub) -> None:
    """`tailfuse decode`: the VAE and the pixel-space options."""
    p = sub.add_parser("decode", help="synthetic latents -> PNG images, manifest.csv and provenance.jsonl (resumable)")
    _common(p)
    _add_decode_args(p)
    p.add_argument("--force", action="store_true", help="decode again")


def _add_run_parser(sub) -> None:
    """`tailfuse run`: the flags of every stage it runs."""
    p = sub.add_parser("run", help="encode, train, fuse and decode (each stage skipped when done; resumable)")
    _common(p, creates=True)
    _add_data_args(p)
    g = p.add_argument_group("VAE")
    g.add_argument("--vae", help="diffusers AutoencoderKL / AutoencoderTiny folder, Stable Diffusion folder, or hub id (default: $TAILFUSE_VAE)")
    g.add_argument("--device", help="cpu (default), cuda, cuda:N, mps")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="VAE dtype (default float32)")
    g = p.add_argument_group("train (more settings in the YAML section 'train')")
    g.add_argument("--generations", type=int, help="generations (default 4)")
    g.add_argument("--epochs", type=int, help="interaction epochs per generation (default 12)")
    g.add_argument("--imitation-epochs", type=int, help="imitation epochs per generation (default 6)")
    g.add_argument("--no-imitation", action="store_true", default=None, help="ablation: interaction phases only")
    g = p.add_argument_group("fuse")
    _add_fusion_flags(g)
    g = p.add_argument_group("decode")
    _add_decode_quality_args(g)

    g = p.add_argument_group("refine (the diffusion step; trains the prior first when missing)")
    _add_refine_flags(g)


def _add_train_prior_parser(sub) -> None:
    """`tailfuse train-prior`: the latent diffusion prior's settings."""
    p = sub.add_parser("train-prior", help="a class-conditional latent diffusion model on the run's training latents (resumable)")
    _common(p)
    g = p.add_argument_group("prior")
    g.add_argument("--widths", dest="block_out_channels", type=int_csv, help="UNet block widths (default 32,64 on a CPU, 64,128,256 on a GPU)")
    g.add_argument("--layers-per-block", type=int, help="resnet layers per UNet block (default 1)")
    g.add_argument("--attention", action="store_true", default=None, help="self-attention in the lowest-resolution block")
    g.add_argument("--epochs", type=int, help="epochs (default 160 on a CPU: about 10 minutes for 900 latents on 2 cores; 400 on a GPU)")
    g.add_argument("--batch-size", type=int, help="latents per step (default 32)")
    g.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3)")
    g.add_argument("--label-dropout", type=float, help="probability of training without labels, for classifier-free guidance (default 0.15)")
    g.add_argument("--t-min", type=int, help="smallest training timestep (default 0)")
    g.add_argument("--t-max", type=int, help="training timesteps below this (default 1000, which sampling from noise needs; refinement at d/N <= 15/50 only "
                   "visits t < 300, and --t-max 300 gave it a slightly better prior on ISIC2018-LT)")
    g.add_argument("--seed", type=int, help="seed (default 0)")
    g.add_argument("--device", help="cpu (default), cuda, ...")
    g.add_argument("--name", help="folder of the prior in the run (default prior)")
    p.add_argument("--force", action="store_true", help="discard an earlier prior of this name and train again")


def _add_refine_parser(sub) -> None:
    """`tailfuse refine`: SDEdit refinement of a latent set."""
    p = sub.add_parser("refine", help="few-step SDEdit refinement of a latent set with the run's prior or a Stable Diffusion model (resumable)")
    _common(p)
    g = p.add_argument_group("refine")
    g.add_argument("--source", help="latent set to refine (default synthetic)")
    g.add_argument("--refine", help="d/N: noise to where d of N DDIM steps remain, denoise d steps (default 10/50)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance toward the sample's labels (default 2; 1 = conditional, 0 = none)")
    g.add_argument("--prior", help="the run's prior to use (default prior)")
    g.add_argument("--sd", help="instead: a Stable Diffusion folder (diffusers layout) whose VAE shares the run's latent space")
    g.add_argument("--prompt-template", help="SD only: prompt with {labels} for the sample's label names (default '{labels}')")
    g.add_argument("--seed", type=int, help="seed of the noise (default 0)")
    g.add_argument("--name", help="output set (default <source>-refined)")
    g.add_argument("--device", help="cpu (default), cuda, ...")
    p.add_argument("--force", action="store_true", help="discard an earlier refined set of this name and redo it")


def _add_sample_parser(sub) -> None:
    """`tailfuse sample`: sampling tail classes from noise."""
    p = sub.add_parser("sample", help="full diffusion sampling of tail classes from noise with the run's prior (a baseline)")
    _common(p)
    g = p.add_argument_group("sample")
    g.add_argument("--per-class", type=int, default=100, help="new latents per tail label (default 100)")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    g.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance (default 2)")
    g.add_argument("--prior", default="prior", help="the run's prior (default prior)")
    g.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    g.add_argument("--name", default="prior-sample", help="output set (default prior-sample)")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("--force", action="store_true", help="discard an earlier set of this name and redo it")


def _add_report_parser(sub) -> None:
    """`tailfuse report`: the review page of a set."""
    p = sub.add_parser("report", help="an HTML page to review a synthetic set: every image beside its sources, maps, mask and scores")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--name", default="synthetic", help="the decoded set to review (default synthetic)")
    p.add_argument("--per-page", type=int, default=100, help="images per page (default 100)")
    add_verbosity_args(p)


def _add_review_parser(sub) -> None:
    """`tailfuse review`: importing the decisions made on the report."""
    p = sub.add_parser("review", help="record the decisions exported from the report; write <set>/manifest.accepted.csv")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--name", default="synthetic", help="the reviewed set (default synthetic)")
    p.add_argument("--decisions", required=True, help="the CSV exported from the report (set_id, synth_id, decision, reviewer, decided_at)")
    add_verbosity_args(p)


def _add_info_parser(sub) -> None:
    """`tailfuse info`: what a run folder holds."""
    p = sub.add_parser("info", help="what a run folder holds")
    p.add_argument("--run", required=True, help="run folder")
    add_verbosity_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_demo_parser(sub) -> None:
    """`tailfuse demo`: the pipeline on the built-in ELPV dataset."""
    p = sub.add_parser("demo", help="the whole pipeline on the built-in ELPV solar-cell dataset (PyPI elpv-dataset)")
    p.add_argument("--run", default="tailfuse-demo", help="run folder (default ./tailfuse-demo)")
    p.add_argument("--vae", help="VAE folder or hub id (default: $TAILFUSE_VAE, else madebyollin/taesd from the hub)")
    p.add_argument("--device", help="cpu (default), cuda, ...")
    add_verbosity_args(p)


def _values(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None}


def cmd_encode(args: argparse.Namespace) -> int:
    from .encode import run_encode

    doc = load_yaml(args.config) if args.config else None
    vals = _values(args)
    data = resolve("data", doc, vals)
    vae = resolve("vae", doc, vals)
    enc = resolve("encode", doc, vals)
    run_encode(data, vae, enc, args.run, force=bool(args.force), progress=not args.quiet)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run_train

    doc = load_yaml(args.config) if args.config else None
    cfg = resolve("train", doc, _values(args))
    run_train(args.run, cfg, force=bool(args.force), progress=not args.quiet)
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from .fusion.stage import run_fuse

    doc = load_yaml(args.config) if args.config else None
    cfg = resolve("fuse", doc, _values(args))
    run_fuse(args.run, cfg, force=bool(args.force), progress=not args.quiet)
    refined = _refine_after(args, doc, cfg.name)
    if refined:
        print(f"next: tailfuse decode --run {q(args.run)} --name {q(refined)}")
    return 0


def _refine_after(args, doc, source: str) -> str | None:
    """`fuse --refine` / `run --refine`: refine the fused set into <source>-refined; returns that name."""
    if not getattr(args, "refine", None):
        return None
    from .diffusion.refine import run_refine

    vals = {k: v for k, v in _values(args).items() if k in ("refine", "guidance", "seed", "device")}
    cfg = resolve("refine", doc, {**vals, "source": source, "name": None})
    run_refine(args.run, cfg, progress=not args.quiet)
    return cfg.out_name


def cmd_train_prior(args: argparse.Namespace) -> int:
    from .diffusion.train_prior import run_train_prior

    doc = load_yaml(args.config) if args.config else None
    run_train_prior(args.run, resolve("prior", doc, _values(args)), force=bool(args.force), progress=not args.quiet)
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    from .diffusion.refine import run_refine

    doc = load_yaml(args.config) if args.config else None
    cfg = resolve("refine", doc, _values(args))
    run_refine(args.run, cfg, force=bool(args.force), progress=not args.quiet)
    print(f"next: tailfuse decode --run {q(args.run)} --name {q(cfg.out_name)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .diffusion.refine import run_sample
    from .store import RunStore

    if args.per_class < 1:
        raise TailfuseError("--per-class must be at least 1.")
    tail = RunStore(args.run).labels()["tail_labels"]
    run_sample(args.run, {lab: args.per_class for lab in tail}, steps=args.steps, guidance=args.guidance,
               prior=args.prior, seed=args.seed, name=args.name, device=args.device, force=bool(args.force),
               progress=not args.quiet)
    print(f"next: tailfuse decode --run {q(args.run)} --name {q(args.name)}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from .decode import run_decode

    doc = load_yaml(args.config) if args.config else None
    run_decode(args.run, resolve("decode", doc, _values(args)), force=bool(args.force), progress=not args.quiet)
    return 0


def validate_sections(sections: dict) -> None:
    """Every stage's settings checked before any work starts (a bad --per-class fails in a second, not after
    encoding and training)."""
    from .data import validate as validate_data
    from .decode import validate as validate_decode
    from .fusion.stage import _validate as validate_fuse
    from .train import validate as validate_train

    from .codec import validate_vae

    checks = {"data": validate_data, "vae": validate_vae, "train": validate_train, "fuse": validate_fuse,
              "decode": validate_decode}
    for name, cfg in sections.items():
        if name in checks:
            checks[name](cfg)
        elif name == "refine" and cfg is not None:
            cfg.steps()
        elif name == "prior" and cfg is not None:
            from .diffusion.train_prior import validate as validate_prior

            validate_prior(cfg)


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_all

    doc = load_yaml(args.config) if args.config else None
    vals = _values(args)
    sections = {s: resolve(s, doc, vals) for s in ("data", "vae", "encode", "train", "fuse", "decode")}
    refine = resolve("refine", doc, {k: v for k, v in vals.items() if k in ("refine", "guidance", "device")}) \
        if vals.get("refine") else None
    validate_sections({**sections, "refine": refine})
    out = run_all(args.run, **sections, refine=refine, progress=not args.quiet)
    name = out["set"]
    print(f"\ndone: images in {Path(args.run) / name / 'images'}; manifest and provenance beside them.")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, run_info

    info = run_info(args.run)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .codec import HUB_DEFAULT, VAE_ENV
    from .demo import DEMO_TAIL, demo_configs, elpv_manifest
    from .pipeline import run_all

    from .codec import validate_vae
    from .config import VAEConfig

    run = Path(args.run)
    vae_name = args.vae or os.environ.get(VAE_ENV) or HUB_DEFAULT
    validate_vae(VAEConfig(vae=vae_name))  # before any work
    manifest = elpv_manifest(run / "demo-data" / "manifest.csv", copy=True)
    out = run_all(str(run), **demo_configs(manifest, vae_name, args.device or "cpu"), progress=not args.quiet)
    folder = run / out["set"]
    print(
        f"\ndemo done: {out['decode']['n_images']} synthetic images of the rare grades "
        f"({', '.join(DEMO_TAIL)}).\n  images:      {folder / 'images'}\n  manifest:    {folder / 'manifest.csv'}\n"
        f"  provenance:  {folder / 'provenance.jsonl'}\n"
        f"  review page: not made by the demo; `tailfuse report --run {q(run)}` makes it (a few minutes: it scores "
        f"every image)\n  run summary: tailfuse info --run {q(run)}"
    )
    return 0


def _sigterm(signum, frame):  # a kill is handled like Ctrl-C: finished shards are already on disk
    raise KeyboardInterrupt


MULTI_PROCESS_COMMANDS = ("encode", "train", "fuse", "decode", "run", "train-prior", "refine", "sample", "evaluate")


def setup_logging(args: argparse.Namespace) -> None:
    """Messages go to stderr through the 'tailfuse' logger (-q: warnings only, -v: debug); with several processes
    only the main one speaks. Sets ``args.quiet`` and ``args.verbose`` (False where the command has no such flag),
    which the commands read."""
    from .dist import world_size_from_env

    args.quiet = bool(getattr(args, "quiet", False))
    args.verbose = bool(getattr(args, "verbose", False))
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    if world_size_from_env() > 1 and os.environ.get("RANK", "0") != "0":
        level = logging.ERROR
        sys.stdout = open(os.devnull, "w")  # results are printed once, by the main process
    logger = logging.getLogger("tailfuse")
    logger.handlers[:] = [logging.StreamHandler(sys.stderr)]
    logger.handlers[0].setFormatter(logging.Formatter("%(message)s"))
    logger.setLevel(level)
    logger.propagate = False


def _relaunch(argv: list[str], n: int) -> int:
    """`--processes N`: the same command in N processes under torch.distributed.run (one machine)."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            rest.append(a)
    # the command line travels in the environment: torchrun would read options such as --run as its own
    cmd = [sys.executable, "-m", "tailfuse._torchrun", "--standalone", "--nproc_per_node", str(n), "-m", "tailfuse"]
    env = dict(os.environ, TAILFUSE_ARGV=json.dumps(rest))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    # torchrun runs in its own process group and this process passes a stop on to it exactly once: a `kill` of this
    # process alone would otherwise leave torchrun and its workers running (holding the run's lock), and Ctrl-C in
    # a terminal would reach torchrun twice (from the terminal and from us) and cut its shutdown of the workers short
    proc = subprocess.Popen(cmd, env=env, process_group=0)
    got: list[int] = []

    def forward(signum, frame):
        if not got:
            got.append(signum)
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 130 if got else rc  # as one process returns when stopped (its workers said so)


def _first_missing(run: Path) -> Path | None:
    """The outermost folder of ``run``'s path that does not exist yet (what this command would create), or None."""
    run = Path(os.path.abspath(run.expanduser()))
    missing = None
    for p in (run, *run.parents):
        if p.exists():
            break
        missing = p
    return missing


def _remove_created(run: Path, created: Path) -> None:
    """Remove a run folder that holds no stage (an early failure) and the parent folders this command created for
    it, as long as they are empty: nothing that existed before, nor anything another process put there, goes."""
    shutil.rmtree(run, ignore_errors=True)
    p = Path(os.path.abspath(run.expanduser())).parent
    created = Path(os.path.abspath(created))
    while p == created or created in p.parents:
        try:
            p.rmdir()
        except OSError:
            break
        p = p.parent


def main(argv: list[str] | None = None) -> int:
    from .dist import world_size_from_env

    if argv is None and not sys.argv[1:] and os.environ.get("TAILFUSE_ARGV") and world_size_from_env() > 1:
        argv = json.loads(os.environ["TAILFUSE_ARGV"])  # a process of `--processes N`
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    setup_logging(args)
    n = int(getattr(args, "processes", 1) or 1)
    if n < 1:
        print(f"tailfuse {args.command}: error: --processes {n}: give at least 1.", file=sys.stderr)
        return 2
    if n > 1 and world_size_from_env() <= 1:
        if args.command not in MULTI_PROCESS_COMMANDS:
            print(f"tailfuse {args.command}: error: --processes applies to {', '.join(MULTI_PROCESS_COMMANDS)}.",
                  file=sys.stderr)
            return 2
        return _relaunch(argv, n)
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        print(f"tailfuse {args.command}: error: --threads {threads}: give at least 1.", file=sys.stderr)
        return 2
    from .threads import configure

    configure(threads)
    signal.signal(signal.SIGTERM, _sigterm)
    run = getattr(args, "run", None)
    created = _first_missing(Path(run)) if run is not None else None
    if run is not None and args.command in WRITING_COMMANDS:
        from .store import contain_matplotlib

        contain_matplotlib(Path(run))  # before any module imports matplotlib
    try:
        with _lock(args):
            return _dispatch(args)
    except TailfuseError as e:
        print(f"tailfuse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` etc.
        sys.stderr.close()
        return 0
    except OSError as e:
        print(_os_error(args.command, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ntailfuse {args.command}: interrupted. Finished work is kept in the run folder; rerun the same command "
            "to resume.",
            file=sys.stderr,
        )
        return 130
    finally:
        if created is not None and Path(run).is_dir() and not (Path(run) / "stages").exists():
            _remove_created(Path(run), created)  # an early failure leaves no run folder behind, nor its new parents


WRITING_COMMANDS = ("encode", "train", "fuse", "decode", "run", "train-prior", "refine", "sample", "evaluate", "demo",
                    "report", "review")


def _lock(args):
    """One writer per run folder (store.RunLock); the processes of `--processes N` share their launcher's lock."""
    from contextlib import nullcontext

    from .dist import world_size_from_env
    from .store import RunLock, RunStore

    if args.command not in WRITING_COMMANDS or world_size_from_env() > 1:
        return nullcontext()
    if getattr(args, "data", None) or (args.command in ("encode", "run") and args.config):
        from .data import input_locations

        data = resolve("data", load_yaml(args.config) if args.config else None, _values(args))
        if data.data:
            RunStore(args.run).check_outside(input_locations(data))  # before anything is written
    return RunLock(Path(args.run), "tailfuse " + " ".join(sys.argv[1:] if sys.argv[1:] else [args.command]))


def _os_error(command: str, e: OSError) -> str:
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"tailfuse {command}: error: cannot write{where}: permission denied. The run folder must be writable "
                "by you; choose another --run, or ask its owner.")
    if e.errno == errno.ENOSPC:
        return (f"tailfuse {command}: error: no space left on the device while writing{where}. Free some space and "
                "rerun the same command: finished work is kept and the stage resumes.")
    return f"tailfuse {command}: error: {e.strerror or e}{where}."


def cmd_report(args: argparse.Namespace) -> int:
    from .report import run_report

    out = run_report(args.run, args.name, args.per_page, progress=not args.quiet)
    print(f"report: {out['index']} ({out['n_items']} images); open it in a browser, mark accept / reject, export "
          f"the decisions, then: tailfuse review --run {q(args.run)} --name {q(args.name)} --decisions <csv>")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from .review import run_review

    out = run_review(args.run, args.decisions, args.name)
    print(f"recorded {out['imported']} decisions: {out['accepted']} accepted, {out['rejected']} rejected, "
          f"{out['undecided']} not reviewed\naccepted manifest: {out['manifest']}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    handlers = {"encode": cmd_encode, "train": cmd_train, "fuse": cmd_fuse, "decode": cmd_decode, "run": cmd_run,
                "train-prior": cmd_train_prior, "refine": cmd_refine, "sample": cmd_sample,
                "evaluate": cmd_evaluate, "info": cmd_info, "demo": cmd_demo, "report": cmd_report,
                "review": cmd_review}
    return handlers[args.command](args)
