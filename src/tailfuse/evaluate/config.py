"""Settings of `tailfuse evaluate` (one dataclass; YAML section ``evaluate``)."""

from __future__ import annotations

from dataclasses import dataclass, field

ARMS = ("real", "reweight", "oversample", "smote", "mixup", "tailfuse", "tailfuse-no-imitation", "reference")
# arms run only when named with --arms: tailfuse with the `kept` label policy (multi-label data; on multi-class data
# it equals `tailfuse`)
OPTIONAL_ARMS = ("tailfuse-kept",)
# arms whose new samples are PNG images (made once per run, seed ``data_seed``) rather than rows or feature mixes
IMAGE_ARMS = ("smote", "tailfuse", "tailfuse-no-imitation", "reference", "tailfuse-kept")
CLASSIFIERS = ("linear", "finetune", "cnn")
DEFAULT_EPOCHS = {"linear": 60, "finetune": 8, "cnn": 30}


@dataclass
class EvaluateConfig:
    """Downstream evaluation: arms, classifier protocol, augmentation budget, quality figures."""

    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # classifier seeds (init, shuffling, draws)
    classifier: str = "linear"  # linear (frozen EfficientNet-Lite0 features) | finetune | cnn
    epochs: int | None = None  # default per classifier: linear 60, finetune 8, cnn 30
    lr: float | None = None  # default per classifier: linear 1e-3, finetune 1e-4, cnn 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    # augmentation budget: every augmentation arm adds the same number of new samples per tail label
    balance_to: int | None = None  # target train count per tail label; default: median head-label train count
    per_class: int | None = None  # or: this many new samples per tail label (overrides balance_to)
    max_ratio: float = 5.0  # with balance_to: a tail label grows to at most max_ratio x its real train count
    data_seed: int = 0  # seed of the image arms' synthetic sets (made once) and of the bootstrap
    smote_k: int = 5  # neighbours of SMOTE / MLSMOTE
    mixup_alpha: float = 0.4  # lambda ~ Beta(alpha, alpha), folded to >= 0.5 (the tail sample dominates)
    bootstrap: int = 1000  # paired bootstrap resamples of the test images
    quality: bool = True  # FID, domain Frechet distance, k-NN precision/recall
    fid_max_images: int = 500  # at most this many images per set in the quality figures (seeded subsample)
    pr_k: int = 3  # k of the k-NN manifold precision/recall
    train_missing: bool = True  # train the 'train-no-imitation' model when the arm needs it and it is missing
    feature_batch_size: int = 32
    vae: str | None = None  # VAE for decoding the SMOTE / fusion arms (default: the one the run was encoded with)
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (default: torch's own)
