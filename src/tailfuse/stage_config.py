"""The settings of each pipeline stage: one dataclass per concern (data, VAE, encode, train, fuse, decode, prior,
refine).

They live below ``tailfuse.config`` (YAML sections, resolution, hashing), which imports them and evaluate's
EvaluateConfig, so that ``evaluation.config`` can use them without importing ``tailfuse.config`` back. Import them
from ``tailfuse.config`` as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TailfuseError


@dataclass
class DataConfig:
    """Where the images and labels come from and how images are brought to a common size."""

    data: str | None = None  # a CSV manifest or a folder with one sub-folder per class
    path_column: str = "path"
    labels: list[str] | None = None  # label columns; None = every column holding only 0/1 values
    label_column: str | None = None  # one column of class names ('MEL', or 'A|B' for several); detected when alone
    metadata_columns: list[str] = field(default_factory=list)  # columns never taken as labels
    group_column: str | None = None  # keeps a group (a patient) in one split; None = `patient_id` if present
    tail_labels: list[str] | None = None  # None = automatic (see head_share)
    head_share: float = 0.75  # automatic rule: head = most frequent labels covering this share of train positives
    image_size: int = 128
    resize: str = "center-crop"  # center-crop | pad | stretch
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train/val/test, when no split
    val_fraction: float = 0.1  # share of train carved into val when the manifest has no val split
    seed: int = 0
    drop_empty_labels: bool = False  # drop label columns with no positive sample instead of failing
    strict: bool = False  # unreadable images are fatal instead of skipped


@dataclass
class VAEConfig:
    """The pretrained VAE of the latent diffusion model."""

    vae: str | None = None  # local folder (VAE or Stable Diffusion folder) or hub id; default $TAILFUSE_VAE
    device: str = "cpu"
    dtype: str = "float32"  # float32 | float16 | bfloat16


@dataclass
class EncodeConfig:
    batch_size: int = 32
    shard_size: int = 512  # latents per shard file; a killed run redoes at most one shard


@dataclass
class TrainConfig:
    """Settings of `tailfuse train` (defaults measured on ISIC2018-LT / TAESD, see benchmarks/results/train.md)."""

    generations: int = 4
    epochs: int = 12  # interaction epochs per generation
    imitation_epochs: int = 6  # imitation epochs per generation (from generation 1 on)
    k: int = 64  # symbols: channels of the simplicial embedding
    dim: int = 8  # feature / codebook dimension (>= latent channels)
    tau: float = 0.05  # softmax temperature on negative squared distances (of the last generation)
    tau_start: float | None = None  # temperature of generation 0, annealed geometrically to tau; None = fixed tau
    width_e: int = 32
    blocks_e: int = 2
    width_d: int = 48
    blocks_d: int = 3
    width_c: int = 32
    batch_size: int = 32
    lr: float = 2e-3
    lr_imitation: float = 2e-3
    lambda_rec: float = 1.0
    hard_frac: float = 0.5  # share of the hard (one-hot) code in the reconstruction term
    lambda_cls: float = 0.1
    balanced_classifier: bool = True  # multi-class: class-weighted cross-entropy for C (multi-label: BCE pos_weight)
    beta: float = 0.25  # commitment
    lambda_codebook: float = 1.0
    lambda_mix: float = 0.5  # decoder loss on codes spliced between two samples with random region masks
    mix_frac: float = 0.5  # share of each batch also used for the spliced-code loss
    augment: bool = True  # random flips / 90-degree rotations of latents
    reset_decoder_classifier: bool = False  # fresh D and C at every generation
    restart_dead: bool = True
    imitation_targets: str = "sample"  # sample (one symbol drawn per position) | argmax
    no_imitation: bool = False
    seed: int = 0
    device: str = "cpu"
    name: str | None = None  # model folder in the run; default "train" or "train-no-imitation"
    # with several processes: data-parallel training (gradients averaged every step; equal to one process up to the
    # order of floating-point sums). Without it the main process trains alone and the output is bit-identical.
    ddp: bool = False

    @property
    def model_name(self) -> str:
        return self.name or ("train-no-imitation" if self.no_imitation else "train")

    def phases(self) -> list[tuple[str, int]]:
        out = [("interaction", 0)]
        for g in range(1, self.generations):
            if not self.no_imitation:
                out.append(("imitation", g))
            out.append(("interaction", g))
        return out


@dataclass
class FuseConfig:
    """Settings of `tailfuse fuse`: saliency, neighbours, the fusion rule, how many samples, labels."""

    model: str = "train"  # trained model in the run (train, train-no-imitation, or a --name given to train)
    generation: int | None = None  # default: the model's last generation
    cam: str = "gradcam"  # gradcam | hirescam | eigencam
    cam_layer: str = "full"  # full (C's block at latent resolution) | half (its half-resolution block: smoother)
    neighbours: int = 3  # head neighbours per tail map
    index: str = "auto"  # auto | exact | faiss-flat | faiss-hnsw
    per_class: int | None = None  # new samples per tail label (default 100 when balance_to is not given)
    balance_to: int | None = None  # top every tail label up to this many training samples in total
    labels_policy: str = "union"  # union (tail + head labels) | kept (head labels only if >= half of the head map's
    # salient region was kept) | tail (tail labels only); multi-class data: the tail label only, whatever the policy
    code: str = "hard"  # hard (one-hot symbols) | soft (code probabilities) are spliced
    # residual (default): D(fused code) plus each position's own z - D(code(z)), so texture the 64-symbol code does not
    # carry comes back from the image the position is taken from; none: D(fused code) only. Measured on ISIC2018-LT
    # (benchmarks/results/fusion-*): without it the synthetic images were blurred and ranked as their tail label at
    # 0.09-0.45 of the real images' AP; with it 0.2-1.1.
    detail: str = "residual"
    # > 0: mix the two codes (and residuals) near mask borders, weights = the mask blurred by a Gaussian of this sigma
    # (latent positions); 0: a hard splice. 1 by default: measured on ISIC2018-LT (benchmarks/results/fusion-*),
    # the hard splice left edges along mask borders (1.00-1.13x the edge energy elsewhere, 1.1-1.5x on COVID CXR)
    # and DF images ranked as DF at 0.36 of the real test AP; feather 1: 0.79-0.91x and 0.62.
    feather: float = 1.0
    saliency_norm: str = "rank"  # rank (quantiles within each map) | minmax
    saliency_smooth: float = 1.0  # Gaussian blur of the maps (sigma, in latent positions) before thresholds: fewer
    # isolated one-position islands in the masks (0 turns it off)
    q_spread: float = 0.1  # q1, q2 ~ N(0.5, q_spread), clipped into (0, 1)
    # probability of the tail code where the rule leaves the choice open (both maps high, or both low). 0.9, not
    # 0.5: a coin there pasted the head image's own salient (class-specific) content into the tail sample, and the
    # results were ranked less as their tail label (ISIC2018-LT, fill 0.5 / 0.8 / 1.0: DF 0.18 / 0.36 / 0.45 of the
    # real test AP, AKIEC 0.61 / 0.68 / 0.70; diversity unchanged at ~0.98 of the real images').
    fill_prob: float = 0.9
    # head partners only among head samples with the same value of this metadata column (view of a chest X-ray,
    # cell type, device, site); None = the whole head pool. Measured: COVID CXR (3 folds) by view, tail mAP +0.005
    # [-0.008, +0.022] over the whole pool, separability 0.979 -> 0.971; ELPV by cell type +0.002 [-0.053, +0.053],
    # FID 68 -> 60 (evaluate-covid_cxr-3fold.md, evaluate-elpv.md). Not on by default: the column is the user's
    neighbours_within: str | None = None
    # candidates made per synthetic sample; with M > 1 decode keeps the best of every M (by the real-data
    # classifier's probability of the tail label, near-copies of real images excluded); 1 = no selection
    candidates: int = 1
    # the budget rule (budget.py): 'auto', a ratio of the median head-label count, or {label: total}; instead of
    # per_class / balance_to (default: 100 per tail label); max_ratio caps 'auto' and ratios at that multiple of a
    # label's real count
    sampling_strategy: str | float | dict | None = None
    max_ratio: float = 5.0
    # soft targets (columns soft_<label> in samples.csv and the manifest): multi-class, the tail label gets
    # 1 - h^0.8 and the head image's label h^0.8, h = the head image's share of the fused sample (Diff-Mix's split);
    # multi-label, the tail image's labels 1 and the head image's other labels the kept share of its salient region.
    # Off by default (issue 27): they raised the tail mAP of a linear probe on frozen features (5-fold ISIC2018-LT,
    # pixel-detail fusion: -0.062 -> -0.032 against real-only, evaluate-isic2018_lt-5fold.md), but a fused image
    # then carries only part of its tail label, which undoes part of the re-balancing: balanced accuracy fell under
    # every protocol measured: linear 5-fold 0.435-0.442 -> 0.399; partial fine-tune, plain loss 0.515 -> 0.422 and
    # tail recall 0.524 -> 0.320 (evaluate-isic2018_lt-partial-labels.md); partial fine-tune, class-weighted loss
    # 0.556 -> 0.492, tail mAP 0.501 -> 0.489 too (evaluate-isic2018_lt-partial-weighted.md; one split, 2 seeds).
    # The hard 0/1 columns are always in the manifest
    soft_labels: bool = False
    seed: int = 0
    batch_size: int = 256
    shard_size: int = 1024
    name: str = "synthetic"  # output folder in the run
    device: str = "cpu"

    # settings added after run folders existed: at their default they leave the stage's config hash as it was, so
    # a finished set is not redone after an upgrade
    HASH_OPTIONAL = {"neighbours_within": None, "candidates": 1, "soft_labels": False, "sampling_strategy": None,
                     "max_ratio": 5.0}


@dataclass
class DecodeConfig:
    name: str = "synthetic"
    # add each source image's own codec error, x - decode(encode(x)), back wherever the (feathered, upsampled)
    # fusion mask takes that source: regions that were not fused keep their original pixels. None (default): on for
    # fused sets, off for sets without source images (prior samples); True: required. Measured in the 5-fold
    # ISIC2018-LT evaluation: FID 186 -> 152 (floor 132), real-vs-synthetic separability 0.978 -> 0.908; with soft
    # labels the best tailfuse setting measured (tail mAP -0.032 against real-only, default fusion -0.050)
    pixel_detail: bool | None = None
    # the control of fusion without the VAE decoder: each image is the (feathered, upsampled) fusion mask's composite
    # of its two source images in pixel space, W x_tail + (1 - W) x_head (saliency-guided CutMix); nothing is decoded
    pixel_composite: bool = False
    # leave out of the manifest a near-copy of a real training image (nearcopy.py: a region closer to one than all but
    # near_copy_quantile of the training images are to their nearest other one, or Gu et al.'s ratio rule); near-copies
    # are then also never chosen among a slot's candidates. 0.02 found 90-100 % of exact, shifted, re-compressed,
    # recoloured and one-source fused copies on ISIC2018-LT and flagged 2 % of real test images
    # (benchmarks/results/near-copies.md)
    drop_near_copies: bool = False
    near_copy_quantile: float = 0.02
    batch_size: int = 32
    shard_size: int = 64  # images per shard: the unit of resumption and of sharing between processes
    vae: str | None = None  # default: the VAE the run was encoded with
    device: str = "cpu"
    dtype: str = "float32"


@dataclass
class PriorConfig:
    """Settings of `tailfuse train-prior`: a class-conditional latent diffusion model on the run's latents."""

    block_out_channels: list[int] | None = None  # UNet widths; default 32,64 on a CPU (0.65M parameters), 64,128,256 on a GPU
    layers_per_block: int = 1
    attention: bool = False  # self-attention in the lowest-resolution block
    epochs: int | None = None  # default 160 on a CPU (about 10 min for ISIC2018-LT on 2 cores; 40 epochs: FID of refined 5/50 186, 160: 184), 400 on a GPU
    batch_size: int = 32
    lr: float = 1e-3
    label_dropout: float = 0.15  # labels replaced by the null embedding: classifier-free guidance
    num_train_timesteps: int = 1000
    t_min: int = 0  # timesteps drawn from [t_min, t_max) in training
    # 1000 keeps `tailfuse sample` possible; a prior only for refinement at d/N <= 15/50 may stop at 300 (measured on
    # ISIC2018-LT, 160 epochs: FID of refined 5/50 184 -> 180, 15/50 200 -> 194; fusion alone 175)
    t_max: int = 1000
    ema_decay: float = 0.999
    flips: bool = True  # random horizontal flips of the latents
    seed: int = 0
    device: str = "cpu"
    name: str = "prior"  # folder of the prior in the run


@dataclass
class RefineConfig:
    """Settings of `tailfuse refine`: SDEdit-style denoising of a latent set with the run's prior (or an SD UNet)."""

    source: str = "synthetic"  # the latent set to refine (a fused set, by name)
    refine: str = "10/50"  # d/N: noise to the timestep where d of N DDIM steps remain, then denoise those d steps
    guidance: float = 2.0  # classifier-free guidance toward the sample's labels (1 = conditional only, 0 = none)
    prior: str = "prior"  # the run's trained prior (tailfuse train-prior)
    sd: str | None = None  # instead: a Stable Diffusion folder (diffusers layout: unet/, text_encoder/, tokenizer/, vae/)
    prompt_template: str = "{labels}"  # SD only: the prompt, {labels} = the sample's label names joined by ", "
    seed: int = 0
    batch_size: int = 64
    name: str | None = None  # output set; default <source>-refined
    device: str = "cpu"

    def steps(self) -> tuple[int, int]:
        try:
            d, n = (int(v) for v in str(self.refine).split("/"))
        except ValueError:
            raise TailfuseError(f"--refine '{self.refine}' must be d/N, e.g. 10/50 (d of N DDIM steps).") from None
        if n < 1 or not 0 <= d <= n:
            raise TailfuseError(f"--refine {self.refine}: need N >= 1 and 0 <= d <= N.")
        return d, n

    @property
    def out_name(self) -> str:
        return self.name or f"{self.source}-refined"
