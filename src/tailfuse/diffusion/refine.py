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

import logging
import sys
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import RefineConfig, stable_hash
from ..errors import TailfuseError
from ..dist import current
from ..latentset import LatentSet
from ..stage import Stage
from ..store import RunStore, save_tensors_atomic, write_csv_atomic
from . import samplers

log = logging.getLogger("tailfuse")


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
        self.name = name

    def check_steps(self, d: int, n: int) -> None:
        """Refuse a schedule that starts at a timestep the prior never trained on (``train-prior --t-max``)."""
        if d <= 0:
            return
        t_max = self.model.config.get("t_range", [0, self.model.config.get("num_train_timesteps", 1000)])[1]
        self.scheduler.set_timesteps(n)
        first = int(self.scheduler.timesteps[n - d])
        if first >= t_max:
            raise TailfuseError(f"the prior '{self.name}' was trained on timesteps below {t_max} (--t-max), but {d} of {n} "
                                f"steps start at timestep {first}; use fewer steps d, or train a prior with a larger --t-max "
                                "(the default 1000 covers sampling from noise).")

    def __call__(self, z: torch.Tensor, y: torch.Tensor, d: int, n: int, w: float, noise: torch.Tensor) -> torch.Tensor:
        if d == 0:
            return z.clone()  # no step: the latents themselves (not a standardise round trip)
        x0 = self.model.standardise(z.to(self.device))
        eps = samplers.guided(self.model, y.to(self.device), w)
        return self.model.destandardise(samplers.refine(eps, x0, self.scheduler, d, n, noise.to(self.device))).cpu()

    def generate(self, y: torch.Tensor, n: int, w: float, noise: torch.Tensor) -> torch.Tensor:
        eps = samplers.guided(self.model, y.to(self.device), w)
        return self.model.destandardise(samplers.sample(eps, noise.to(self.device), self.scheduler, n)).cpu()


def run_refine(run: str, cfg: RefineConfig, force: bool = False, progress: bool = True, refiner=None) -> dict:
    """Refine the latent set ``cfg.source`` into ``cfg.out_name``; returns the stage record. ``refiner``: a loaded
    refiner (default: the run's prior, or ``cfg.sd``): it has ``identity`` (a dict recorded in provenance),
    ``check_steps(d, n)`` (raises TailfuseError for a schedule it cannot run) and ``__call__(z, y, d, n, w, noise)``
    (the refined latents), like PriorRefiner and SDRefiner. Shards are shared between processes."""
    d, n = cfg.steps()
    store = RunStore(run)
    store.require("encode")
    src = LatentSet.open(store, cfg.source)
    shards = src.shards
    labels = store.labels()["labels"]
    multi = bool(store.labels()["multi_label"])
    dist = current(cfg.device)
    if refiner is None:
        if cfg.sd:
            from .sd import SDRefiner

            refiner = SDRefiner(store, cfg.sd, cfg.prompt_template, cfg.device)
        else:
            refiner = PriorRefiner(store, cfg.prior, cfg.device)
    refiner.check_steps(d, n)
    out = store.root / cfg.out_name
    stage = f"refine-{cfg.out_name}"
    settings = {"d": d, "n": n, "guidance": cfg.guidance, "seed": cfg.seed, "prompt_template": cfg.prompt_template if cfg.sd else None}
    config_hash = stable_hash({"refine": settings, "source": src.record["config_hash"], **refiner.identity})
    st = Stage.open(store, stage, config_hash, what=f"refined set '{cfg.out_name}'", force=force, dist=dist,
                    wipe=[out], inputs={f"{src.kind}-{cfg.source}": src.record["config_hash"]},
                    extra={"source": cfg.source, "settings": settings, **refiner.identity, "latent_set": True})
    if st.done:
        log.info(f"refine already done for '{cfg.out_name}'; skipping (`{st.redo}` redoes it).")
        return st.record
    if dist.is_main:
        store.write_config(stage, asdict(cfg))
    table = src.table()
    by_id = table.set_index("synth_id")
    has_mask = src.has_masks
    files = [f"latents/{si:05d}.safetensors" for si in range(len(shards.files))]
    bar = tqdm(total=len(shards), desc=f"refine {cfg.out_name} ({d}/{n} steps)", unit="latent",
               disable=not progress or not dist.is_main, file=sys.stderr)
    try:
        for si in st.todo(list(range(len(shards.files)))):
            ids_si = shards._ids[si]
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
                if has_mask:
                    masks.append(shards.get(ids, key="mask"))
                dist.advance(bar, len(ids))
            tensors = {"latents": torch.cat(lats).float(), "synth_id": torch.from_numpy(np.asarray(ids_si, dtype=np.int64))}
            if has_mask:
                tensors["mask"] = torch.cat(masks)
            save_tensors_atomic(out / files[si], tensors)
            st.finish_shard(si, {"file": files[si], "n": int(len(ids_si))})
    finally:
        bar.close()
    if dist.is_main:
        table = table.assign(refine_d=d, refine_n=n, guidance=cfg.guidance, refine_seed=cfg.seed,
                             **{k: v for k, v in refiner.identity.items() if k != "latent_space_cosine"})
        write_csv_atomic(out / "samples.csv", table)
    rec = st.finish(n_synthetic=int(len(table)), files=files)
    log.info(f"refined {len(table)} latents of '{cfg.source}' ({d} of {n} steps, guidance {cfg.guidance:g}) into {out}")
    return rec


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
               force: bool = False, progress: bool = True) -> dict:
    """Full diffusion sampling of tail classes: ``per_label`` new latents per tail label drawn from pure noise with
    ``steps`` DDIM steps of the run's prior, guided toward the planned labels. A latent set like fuse's; shards of
    ``batch_size`` latents are shared between processes."""
    if steps < 1:
        raise TailfuseError("--steps must be at least 1.")
    store = RunStore(run)
    store.require("encode")
    dist = current(device)
    refiner = PriorRefiner(store, prior, device)
    refiner.check_steps(steps, steps)
    labels = store.labels()["labels"]
    out = store.root / name
    stage = f"sample-{name}"
    config_hash = stable_hash({"sample": {"per_label": per_label, "steps": steps, "guidance": guidance, "seed": seed},
                               **refiner.identity, "inputs": store.stage("encode")["inputs_hash"]})
    st = Stage.open(store, stage, config_hash, what=f"sampled set '{name}'", force=force, dist=dist, wipe=[out],
                    extra={"steps": steps, "guidance": guidance, **refiner.identity, "latent_set": True})
    if st.done:
        log.info(f"sample already done for '{name}'; skipping (`{st.redo}` redoes it).")
        return st.record
    tl, ys, src = tail_plan_labels(store, per_label)
    if not tl:
        raise TailfuseError("nothing to sample: the requested counts are 0 for every tail label.")
    shape = tuple(store.latents().shape)
    starts = list(range(0, len(tl), batch_size))
    files = [f"latents/{si:05d}.safetensors" for si in range(len(starts))]
    for si in tqdm(st.todo(list(range(len(starts)))), desc=f"sample {name} ({steps} steps)",
                   disable=not progress or not dist.is_main, file=sys.stderr):
        ids = np.arange(starts[si], min(starts[si] + batch_size, len(tl)))
        with torch.no_grad():
            z = refiner.generate(torch.from_numpy(ys[ids]), steps, guidance, _sample_noise(seed, ids, shape))
        save_tensors_atomic(out / files[si], {"latents": z.float(), "synth_id": torch.from_numpy(ids.astype(np.int64))})
        st.finish_shard(si, {"file": files[si], "n": len(ids)})
    if dist.is_main:
        table = pd.DataFrame({"synth_id": np.arange(len(tl)), **{lab: ys[:, j].astype(int) for j, lab in enumerate(labels)},
                              "tail_label": tl, "slot": np.arange(len(tl)), "label_source_sample_id": src,
                              "method": "prior-sample", "steps": steps, "guidance": guidance, "seed": seed,
                              **refiner.identity})
        write_csv_atomic(out / "samples.csv", table)
    rec = st.finish(n_synthetic=len(tl), files=files)
    log.info(f"sampled {len(tl)} latents from noise ({steps} steps, guidance {guidance:g}) into {out}")
    return rec
