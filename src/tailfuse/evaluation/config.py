"""Settings of `tailfuse evaluate` (one dataclass; YAML section ``evaluate``) and the arm specifications."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import yaml

from ..errors import TailfuseError
from ..stage_config import DecodeConfig, FuseConfig

ARMS = ("real", "reweight", "oversample", "smote", "mixup", "cmo", "vae-roundtrip", "tailfuse", "tailfuse-no-imitation",
        "reference")
# arms run only when named with --arms: tailfuse with the `kept` label policy (multi-label data; on multi-class data
# it equals `tailfuse`); the diffusion arms, which need the run's prior (`tailfuse train-prior`, trained first when
# missing): fusion refined by the prior, full sampling from noise, and LDMLR-style sampling of classifier features
OPTIONAL_ARMS = ("tailfuse-kept", "tailfuse-refined", "prior-sample", "feature-diffusion", "tailfuse-reviewed", "drw")
# arms that act during training epochs (they need --classifier partial, cnn or finetune): deferred re-weighting, the
# class weights of `reweight` from DRW_FROM of the epochs on (Cao et al. 2019: epoch 160 of 200)
EPOCH_ARMS = ("drw",)
DRW_FROM = 0.8
# arms made by fusion: they take settings in brackets, e.g. tailfuse[candidates=3,soft_labels=true]
FUSION_ARMS = {
    "tailfuse": {"model": "train"},
    "tailfuse-no-imitation": {"model": "train-no-imitation"},
    "reference": {"model": "train", "cam": "eigencam", "labels_policy": "tail", "soft_labels": False},
    "tailfuse-kept": {"model": "train", "labels_policy": "kept"},
    "tailfuse-refined": {"model": "train"},
}
# decode settings of the fusion arms that differ from DecodeConfig's defaults (the reference code decodes the fused
# latents alone)
FUSION_ARM_DECODE = {"reference": {"pixel_detail": False}}
# refinement settings of the fusion arms (tailfuse-refined refines by default; any fusion arm with refine=d/N does)
REFINE_DEFAULTS = {"tailfuse-refined": {"refine": "10/50", "guidance": 2.0}}
# settings of the other diffusion arms, with their defaults
DIFFUSION_ARM_SETTINGS = {"prior-sample": {"steps": 50, "guidance": 2.0, "drop_near_copies": False},
                          "feature-diffusion": {"steps": 50, "guidance": 2.0, "epochs": 300}}
# arms whose new samples are PNG images (made once per run, seed ``data_seed``) rather than rows or feature mixes
IMAGE_ARMS = ("smote", "cmo", "vae-roundtrip", "prior-sample", "tailfuse-reviewed", *FUSION_ARMS)
# arms that add no samples (the budget does not apply)
NO_BUDGET_ARMS = ("real", "reweight", "drw")
CLASSIFIERS = ("linear", "partial", "finetune", "cnn")
LOSSES = ("ce", "weighted")
# every arm is compared with each of these present (tail mAP and the decision metrics, paired bootstrap)
CONTROLS = ("real", "oversample", "cmo", "vae-roundtrip")
DEFAULT_EPOCHS = {"finetune": 8, "cnn": 30, "partial": 20}
# settings a fusion arm may override: FuseConfig's and DecodeConfig's own, not the ones the evaluation sets itself
_NOT_OVERRIDABLE = {"name", "per_class", "balance_to", "seed", "device", "vae", "dtype", "batch_size", "shard_size"}


@dataclass(frozen=True)
class ArmSpec:
    """An arm: its base (one of ARMS / OPTIONAL_ARMS) and settings overriding the base's (fusion arms: FuseConfig,
    DecodeConfig and refinement settings; diffusion arms: their own)."""

    name: str  # as given, e.g. "tailfuse[candidates=3]"
    base: str
    fuse: tuple = ()  # ((key, value), ...) for FuseConfig
    decode: tuple = ()  # ((key, value), ...) for DecodeConfig
    refine: tuple = ()  # ((key, value), ...): refine (d/N), guidance
    other: tuple = ()  # ((key, value), ...): a diffusion arm's own settings

    @property
    def slug(self) -> str:
        """Folder name of the arm's synthetic set."""
        out = self.base
        for k, v in (*self.fuse, *self.decode, *self.refine, *self.other):
            out += f"--{k}-{v}"
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in out)

    @property
    def is_image(self) -> bool:
        return self.base in IMAGE_ARMS

    @property
    def is_fusion(self) -> bool:
        return self.base in FUSION_ARMS

    def refine_settings(self) -> dict | None:
        r = {**REFINE_DEFAULTS.get(self.base, {}), **dict(self.refine)}
        return r if r.get("refine") else None

    def settings(self) -> dict:
        return {**DIFFUSION_ARM_SETTINGS.get(self.base, {}), **dict(self.other)}

    @property
    def needs_prior(self) -> bool:
        return self.base in ("prior-sample",) or self.refine_settings() is not None


def parse_arm(spec: str) -> ArmSpec:
    spec = spec.strip()
    base, _, rest = spec.partition("[")
    base = base.strip()
    if base not in ARMS + OPTIONAL_ARMS:
        raise TailfuseError(f"unknown arm '{base}'; choose from {', '.join(ARMS + OPTIONAL_ARMS)} (fusion arms take "
                            "settings in brackets, e.g. 'tailfuse[candidates=3]').")
    if not rest:
        return ArmSpec(spec, base)
    takes = FUSION_ARMS.keys() | DIFFUSION_ARM_SETTINGS.keys()
    if base not in takes or not rest.endswith("]"):
        raise TailfuseError(f"arm '{spec}': only the arms {', '.join(sorted(takes))} take settings, written as "
                            "name[key=value,key=value].")
    if base in FUSION_ARMS:
        groups = {"fuse": {f.name for f in fields(FuseConfig)} - _NOT_OVERRIDABLE,
                  "decode": {f.name for f in fields(DecodeConfig)} - _NOT_OVERRIDABLE,
                  "refine": {"refine", "guidance"}}
    else:
        groups = {"other": set(DIFFUSION_ARM_SETTINGS[base])}
    found: dict[str, list] = {g: [] for g in groups}
    for part in [p for p in rest[:-1].split(",") if p.strip()]:
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise TailfuseError(f"arm '{spec}': '{part}' is not key=value.")
        try:
            val = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            val = value.strip()
        if key == "refine":
            val = str(value.strip())
        group = next((g for g, keys in groups.items() if key in keys), None)
        if group is None:
            raise TailfuseError(f"arm '{spec}': unknown setting '{key}'; this arm takes "
                                f"{', '.join(sorted(set().union(*groups.values())))}.")
        found[group].append((key, val))
    return ArmSpec(spec, base, **{g: tuple(sorted(v)) for g, v in found.items()})


@dataclass
class EvaluateConfig:
    """Downstream evaluation: arms, classifier protocol, augmentation budget, quality figures."""

    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # seeds of the arms' draws (and of torch classifiers)
    # linear (logistic regression on frozen EfficientNet-Lite0 features) | partial (its last blocks trained on frozen
    # maps) | finetune | cnn
    classifier: str = "linear"
    # what picks the model (C, epoch, weight decay) on val: map | balanced_accuracy; default: map for linear, and for
    # the other classifiers the metric their tables lead with (balanced accuracy on multi-class data, mAP otherwise)
    select: str | None = None
    # image arms: each epoch draws the budget's n_l images per tail label afresh from a set of pool x n_l (1: the same
    # images every epoch); oversample then draws its duplicates afresh each epoch too
    pool: int = 1
    # the training loss of every arm: ce (plain cross-entropy / BCE) | weighted (each arm's loss class-weighted by the
    # class counts of its own training set, real plus added: the re-balancing a user adds on top of augmentation;
    # the reweight arm is then the real arm, and drw does not apply)
    loss: str = "ce"
    trainable_blocks: int = 3  # partial: the last MBConv blocks of EfficientNet-Lite0 that are trained
    # linear: inverse regularisation strengths C tried per arm and seed, the best on val kept
    c_grid: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3])
    epochs: int | None = None  # partial / finetune / cnn: default 20 / 8 / 30
    lr: float | None = None  # partial / finetune / cnn: default 5e-4 / 1e-4 / 1e-3
    weight_decay: list[float] = field(default_factory=lambda: [1e-4])  # finetune / cnn: the grid picked from on val
    batch_size: int = 64
    # augmentation budget: every augmentation arm adds the same number of new samples per tail label
    # (the budget rule, tailfuse.budget; default 'auto': each tail label up to the median head-label train count)
    balance_to: int | None = None  # or: top each tail label up to this many training samples
    per_class: int | None = None  # or: this many new samples per tail label
    sampling_strategy: str | float | dict | None = None  # or: 'auto', a ratio of the median head count, {label: total}
    max_ratio: float = 5.0  # 'auto' and ratios: a tail label grows to at most max_ratio x its real train count
    # budget sweep: every augmentation arm also at these multiples of each tail label's real train count
    budgets: list[float] = field(default_factory=list)
    folds: int | None = None  # K-fold evaluation of the whole pipeline (every image a test image once)
    fold_val_fraction: float = 0.1  # share of each fold's training part kept for validation
    data_seed: int = 0  # seed of the image arms' synthetic sets (made once), the folds and the bootstrap
    smote_k: int = 5  # neighbours of SMOTE / MLSMOTE
    mixup_alpha: float = 0.4  # lambda ~ Beta(alpha, alpha), folded to >= 0.5 (the tail sample dominates)
    bootstrap: int = 1000  # paired bootstrap resamples of the test images
    quality: bool = True  # FID, domain Frechet distance, k-NN precision/recall, real-vs-synthetic separability
    fid_max_images: int = 500  # at most this many images per set in the quality figures (seeded subsample)
    pr_k: int = 3  # k of the k-NN manifold precision/recall
    train_missing: bool = True  # train the 'train-no-imitation' model when the arm needs it and it is missing
    feature_batch_size: int = 32
    reviewed_set: str = "synthetic"  # tailfuse-reviewed: the set whose accepted images (tailfuse review) are used
    vae: str | None = None  # VAE for decoding the image arms (default: the one the run was encoded with)
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (default: torch's own)

    def arm_specs(self) -> list[ArmSpec]:
        return [parse_arm(a) for a in self.arms]
