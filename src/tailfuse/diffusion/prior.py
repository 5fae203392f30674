"""Small conditional denoisers trained on the run's own data: a latent UNet prior and a feature-space MLP.

Both predict the noise (epsilon) of a DDPM forward process and take a label *vector* (one-hot on multi-class data,
0/1 per label on multi-label data) through a learned linear projection into the time embedding; a learned null
embedding replaces it for the unconditional branch of classifier-free guidance. Inputs are standardised per channel
(latents) or per dimension (features) with the training data's mean and standard deviation, kept in the config, so
any VAE's latent scale works.

* ``LatentPrior``: a diffusers ``UNet2DModel`` (no attention by default; ``class_embed_type="identity"`` fed by
  the label projection), ``save_pretrained`` / ``from_pretrained`` with a folder holding ``config.json``,
  ``model.safetensors`` and the noise ``scheduler/`` config.
* ``FeaturePrior``: the same contract on vectors (a residual MLP with time and label embeddings), for the LDMLR-style
  baseline that generates classifier features instead of images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import TailfuseError
from ..store import save_tensors_atomic, write_json_atomic


def noise_scheduler(num_train_timesteps: int = 1000):
    """The training noise schedule (Stable Diffusion's: scaled-linear betas 0.00085 .. 0.012, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, prediction_type="epsilon")


class LabelEmbedding(nn.Module):
    """Label vector -> embedding; rows flagged ``uncond`` get the learned null embedding instead."""

    def __init__(self, n_labels: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(n_labels, dim)
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, y: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        e = self.proj(y.float())
        return torch.where(uncond[:, None], self.null.expand_as(e), e)


class _Saveable(nn.Module):
    kind = "base"

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def destandardise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x) + self.mean.to(x)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(folder / "model.safetensors", {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()})
        write_json_atomic(folder / "config.json", {"kind": self.kind, **self.config})
        noise_scheduler(self.config.get("num_train_timesteps", 1000)).save_pretrained(folder / "scheduler")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "_Saveable":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise TailfuseError(f"{folder} holds no trained prior (config.json missing); run `tailfuse train-prior`.")
        cfg = json.loads((folder / "config.json").read_text())
        kind = cfg.pop("kind", None)
        klass = {"latent-prior": LatentPrior, "feature-prior": FeaturePrior}.get(kind)
        if klass is None or (cls is not _Saveable and klass is not cls):
            raise TailfuseError(f"{folder} holds a '{kind}' model, not a {cls.kind}.")
        model = klass(cfg)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.to(device).eval()

    def scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(noise_scheduler(self.config.get("num_train_timesteps", 1000)).config)


class LatentPrior(_Saveable):
    """Class-conditional epsilon-prediction UNet on standardised latents (C x h x w)."""

    kind = "latent-prior"

    def __init__(self, config: dict):
        super().__init__(config)
        from diffusers import UNet2DModel

        widths = tuple(config["block_out_channels"])
        n = len(widths)
        attn = bool(config.get("attention", False))
        self.unet = UNet2DModel(
            sample_size=config["sample_size"], in_channels=config["channels"], out_channels=config["channels"],
            block_out_channels=widths, layers_per_block=config.get("layers_per_block", 1),
            down_block_types=("DownBlock2D",) * (n - 1) + (("AttnDownBlock2D",) if attn else ("DownBlock2D",)),
            up_block_types=(("AttnUpBlock2D",) if attn else ("UpBlock2D",)) + ("UpBlock2D",) * (n - 1),
            norm_num_groups=min(32, widths[0]), class_embed_type="identity")
        self.labels = LabelEmbedding(config["n_labels"], widths[0] * 4)
        self.register_buffer("mean", torch.tensor(config["mean"], dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(config["std"], dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=self.labels(y, uncond)).sample


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.sin(), a.cos()], dim=1)


class FeaturePrior(_Saveable):
    """Class-conditional epsilon-prediction residual MLP on standardised feature vectors (the LDMLR baseline)."""

    kind = "feature-prior"

    def __init__(self, config: dict):
        super().__init__(config)
        d, h = config["dim"], config.get("hidden", 512)
        self.temb = nn.Sequential(nn.Linear(128, h), nn.SiLU(), nn.Linear(h, h))
        self.labels = LabelEmbedding(config["n_labels"], h)
        self.inp = nn.Linear(d, h)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
                                    for _ in range(config.get("blocks", 3)))
        self.out = nn.Sequential(nn.LayerNorm(h), nn.SiLU(), nn.Linear(h, d))
        self.register_buffer("mean", torch.tensor(config["mean"], dtype=torch.float32))
        self.register_buffer("std", torch.tensor(config["std"], dtype=torch.float32))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        c = self.temb(_timestep_embedding(t, 128)) + self.labels(y, uncond)
        h = self.inp(x)
        for blk in self.blocks:
            h = h + blk(h + c)
        return self.out(h)
