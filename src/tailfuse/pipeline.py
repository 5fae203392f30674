"""`tailfuse run`: encode, train, fuse and decode in one go; every stage skipped when done, all resumable."""

from __future__ import annotations

from .config import DataConfig, DecodeConfig, EncodeConfig, FuseConfig, TrainConfig, VAEConfig


def run_all(
    run: str,
    data: DataConfig,
    vae: VAEConfig,
    encode: EncodeConfig,
    train: TrainConfig,
    fuse: FuseConfig,
    decode: DecodeConfig,
    progress: bool = True,
    log=print,
) -> dict:
    from .decode import run_decode
    from .encode import run_encode
    from .fusion.stage import run_fuse
    from .train import run_train

    log("== encode")
    run_encode(data, vae, encode, run, progress=progress, log=log)
    log("== train")
    train_rec = run_train(run, train, progress=progress, log=log)
    log("== fuse")
    fuse.model = train.model_name
    fuse_rec = run_fuse(run, fuse, progress=progress, log=log)
    log("== decode")
    decode.name = fuse.name
    dec_rec = run_decode(run, decode, progress=progress, log=log)
    return {"train": train_rec, "fuse": fuse_rec, "decode": dec_rec}
