"""The VAE of the latent diffusion model: load, encode (posterior mean), decode, scaling.

Supported: ``diffusers.AutoencoderKL`` (a VAE folder, or the ``vae`` sub-folder of a Stable Diffusion folder) and
``diffusers.AutoencoderTiny`` (TAESD), from a local folder or a hub id; the class is read from the config.
Latents are stored *scaled*: ``(z - shift_factor) * scaling_factor``, both read from the model's config, so they
live in the space a diffusion UNet of that model expects. Images are tensors in [0, 1]; the VAE's own pixel range
(``[-1, 1]`` for both classes in diffusers) is applied inside ``encode`` / ``decode``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import TailfuseError

VAE_ENV = "TAILFUSE_VAE"
HUB_DEFAULT = "madebyollin/taesd"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The pixel range each diffusers VAE class is trained on (diffusers' VaeImageProcessor normalises to [-1, 1]).
PIXEL_RANGE = {"AutoencoderKL": (-1.0, 1.0), "AutoencoderTiny": (-1.0, 1.0)}
PIXELS_PER_PASS = 32 * 128 * 128  # image pixels per VAE forward pass before slicing (see VAECodec._slice_if_large)


def resolve_vae_name(name: str | None) -> str:
    """``--vae`` if given, else ``$TAILFUSE_VAE``; a clear error when neither is set."""
    name = name or os.environ.get(VAE_ENV)
    if not name:
        raise TailfuseError(
            f"no VAE given: pass --vae <folder | hub id> (a diffusers AutoencoderKL/AutoencoderTiny folder, a Stable "
            f"Diffusion folder, or e.g. '{HUB_DEFAULT}'), or set ${VAE_ENV}."
        )
    return name


def validate_vae(cfg) -> None:
    """The VAE setting checked before any work (a wrong --vae fails in a second, before the data is read): a VAE is
    named, its folder holds a VAE config (or the hub id answers), the dtype is known."""
    if cfg.dtype not in DTYPES:
        raise TailfuseError(f"dtype '{cfg.dtype}' not supported; choose from {', '.join(DTYPES)}.")
    _locate(resolve_vae_name(cfg.vae))


def _locate(name: str) -> tuple[Path, str | None, dict]:
    """Find the VAE config: returns (folder holding the model, subfolder or None, config dict)."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise TailfuseError(f"VAE path {p} is a file; pass the folder holding config.json and the weights.")
        if (p / "config.json").is_file():
            return p, None, json.loads((p / "config.json").read_text())
        if (p / "vae" / "config.json").is_file():
            return p, "vae", json.loads((p / "vae" / "config.json").read_text())
        raise TailfuseError(
            f"VAE folder {p} holds no config.json (nor vae/config.json): pass a diffusers VAE folder or a Stable "
            "Diffusion folder."
        )
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise TailfuseError(f"VAE folder {name} does not exist.")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=["config.json", "vae/config.json", "model_index.json"]))
    except Exception as e:  # offline, unknown repo, ...
        raise TailfuseError(
            f"VAE '{name}' is not a local folder and could not be fetched from the model hub ({type(e).__name__}). "
            "Without a network, pass a local folder (e.g. a copy of madebyollin/taesd) with --vae or $TAILFUSE_VAE."
        ) from None
    sub = None if (folder / "config.json").is_file() else "vae"
    cfg_file = folder / (sub or ".") / "config.json"
    if not cfg_file.is_file():
        raise TailfuseError(f"hub repository '{name}' holds no VAE config (config.json or vae/config.json).")
    return folder, sub, json.loads(cfg_file.read_text())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class VAECodec:
    """A loaded VAE with encode/decode on [0, 1] images and scaled latents."""

    def __init__(self, vae: torch.nn.Module, name: str, config: dict, device: str, dtype: torch.dtype, weights_sha256: str):
        self.vae = vae.eval().requires_grad_(False)
        # On CPU the convolutions run in channels-last layout (oneDNN's native one): TAESD encodes and decodes
        # faster with the same result up to float rounding (benchmarks/results/codec-layout.md).
        self.memory_format = torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format
        self.vae.to(memory_format=self.memory_format)
        self.name = name
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.kind = config.get("_class_name", type(vae).__name__)
        self.scaling_factor = float(config.get("scaling_factor") or 1.0)
        self.shift_factor = float(config.get("shift_factor") or 0.0)
        self.pixel_range = PIXEL_RANGE[self.kind]
        self.latent_channels = int(config.get("latent_channels", 4))
        if self.kind == "AutoencoderTiny":
            self.downsample = 2 ** (len(config.get("encoder_block_out_channels", [64] * 4)) - 1)
        else:
            self.downsample = 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)
        self.weights_sha256 = weights_sha256

    @classmethod
    def load(cls, name: str | None = None, device: str = "cpu", dtype: str = "float32") -> "VAECodec":
        name = resolve_vae_name(name)
        if dtype not in DTYPES:
            raise TailfuseError(f"dtype '{dtype}' not supported; choose from {', '.join(DTYPES)}.")
        dev = _check_device(device)
        folder, sub, config = _locate(name)
        kind = config.get("_class_name")
        import diffusers

        if kind not in PIXEL_RANGE:
            raise TailfuseError(
                f"VAE '{name}' is a {kind}; tailfuse supports {', '.join(PIXEL_RANGE)} (diffusers classes)."
            )
        torch_dtype = DTYPES[dtype]
        if torch_dtype == torch.float16 and config.get("force_upcast", False):
            warnings.warn(f"{name}: config asks for force_upcast; running the VAE in float32.", stacklevel=2)
            torch_dtype = torch.float32
        model_cls = getattr(diffusers, kind)
        src = str(folder) if Path(name).expanduser().exists() else name
        try:
            kwargs = {"subfolder": sub} if sub else {}
            vae = model_cls.from_pretrained(src, torch_dtype=torch_dtype, **kwargs)
        except OSError as e:
            raise TailfuseError(f"could not load the {kind} weights from '{name}': {e}") from None
        weights = sorted(Path(folder, sub or ".").glob("*.safetensors")) or sorted(Path(folder, sub or ".").glob("*.bin"))
        digest = hashlib.sha256("".join(_file_sha256(w) for w in weights).encode()).hexdigest() if weights else ""
        shown = str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name
        return cls(vae.to(dev), shown, dict(vae.config), str(dev), torch_dtype, digest)

    def identity(self) -> dict:
        """What identifies this VAE for hashing and provenance."""
        return {
            "name": self.name,
            "class": self.kind,
            "weights_sha256": self.weights_sha256,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def fingerprint(self) -> dict:
        """The identity without the name it was loaded by (the same weights under another path hash the same)."""
        return {k: v for k, v in self.identity().items() if k != "name"}

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        s = image_size // self.downsample
        return (self.latent_channels, s, s)

    def _to_pixels(self, images01: torch.Tensor) -> torch.Tensor:
        lo, hi = self.pixel_range
        return images01 * (hi - lo) + lo

    def _from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.pixel_range
        return ((x - lo) / (hi - lo)).clamp(0, 1)

    def _slice_if_large(self, n: int, height: int, width: int) -> None:
        """diffusers' VAE slicing (one image per forward pass) when a batch holds more than PIXELS_PER_PASS pixels:
        32 images of 128 px go through at once as before; at 512 px the activations of a batch of 32 took 9.6 GB."""
        if hasattr(self.vae, "use_slicing"):
            self.vae.use_slicing = n * height * width > PIXELS_PER_PASS

    @torch.no_grad()
    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W images in [0, 1] -> B x C x h x w scaled latents (float32, CPU). Deterministic."""
        x = self._to_pixels(images01.to(self.device, self.dtype)).contiguous(memory_format=self.memory_format)
        self._slice_if_large(len(x), x.shape[-2], x.shape[-1])
        out = self.vae.encode(x)
        z = out.latents if self.kind == "AutoencoderTiny" else out.latent_dist.mean
        z = (z.float() - self.shift_factor) * self.scaling_factor
        return z.cpu().contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """B x C x h x w scaled latents -> B x 3 x H x W images in [0, 1] (float32, CPU)."""
        z = latents.float() / self.scaling_factor + self.shift_factor
        self._slice_if_large(len(z), z.shape[-2] * self.downsample, z.shape[-1] * self.downsample)
        x = self.vae.decode(z.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)).sample
        return self._from_pixels(x.float()).cpu().contiguous()

    def decode_batched(self, latents: torch.Tensor, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
        outs = []
        for i in tqdm(range(0, len(latents), batch_size), desc="decode", disable=not progress, leave=False):
            outs.append(self.decode(latents[i : i + batch_size]))
        return torch.cat(outs) if outs else torch.empty(0)


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TailfuseError(f"device '{device}' not understood; use cpu, cuda, cuda:0, mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TailfuseError(f"device '{device}' asked for, but CUDA is not available here; use --device cpu.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise TailfuseError("device 'mps' asked for, but MPS is not available here; use --device cpu.")
    return dev
