"""`tailfuse refine`: the paper's diffusion step, few-step SDEdit refinement of a latent set (resumable).

Every latent of the source set (a fused set, by name) is noised to the timestep where d of N DDIM steps remain and
denoised those d steps (``samplers.refine``), with classifier-free guidance ``w`` toward the sample's own labels:

* with the run's prior (`tailfuse train-prior`, the default): the label vector through its label projection;
* with a Stable Diffusion folder (``--sd``, diffusers layout: SD 1.x / 2.x or a domain model such as RoentGen): a
  text prompt made from the label names by ``--prompt-template`` (``{labels}`` = the names joined by ", "; the empty
  prompt is the unconditional branch). The SD model must share the run's latent space: its own VAE re-encodes some
  of the run's training images and the result must match the run's stored latents (cosine similarity >= 0.9),
  otherwise the model is refused.

d = 0 returns every latent unchanged; the change grows with d. Each sample's noise comes from its own generator
(seed, synth_id), so results do not depend on batching or resumption. Output, in ``<run>/<name>/`` (default
``<source>-refined``): ``latents/`` shards (refined ``latents``, the source's fusion ``mask``, ``synth_id``) and
``samples.csv`` (the source's provenance plus ``refine_d``, ``refine_n``, ``guidance``, ``refiner``,
``refiner_sha256``, ``refine_seed``). `tailfuse decode --name <name>` decodes it like any latent set.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import RefineConfig, stable_hash
from ..errors import TailfuseError
from ..store import RunStore, file_sha256, now, open_stage, save_tensors_atomic, write_csv_atomic
from . import samplers


def _sample_noise(seed: int, ids, shape) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i)) % 2**63))
                        for i in ids])


class PriorRefiner:
    """The run's latent prior as a refiner: eps(x, t) toward label vectors, on standardised latents."""

    def __init__(self, store: RunStore, name: str, device: str):
        from .train_prior import load_prior

        self.model, self.sha = load_prior(store, name, device)
        self.scheduler = samplers.ddim_scheduler(self.model.scheduler())
        self.identity = {"refiner": f"prior:{name}", "refiner_sha256": self.sha}
        self.device = device

    def __call__(self, z: torch.Tensor, y: torch.Tensor, d: int, n: int, w: float, noise: torch.Tensor) -> torch.Tensor:
        if d == 0:
            return z.clone()  # no step: the latents themselves (not a standardise round trip)
        x0 = self.model.standardise(z.to(self.device))
        eps = samplers.guided(self.model, y.to(self.device), w)
        return self.model.destandardise(samplers.refine(eps, x0, self.scheduler, d, n, noise.to(self.device))).cpu()

    def generate(self, y: torch.Tensor, n: int, w: float, noise: torch.Tensor) -> torch.Tensor:
        eps = samplers.guided(self.model, y.to(self.device), w)
        return self.model.destandardise(samplers.sample(eps, noise.to(self.device), self.scheduler, n)).cpu()


def run_refine(run: str, cfg: RefineConfig, force: bool = False, progress: bool = True, log=print) -> dict:
    from ..fusion.stage import latent_set

    d, n = cfg.steps()
    store = RunStore(run)
    store.require("encode")
    src_rec, shards, src_folder = latent_set(store, cfg.source)
    labels = store.labels()["labels"]
    multi = bool(store.labels()["multi_label"])
    if cfg.sd:
        from .sd import SDRefiner

        refiner = SDRefiner(store, cfg.sd, cfg.prompt_template, cfg.device, log)
    else:
        refiner = PriorRefiner(store, cfg.prior, cfg.device)
    out = store.root / cfg.out_name
    stage = f"refine-{cfg.out_name}"
    settings = {"d": d, "n": n, "guidance": cfg.guidance, "seed": cfg.seed, "prompt_template": cfg.prompt_template if cfg.sd else None}
    config_hash = stable_hash({"refine": settings, "source": src_rec["config_hash"], **refiner.identity})
    rec = open_stage(store, stage, config_hash, force, [out], log, f"refined set '{cfg.out_name}'")
    if rec is not None and rec.get("status") == "done":
        log(f"refine already done for '{cfg.out_name}'; skipping (use --force to redo).")
        return rec
    store.write_config(stage, asdict(cfg))
    table = pd.read_csv(src_folder / "samples.csv")
    by_id = table.set_index("synth_id")
    if rec is None:
        rec = {"stage": stage, "status": "running", "config_hash": config_hash, "source": cfg.source,
               "settings": settings, **refiner.identity, "shards": {}, "started_at": now(), "seconds": 0.0}
    bar = tqdm(total=len(shards), desc=f"refine {cfg.out_name} ({d}/{n} steps)", unit="latent", disable=not progress,
               file=sys.stderr)
    t0 = time.time()
    try:
        for si, ids_si in enumerate(shards._ids):
            fname = f"latents/{si:05d}.safetensors"
            if str(si) in rec["shards"] and (out / fname).is_file():
                bar.update(len(ids_si))
                continue
            lats, masks = [], []
            for ids, z in shards.iter_batches(cfg.batch_size, ids=ids_si):
                rows = by_id.loc[ids]
                y = torch.from_numpy(rows[labels].to_numpy(dtype=np.float32))
                if not multi:  # multi-class: the tail label the sample was made for
                    y = torch.nn.functional.one_hot(torch.tensor([labels.index(t) for t in rows["tail_label"]]),
                                                    len(labels)).float()
                noise = _sample_noise(cfg.seed, ids, tuple(z.shape[1:]))
                with torch.no_grad():
                    lats.append(refiner(z.float(), y, d, n, cfg.guidance, noise))
                masks.append(shards.get(ids, key="mask") if "mask" in _keys(shards) else torch.ones(len(ids), *z.shape[2:], dtype=torch.uint8))
                bar.update(len(ids))
            save_tensors_atomic(out / fname, {"latents": torch.cat(lats).float(), "mask": torch.cat(masks),
                                              "synth_id": torch.from_numpy(np.asarray(ids_si, dtype=np.int64))})
            rec["shards"][str(si)] = {"file": fname, "n": int(len(ids_si))}
            rec["seconds"] = round(rec["seconds"] + time.time() - t0, 2)
            t0 = time.time()
            store.write_stage(stage, rec)
    finally:
        bar.close()
    table = table.assign(refine_d=d, refine_n=n, guidance=cfg.guidance, refine_seed=cfg.seed, **refiner.identity)
    write_csv_atomic(out / "samples.csv", table)
    rec.update(status="done", n_synthetic=int(len(table)), finished_at=now(),
               files=[rec["shards"][str(si)]["file"] for si in range(len(shards.files))])
    store.write_stage(stage, rec)
    log(f"refined {len(table)} latents of '{cfg.source}' ({d} of {n} steps, guidance {cfg.guidance:g}) into {out}")
    return rec


def _keys(shards) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(shards.folder / shards.files[0]), framework="pt") as h:
        return set(h.keys())


def tail_plan_labels(store: RunStore, per_label: dict[str, int]) -> tuple[list[str], np.ndarray, list[int]]:
    """What pure sampling conditions on, budgeted like fusion: for tail label l, item i takes the label vector of the
    i-th (cyclically) training image carrying l (multi-class: the one-hot of l). Returns tail labels, label vectors
    and the source sample ids."""
    info = store.labels()
    labels, multi = info["labels"], bool(info["multi_label"])
    samples = store.samples()
    train = samples[samples["split"] == "train"]
    tl, ys, src = [], [], []
    for lab, k in per_label.items():
        rows = train[train[lab] == 1]
        if k <= 0 or rows.empty:
            continue
        for i in range(k):
            r = rows.iloc[i % len(rows)]
            y = r[labels].to_numpy(dtype=np.float32) if multi else np.eye(len(labels), dtype=np.float32)[labels.index(lab)]
            tl.append(lab)
            ys.append(y)
            src.append(int(r["sample_id"]))
    return tl, np.stack(ys) if ys else np.zeros((0, len(labels)), np.float32), src


def run_sample(run: str, per_label: dict[str, int], steps: int = 50, guidance: float = 2.0, prior: str = "prior",
               seed: int = 0, name: str = "prior-sample", batch_size: int = 64, device: str = "cpu",
               force: bool = False, progress: bool = True, log=print) -> dict:
    """Full diffusion sampling of tail classes: ``per_label`` new latents per tail label drawn from pure noise with
    ``steps`` DDIM steps of the run's prior, guided toward the planned labels. A latent set like fuse's."""
    if steps < 1:
        raise TailfuseError("--steps must be at least 1.")
    store = RunStore(run)
    store.require("encode")
    refiner = PriorRefiner(store, prior, device)
    labels = store.labels()["labels"]
    out = store.root / name
    stage = f"sample-{name}"
    config_hash = stable_hash({"sample": {"per_label": per_label, "steps": steps, "guidance": guidance, "seed": seed},
                               **refiner.identity, "inputs": store.stage("encode")["inputs_hash"]})
    rec = open_stage(store, stage, config_hash, force, [out], log, f"sampled set '{name}'")
    if rec is not None and rec.get("status") == "done":
        log(f"sample already done for '{name}'; skipping (use --force to redo).")
        return rec
    tl, ys, src = tail_plan_labels(store, per_label)
    if not tl:
        raise TailfuseError("nothing to sample: the requested counts are 0 for every tail label.")
    shape = tuple(store.latents().shape)
    t0 = time.time()
    lats = []
    for a in tqdm(range(0, len(tl), batch_size), desc=f"sample {name} ({steps} steps)", disable=not progress,
                  file=sys.stderr):
        ids = np.arange(a, min(a + batch_size, len(tl)))
        with torch.no_grad():
            lats.append(refiner.generate(torch.from_numpy(ys[ids]), steps, guidance, _sample_noise(seed, ids, shape)))
    save_tensors_atomic(out / "latents" / "00000.safetensors", {"latents": torch.cat(lats).float(),
                                                                "synth_id": torch.arange(len(tl), dtype=torch.int64)})
    table = pd.DataFrame({"synth_id": np.arange(len(tl)), **{lab: ys[:, j].astype(int) for j, lab in enumerate(labels)},
                          "tail_label": tl, "slot": np.arange(len(tl)), "label_source_sample_id": src,
                          "method": "prior-sample", "steps": steps, "guidance": guidance, "seed": seed,
                          **refiner.identity})
    write_csv_atomic(out / "samples.csv", table)
    rec = {"stage": stage, "status": "done", "config_hash": config_hash, "n_synthetic": len(tl),
           "files": ["latents/00000.safetensors"], "seconds": round(time.time() - t0, 2), "steps": steps,
           "guidance": guidance, **refiner.identity, "finished_at": now()}
    store.write_stage(stage, rec)
    log(f"sampled {len(tl)} latents from noise ({steps} steps, guidance {guidance:g}) into {out}")
    return rec
