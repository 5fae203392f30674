"""Tiny diffusers VAEs built in code (random weights), saved and reloaded through from_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_autoencoder_kl(folder: Path, scaling_factor: float = 0.5, shift_factor: float | None = 0.1, sd_layout: bool = False) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    target = folder / "vae" if sd_layout else folder
    vae.save_pretrained(target)
    if sd_layout:
        (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}')
    return folder


def tiny_autoencoder_tiny(folder: Path) -> Path:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    vae.save_pretrained(folder)
    return folder


def coloured_manifest(root: Path, n: int, n_train: int, seed: int = 0) -> Path:
    """``n`` random 64 px images in three classes a / b / t (t, the tail, every fifth image), each class brightening
    its own colour channel; the first ``n_train`` are train, the rest val. Returns ``root/in/m.csv``."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "in" / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        c = "t" if i % 5 == 1 else ("a" if i % 2 else "b")
        img = rng.integers(0, 80, (64, 64, 3)).astype(np.uint8)
        img[:, :, "abt".index(c)] += 150
        Image.fromarray(img).save(root / "in" / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "split": "train" if i < n_train else "val", **{k: int(k == c) for k in "abt"}})
    pd.DataFrame(rows).to_csv(root / "in" / "m.csv", index=False)
    return root / "in" / "m.csv"
