"""The VAE round trip of real training images: ``decode(encode(x))``, written once per image and reused.

``<run>/roundtrip/<sample_id>.png`` (of the run that holds the latents) is the decode of the image's stored latent (the posterior mean encode wrote).
Two users:

* decode's ``--pixel-detail``: the codec's error on a source image, ``x - decode(encode(x))``, is added back to a
  fused image wherever the fusion mask takes that source, so regions that were not fused keep the original pixels;
* the ``vae-roundtrip`` arm of `tailfuse evaluate`: the tail images themselves after the round trip, the control
  that separates what the VAE's decoder does to an image from what fusion does.

Files are written atomically, one per image, so a killed run keeps what it finished and redoes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import save_png
from .store import RunStore


def roundtrip_path(store: RunStore, sample_id: int) -> Path:
    return store.data_root / "roundtrip" / f"{int(sample_id):06d}.png"


def ensure_roundtrips(store: RunStore, sample_ids, codec, batch_size: int = 32, progress: bool = False,
                      dist=None) -> list[Path]:
    """Round-trip PNGs of ``sample_ids`` (decoded from the run's latents with ``codec``); returns their paths.
    With several processes each decodes its share of the missing ones (every process must call this)."""
    import json
    import shutil

    from .config import stable_hash
    from .dist import current
    from .store import write_json_atomic

    dist = dist or current()
    folder = store.data_root / "roundtrip"
    grey = bool(store.labels().get("greyscale")) if store.labels_json.is_file() else False
    key = {"vae": codec.fingerprint(), "encode": (store.stage("encode") or {}).get("config_hash")}
    ident = {"hash": stable_hash({**key, "greyscale": True} if grey else key)}
    rec = folder / "roundtrip.json"
    if dist.is_main:
        if folder.is_dir() and (not rec.is_file() or json.loads(rec.read_text()) != ident):
            shutil.rmtree(folder)  # made with another VAE or from other latents: every file is stale
        if not rec.is_file():
            write_json_atomic(rec, ident)
    dist.barrier()
    ids = [int(i) for i in sample_ids]
    paths = [roundtrip_path(store, i) for i in ids]
    todo = sorted({i for i, p in zip(ids, paths) if not p.is_file()})
    todo = [i for k, i in enumerate(todo) if dist.owns(k)]
    if todo:
        shards = store.latents()
        bar = tqdm(total=len(todo), desc="VAE round trip of real images", unit="img", disable=not progress,
                   file=sys.stderr, leave=False)
        try:
            for a in range(0, len(todo), batch_size):
                part = todo[a : a + batch_size]
                for sid, img in zip(part, codec.decode(shards.get(part))):
                    save_png(img, str(roundtrip_path(store, sid)), grey=grey)
                bar.update(len(part))
        finally:
            bar.close()
    dist.barrier()
    return paths


def read_png01(path: Path) -> torch.Tensor:
    """A PNG this module (or decode) wrote, as a 3 x H x W float tensor in [0, 1]."""
    with Image.open(path) as img:
        a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
