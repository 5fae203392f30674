"""Refinement with a Stable Diffusion model (SD 1.x / 2.x or a domain model such as RoentGen, diffusers layout).

The folder must hold ``unet/`` (UNet2DConditionModel), ``text_encoder/`` (CLIPTextModel), ``tokenizer/``
(CLIPTokenizer), ``scheduler/`` and ``vae/``. Nothing is downloaded: a hub id is refused with a message asking for
the local folder. The prompt of a sample is ``prompt_template`` with ``{labels}`` replaced by its label names; the
empty prompt is the unconditional branch of classifier-free guidance.

Latent space check: the model's UNet works in the latent space of its own VAE. The run's latents must be in that
space, or refinement would denoise something the UNet has never seen. The model's VAE re-encodes up to 8 of the
run's training images (at the run's size and resize policy) and its latents are compared with the run's stored
ones: a mean cosine similarity below 0.9 (or another latent shape) refuses the model, naming both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import TailfuseError
from ..store import RunStore, file_sha256
from . import samplers

MIN_COSINE = 0.9


def latent_space_agreement(store: RunStore, codec, n: int = 8) -> float:
    """Mean cosine similarity between the run's stored latents of up to n training images and ``codec``'s encodes."""
    from ..images import load_image

    samples = store.samples()
    train = samples[samples["split"] == "train"].head(n)
    info = store.labels()
    size = int(info.get("image_size") or 128)
    resize = (store.config().get("data") or {}).get("resize", "center-crop")
    x = torch.stack([load_image(p, size, resize) for p in train["abs_path"]])
    stored = store.latents().get(train["sample_id"].to_numpy()).float()
    with torch.no_grad():
        z = codec.encode(x).float()
    if z.shape != stored.shape:
        return float("-inf")
    a, b = z.reshape(len(z), -1), stored.reshape(len(stored), -1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


class SDRefiner:
    """A Stable Diffusion UNet with text prompts from label names, as a refiner (same call as PriorRefiner)."""

    def __init__(self, store: RunStore, folder: str, template: str, device: str = "cpu"):
        from diffusers import DDIMScheduler, UNet2DConditionModel

        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            raise TailfuseError("refinement with a Stable Diffusion model needs transformers (pip install transformers)") from None
        from ..codec import VAECodec

        root = Path(folder).expanduser()
        if not root.is_dir():
            raise TailfuseError(f"--sd {folder}: not a local folder. Give a Stable Diffusion folder in the diffusers "
                                "layout (unet/, text_encoder/, tokenizer/, scheduler/, vae/); nothing is downloaded.")
        missing = [d for d in ("unet", "text_encoder", "tokenizer", "scheduler", "vae") if not (root / d).is_dir()]
        if missing:
            raise TailfuseError(f"--sd {root}: missing {', '.join(missing)}/; a Stable Diffusion folder in the diffusers "
                                "layout has unet/, text_encoder/, tokenizer/, scheduler/ and vae/.")
        if "{labels}" not in template:
            raise TailfuseError(f"--prompt-template '{template}' must contain {{labels}}.")
        codec = VAECodec.load(str(root), device)
        agree = latent_space_agreement(store, codec)
        run_vae = store.stage("encode")["vae"]["name"]
        if not agree >= MIN_COSINE:
            raise TailfuseError(
                f"the Stable Diffusion model at {root} does not share the run's latent space: its VAE encodes the run's "
                f"images to latents with cosine similarity {agree:.2f} to the run's own (encoded with {run_vae}; need >= "
                f"{MIN_COSINE}). Refine with the run's prior instead, or encode a run with this model's VAE (--vae {root}).")
        self.unet = UNet2DConditionModel.from_pretrained(str(root / "unet")).to(device).eval()
        self.text = CLIPTextModel.from_pretrained(str(root / "text_encoder")).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
        self.scheduler = DDIMScheduler.from_pretrained(str(root / "scheduler"), clip_sample=False, set_alpha_to_one=False)
        self.labels = store.labels()["labels"]
        self.template = template
        self.device = device
        weights = sorted((root / "unet").glob("*.safetensors")) or sorted((root / "unet").glob("*.bin"))
        self.identity = {"refiner": f"sd:{root.resolve()}", "refiner_sha256": file_sha256(weights[0]) if weights else "",
                         "latent_space_cosine": round(agree, 4)}
        self._cache: dict[str, torch.Tensor] = {}
        logging.getLogger("tailfuse").info(f"refine: Stable Diffusion model {root} (latent space agreement {agree:.3f})")

    def check_steps(self, d: int, n: int) -> None:
        """Every schedule is valid: a Stable Diffusion UNet is trained on all of its scheduler's timesteps."""

    def prompt(self, y: np.ndarray) -> str:
        return self.template.format(labels=", ".join(lab for lab, v in zip(self.labels, y) if v > 0))

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            tok = self.tokenizer(todo, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                                 return_tensors="pt")
            emb = self.text(tok.input_ids.to(self.device))[0]
            self._cache.update(zip(todo, emb))
        return torch.stack([self._cache[p] for p in prompts])

    def __call__(self, z: torch.Tensor, y: torch.Tensor, d: int, n: int, w: float, noise: torch.Tensor) -> torch.Tensor:
        cond = self._embed([self.prompt(v) for v in y.numpy()])
        uncond = self._embed([""] * len(y))

        def eps(x, t):
            tt = torch.full((len(x),), int(t), dtype=torch.long, device=x.device)
            if w == 1.0:
                return self.unet(x, tt, encoder_hidden_states=cond).sample
            out = self.unet(torch.cat([x, x]), torch.cat([tt, tt]), encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = out.chunk(2)
            return e_u + w * (e_c - e_u)

        return samplers.refine(eps, z.to(self.device), self.scheduler, d, n, noise.to(self.device)).cpu()
