"""`tailfuse train-prior`: a class-conditional latent diffusion model on the run's training latents (resumable).

Output, in ``<run>/<name>/`` (name default ``prior``):
  model/            the EMA weights (``LatentPrior.save_pretrained``: config.json, model.safetensors, scheduler/)
  metrics.jsonl     per epoch: train loss, val loss (the EMA model, fixed noise), seconds
  loss.png          the loss curve
  state.pt          while training: model, EMA, optimiser, generator and history after every epoch (for resume)

Training: DDPM epsilon prediction with Stable Diffusion's noise schedule; timesteps drawn uniformly from
``[t_min, t_max)`` (refinement only visits low noise levels, so a smaller ``t_max`` trains the part it uses); labels
dropped with probability ``label_dropout`` (the null embedding), so classifier-free guidance works; random
horizontal flips of the latents; AdamW; an EMA of the weights (diffusers ``EMAModel``) is what gets saved. The
shuffling, noise, timesteps and drops come from one seeded generator saved with every checkpoint, so a resumed run
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import PriorConfig, stable_hash
from ..errors import TailfuseError, q
from ..dist import current
from ..stage import Stage
from ..store import RunStore, torch_save_atomic, write_text_atomic
from ..threads import adapt, adaptive

log = logging.getLogger("tailfuse")
from .prior import FeaturePrior, LatentPrior, noise_scheduler


def resolve_sizes(cfg: PriorConfig) -> PriorConfig:
    """Defaults by device: what fits about 10 minutes on 2 CPU cores, larger on a GPU."""
    import dataclasses

    gpu = torch.device(cfg.device).type == "cuda"
    widths = cfg.block_out_channels or ([64, 128, 256] if gpu else [32, 64])
    epochs = cfg.epochs or (400 if gpu else 160)
    return dataclasses.replace(cfg, block_out_channels=list(widths), epochs=int(epochs))


def validate(cfg: PriorConfig) -> None:
    if cfg.epochs is not None and cfg.epochs < 1:
        raise TailfuseError("--epochs must be at least 1.")
    if cfg.batch_size < 2 or cfg.lr <= 0:
        raise TailfuseError("--batch-size must be >= 2 and --lr > 0.")
    if not 0 <= cfg.label_dropout < 1:
        raise TailfuseError("--label-dropout must be in [0, 1).")
    if not 0 <= cfg.t_min < cfg.t_max <= cfg.num_train_timesteps:
        raise TailfuseError(f"--t-min / --t-max must satisfy 0 <= t_min < t_max <= {cfg.num_train_timesteps}.")
    if cfg.block_out_channels is not None and (not cfg.block_out_channels or min(cfg.block_out_channels) < 4):
        raise TailfuseError("--widths takes positive channel counts (at least 4), e.g. 32,64.")


def train_denoiser(model, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, cfg: PriorConfig,
                   folder: Path, progress: bool, flips: bool, desc: str) -> tuple[torch.nn.Module, list[dict]]:
    """The training loop shared by the latent prior and the feature prior. ``x`` is standardised already.
    Returns the EMA model and the per-epoch history; checkpoints into ``folder/state.pt`` after every epoch."""
    from diffusers.training_utils import EMAModel

    sched = noise_scheduler(cfg.num_train_timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    state_path = folder / "state.pt"
    history: list[dict] = []
    start = 0
    if state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        ema.load_state_dict(st["ema"])
        gen.set_state(st["gen"])
        history, start = st["history"], st["epoch"]
        log.info(f"resuming {desc} at epoch {start}/{cfg.epochs}")
    # validation: fixed noise and timesteps, so the curve compares epochs
    vg = torch.Generator().manual_seed(12345)
    v_noise = torch.randn(x_val.shape, generator=vg)
    v_t = torch.randint(cfg.t_min, cfg.t_max, (len(x_val),), generator=vg)
    n = len(x)
    bar = tqdm(total=cfg.epochs, initial=start, desc=desc, unit="epoch", disable=not progress, file=sys.stderr)
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.time()
            model.train()
            perm = torch.randperm(n, generator=gen)
            losses = []
            for a in range(0, n, cfg.batch_size):
                adapt()  # follow the CPUs other jobs leave free (tailfuse.threads)
                idx = perm[a : a + cfg.batch_size]
                if len(idx) < 2:
                    continue
                x0 = x[idx]
                if flips:
                    flip = torch.rand(len(idx), generator=gen) < 0.5
                    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
                noise = torch.randn(x0.shape, generator=gen)
                t = torch.randint(cfg.t_min, cfg.t_max, (len(idx),), generator=gen)
                drop = torch.rand(len(idx), generator=gen) < cfg.label_dropout
                loss = F.mse_loss(model(sched.add_noise(x0, noise, t), t, y[idx], drop), noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ema.step(model.parameters())
                losses.append(loss.item())
            val_loss = None
            if len(x_val):
                ema_model = copy.deepcopy(model)
                ema.copy_to(ema_model.parameters())
                ema_model.eval()
                with torch.no_grad():
                    pred = ema_model(sched.add_noise(x_val, v_noise, v_t), v_t, y_val,
                                     torch.zeros(len(x_val), dtype=torch.bool))
                    val_loss = float(F.mse_loss(pred, v_noise))
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                            "val_loss": val_loss, "seconds": round(time.time() - t0, 2)})
            bar.set_postfix(loss=round(history[-1]["train_loss"] or 0, 4), val=round(val_loss or 0, 4))
            bar.update(1)
            torch_save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
                                "gen": gen.get_state(), "history": history, "epoch": epoch + 1}, state_path)
            write_text_atomic(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    finally:
        bar.close()
    ema.copy_to(model.parameters())
    return model.eval(), history


def _loss_plot(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [h["epoch"] + 1 for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], label="train (batch mean)")
    if any(h["val_loss"] is not None for h in history):
        ax.plot(ep, [h["val_loss"] for h in history], label="val (EMA weights, fixed noise)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def label_matrix(store: RunStore, split: str) -> tuple[np.ndarray, torch.Tensor]:
    samples = store.samples()
    labels = store.labels()["labels"]
    sub = samples[samples["split"] == split]
    return sub["sample_id"].to_numpy(), torch.from_numpy(sub[labels].to_numpy(dtype=np.float32))


@adaptive
def run_train_prior(run: str, cfg: PriorConfig, force: bool = False, progress: bool = True) -> dict:
    validate(cfg)
    cfg = resolve_sizes(cfg)
    store = RunStore(run)
    store.require("encode")
    enc = store.stage("encode")
    name = cfg.name
    folder = store.root / name
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("device", "name")}
    config_hash = stable_hash({"prior": settings, "encode": enc["config_hash"], "inputs": enc["inputs_hash"]})
    st = Stage.open(store, name, config_hash, what=f"a prior '{name}' (trained with other settings or on another encode)",
                    wipe=[folder], force=force, inputs={"encode": enc["config_hash"]}, dist=current(cfg.device))
    if st.done:
        log.info(f"train-prior already done for '{name}'; skipping (`{st.redo}` redoes it).")
        return st.record
    if not st.dist.is_main:  # several processes: the main process trains, the others wait for its model
        st.finish(with_shards=False)
        return store.stage(name)
    torch.manual_seed(int(cfg.seed))
    ids, y = label_matrix(store, "train")
    if len(ids) < 2:
        raise TailfuseError("the run has fewer than 2 training latents; nothing to train on.")
    vids, yv = label_matrix(store, "val")
    shards = store.latents()
    z = shards.get(ids).float()
    zv = shards.get(vids).float() if len(vids) else torch.empty((0, *z.shape[1:]))
    info = store.labels()
    mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3)).clamp_min(1e-6)
    model = LatentPrior({"sample_size": int(z.shape[-1]), "channels": int(z.shape[1]),
                         "block_out_channels": cfg.block_out_channels, "layers_per_block": cfg.layers_per_block,
                         "attention": cfg.attention, "n_labels": len(info["labels"]), "labels": info["labels"],
                         "multi_label": bool(info["multi_label"]), "mean": mean.tolist(), "std": std.tolist(),
                         "num_train_timesteps": cfg.num_train_timesteps, "t_range": [cfg.t_min, cfg.t_max],
                         "label_dropout": cfg.label_dropout})
    n_params = sum(p.numel() for p in model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    store.write_config(name, asdict(cfg))
    st.update(n_parameters=n_params, n_train=int(len(ids)), n_val=int(len(vids)))
    if torch.device(cfg.device).type != "cpu":
        log.info("note: the prior trains on the CPU in this version; --device applies to sampling")
    t0 = time.time()
    s = lambda v: (v - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # noqa: E731
    model, history = train_denoiser(model, s(z), y, s(zv), yv, cfg, folder, progress, flips=cfg.flips,
                                    desc=f"train-prior {name}")
    model.save_pretrained(folder / "model")
    _loss_plot(history, folder / "loss.png", f"latent prior '{name}' ({n_params / 1e6:.2f}M parameters)")
    (folder / "state.pt").unlink(missing_ok=True)
    rec = st.finish(with_shards=False, seconds=round(sum(h["seconds"] for h in history), 1), epochs=len(history),
                    final_train_loss=history[-1]["train_loss"], final_val_loss=history[-1]["val_loss"],
                    wall_seconds_last_call=round(time.time() - t0, 1))
    vl = history[-1]["val_loss"]
    log.info(f"trained prior '{name}' ({n_params / 1e6:.2f}M parameters, {len(history)} epochs, {rec['seconds']:.0f} s): "
             f"val loss {vl if vl is not None else float('nan'):.4f}")
    return rec


def load_prior(store: RunStore, name: str = "prior", device: str = "cpu") -> tuple[LatentPrior, str]:
    """The trained prior of a run and the SHA-256 of its weights."""
    from ..store import file_sha256

    rec = store.stage(name)
    if not rec or rec.get("status") != "done":
        raise TailfuseError(f"run folder {store.root} has no trained prior '{name}'; run `tailfuse train-prior --run "
                            f"{q(store.root)}` first.")
    folder = store.root / name / "model"
    return LatentPrior.from_pretrained(folder, device), file_sha256(folder / "model.safetensors")


def train_feature_prior(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, cfg: PriorConfig,
                        folder: Path, progress: bool = False) -> FeaturePrior:
    """The LDMLR-style baseline's denoiser: the same trainer on feature vectors (N x D)."""
    x = torch.from_numpy(np.asarray(x, dtype=np.float32))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    model = FeaturePrior({"dim": int(x.shape[1]), "n_labels": int(y.shape[1]), "mean": mean.tolist(),
                          "std": std.tolist(), "num_train_timesteps": cfg.num_train_timesteps, "hidden": 512,
                          "blocks": 3})
    torch.manual_seed(int(cfg.seed))
    folder.mkdir(parents=True, exist_ok=True)
    xv = torch.from_numpy(np.asarray(x_val, dtype=np.float32))
    model, _ = train_denoiser(model, (x - mean) / std, torch.from_numpy(np.asarray(y, np.float32)), (xv - mean) / std,
                              torch.from_numpy(np.asarray(y_val, np.float32)), cfg, folder, progress, flips=False,
                              desc="feature prior")
    return model
