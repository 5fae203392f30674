"""`tailfuse run`: encode, train, fuse (train-prior and refine with --refine) and decode in one go; every stage
skipped when done, all resumable."""

from __future__ import annotations

import logging

from .config import DataConfig, DecodeConfig, EncodeConfig, FuseConfig, PriorConfig, RefineConfig, TrainConfig, VAEConfig

log = logging.getLogger("tailfuse")


def run_all(
    run: str,
    data: DataConfig,
    vae: VAEConfig,
    encode: EncodeConfig,
    train: TrainConfig,
    fuse: FuseConfig,
    decode: DecodeConfig,
    refine: RefineConfig | None = None,
    prior: PriorConfig | None = None,
    progress: bool = True,
) -> dict:
    from .decode import run_decode
    from .encode import run_encode
    from .fusion.stage import run_fuse
    from .train import run_train

    log.info("== encode")
    run_encode(data, vae, encode, run, progress=progress)
    log.info("== train")
    train_rec = run_train(run, train, progress=progress)
    log.info("== fuse")
    fuse.model = train.model_name
    fuse_rec = run_fuse(run, fuse, progress=progress)
    name = fuse.name
    out = {"train": train_rec, "fuse": fuse_rec}
    if refine is not None:
        from .diffusion.refine import run_refine
        from .diffusion.train_prior import run_train_prior

        log.info("== train-prior")
        out["prior"] = run_train_prior(run, prior or PriorConfig(), progress=progress)
        log.info("== refine")
        refine.source, refine.prior = name, (prior or PriorConfig()).name
        out["refine"] = run_refine(run, refine, progress=progress)
        name = refine.out_name
    log.info("== decode")
    decode.name = name
    out["decode"] = run_decode(run, decode, progress=progress)
    out["set"] = name
    return out
