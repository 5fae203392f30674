"""The three nets of the sparse code, on VAE latents (fully convolutional: any h x w, 16x16 or 64x64).

* Encoder E: latent (C x h x w, standardised per channel) -> features g (d x h x w) -> logits over K symbols,
  ``logits_k = -||g - c_k||^2 / tau`` with a learned codebook ``c`` (K x d), then a softmax over the K channels at
  every position: a simplicial embedding whose sharpness is set by tau and by how close g lies to a code vector.
  Nothing bounds the logits before the softmax. ``g = [z, 0] + h(z)`` with h's last layer zero-initialised and the
  codebook initialised by k-means, so E starts as the k-means quantiser of the latent and learns spatial context.
* Decoder D: code (K x h x w) -> latent, unbounded; a per-symbol linear map (the "codebook decode") plus a residual
  net with spatial context.
* Classifier C: code -> one logit per label (sigmoid/BCE for multi-label, softmax/CE for multi-class).

GroupNorm everywhere: no running statistics, so train and eval behave the same.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c // 4) if c >= 8 else 1, c)


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.n1, self.c1 = group_norm(c), nn.Conv2d(c, c, 3, padding=1)
        self.n2, self.c2 = group_norm(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x)))
        return x + self.c2(F.silu(self.n2(h)))


class Encoder(nn.Module):
    def __init__(self, in_channels: int, k: int, dim: int, width: int, blocks: int):
        super().__init__()
        if dim < in_channels:
            raise ValueError(f"code dimension {dim} must be at least the latent channels {in_channels}")
        self.in_channels, self.k, self.dim = in_channels, k, dim
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.norm = group_norm(width)
        self.head = nn.Conv2d(width, dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.codebook = nn.Parameter(torch.randn(k, dim) * 0.5)

    def features(self, zs: torch.Tensor) -> torch.Tensor:
        h = self.head(F.silu(self.norm(self.blocks(self.stem(zs)))))
        return F.pad(zs, (0, 0, 0, 0, 0, self.dim - self.in_channels)) + h

    def forward(self, zs: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits N x K x h x w, features N x d x h x w)."""
        g = self.features(zs)
        c = self.codebook
        dist2 = (g * g).sum(1, keepdim=True) - 2 * torch.einsum("ndhw,kd->nkhw", g, c) + (c * c).sum(1)[None, :, None, None]
        return -dist2 / tau, g


class Decoder(nn.Module):
    def __init__(self, k: int, out_channels: int, width: int, blocks: int):
        super().__init__()
        self.inp = nn.Conv2d(k, width, 1)
        self.stem = nn.Conv2d(width, width, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.norm = group_norm(width)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.skip = nn.Conv2d(k, out_channels, 1, bias=False)  # symbol -> latent vector (codebook decode)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.skip(code) + self.out(F.silu(self.norm(self.blocks(self.stem(self.inp(code))))))


class Classifier(nn.Module):
    def __init__(self, k: int, n_labels: int, width: int):
        super().__init__()
        self.inp = nn.Conv2d(k, width, 3, padding=1)
        self.block = ResBlock(width)  # full resolution: the default saliency (CAM) layer
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.block2 = ResBlock(2 * width)
        self.norm = group_norm(2 * width)
        self.fc = nn.Linear(2 * width, n_labels)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        h = self.block(self.inp(code))
        h = F.silu(self.norm(self.block2(self.down(h))))
        return self.fc(h.mean((2, 3)))

    def cam_layer(self, which: str = "full") -> nn.Module:
        """Layer whose activations saliency methods weigh: ``full`` (latent resolution) or ``half``."""
        return {"full": self.block, "half": self.block2}[which]


class SparseModel(nn.Module):
    """E, D and C with the latent statistics they were trained on. Inputs and outputs are raw (scaled) latents."""

    def __init__(self, in_channels: int, n_labels: int, multi_label: bool, k: int, dim: int, tau: float,
                 width_e: int, blocks_e: int, width_d: int, blocks_d: int, width_c: int):
        super().__init__()
        self.hparams = dict(in_channels=in_channels, n_labels=n_labels, multi_label=multi_label, k=k, dim=dim, tau=tau,
                            width_e=width_e, blocks_e=blocks_e, width_d=width_d, blocks_d=blocks_d, width_c=width_c)
        self.k, self.tau, self.multi_label = k, tau, multi_label
        self.E = Encoder(in_channels, k, dim, width_e, blocks_e)
        self.D = Decoder(k, in_channels, width_d, blocks_d)
        self.C = Classifier(k, n_labels, width_c)
        self.register_buffer("mu_c", torch.zeros(1, in_channels, 1, 1))  # per-channel mean of train latents
        self.register_buffer("sd_c", torch.ones(1, in_channels, 1, 1))  # per-channel std
        self.register_buffer("mu", torch.zeros(1, in_channels, 1, 1))  # per-element mean (trivial predictor)

    def set_stats(self, z_train: torch.Tensor) -> None:
        self.mu_c = z_train.mean((0, 2, 3), keepdim=True)
        self.sd_c = z_train.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
        self.mu = z_train.mean(0, keepdim=True)

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mu_c) / self.sd_c

    def unstandardise(self, zs: torch.Tensor) -> torch.Tensor:
        return zs * self.sd_c + self.mu_c

    def logits(self, z: torch.Tensor, encoder: Encoder | None = None) -> torch.Tensor:
        return (encoder or self.E)(self.standardise(z), self.tau)[0]

    def code(self, z: torch.Tensor) -> torch.Tensor:
        """Soft code: N x K x h x w, a probability distribution over K symbols at every position."""
        return self.logits(z).softmax(1)

    def hard_code(self, z: torch.Tensor) -> torch.Tensor:
        """One-hot code of the most probable symbol at every position."""
        return one_hot(self.logits(z).argmax(1), self.k)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.unstandardise(self.D(code))

    def classify(self, code: torch.Tensor) -> torch.Tensor:
        return self.C(code)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multi_label else logits.softmax(1)

    # --- persistence, as diffusers' ModelMixin does it: a folder with config.json and model.safetensors
    def save_pretrained(self, folder, extra: dict | None = None) -> None:
        from ..store import save_tensors_atomic, write_json_atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(folder / "model.safetensors", {k: v.detach().cpu() for k, v in self.state_dict().items()})
        write_json_atomic(folder / "config.json", {"hparams": self.hparams, **(extra or {})})

    @classmethod
    def from_pretrained(cls, folder, device: str = "cpu") -> "SparseModel":
        import json

        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            from ..errors import TailfuseError

            raise TailfuseError(f"{folder} holds no sparse model (config.json and model.safetensors).")
        cfg = json.loads((folder / "config.json").read_text())
        model = cls(**cfg["hparams"])
        state = load_file(str(folder / "model.safetensors"))
        model.mu = torch.empty_like(state["mu"])  # the per-element mean has the latent grid's shape
        model.load_state_dict(state)
        return model.to(device).eval()

    @classmethod
    def from_run(cls, store, name: str = "train", generation: int | None = None, device: str = "cpu") -> "SparseModel":
        """The trained model ``name`` of a run folder: its last generation unless ``generation`` is given."""
        from ..errors import TailfuseError

        rec = store.stage(name)
        if not rec or not rec.get("generations_done"):
            raise TailfuseError(f"run folder {store.root} has no trained model '{name}'; run `tailfuse train` first.")
        gens = rec["generations_done"]
        g = gens[-1] if generation is None else generation
        if g not in gens:
            raise TailfuseError(f"model '{name}' has generations {gens}; generation {g} does not exist.")
        return cls.from_pretrained(store.root / name / f"gen-{g:02d}", device)


def one_hot(index: torch.Tensor, k: int) -> torch.Tensor:
    """N x h x w symbol indices -> N x K x h x w one-hot float code."""
    return F.one_hot(index, k).permute(0, 3, 1, 2).float()


def positions(t: torch.Tensor) -> torch.Tensor:
    """N x C x h x w -> (N*h*w) x C: one row per spatial position (channels last, then flatten)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
