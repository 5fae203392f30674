"""Stage 7, decode: synthetic latents -> PNG images, a manifest in the input's own layout, provenance (resumable).

Output, in ``<run>/<name>/``:
  images/000000.png ...     (image-folder input: images/<class>/000000.png)
  manifest.csv              the input's layout: path (relative to this folder) + split `synthetic` + one 0/1
                            column per label, in the input's column names and order; append it to your own
  provenance.jsonl          one JSON object per image: where it came from and how it was made
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

import pandas as pd
from tqdm.auto import tqdm

from .codec import VAECodec
from .config import DecodeConfig, stable_hash
from .errors import TailfuseError
from .fusion.stage import synthetic_latents
from .images import save_png
from .store import RunStore, now, open_stage, write_csv_atomic, write_text_atomic


def _image_relpath(row: pd.Series, labels: list[str], folder_layout: bool) -> str:
    name = f"{int(row['synth_id']):06d}.png"
    if folder_layout:
        return f"images/{row['tail_label']}/{name}"
    return f"images/{name}"


def run_decode(run: str, cfg: DecodeConfig, force: bool = False, progress: bool = True, log=print) -> dict:
    store = RunStore(run)
    fuse_rec = store.stage(f"fuse-{cfg.name}")
    if not fuse_rec or fuse_rec.get("status") != "done":
        raise TailfuseError(f"run folder {store.root} has no finished synthetic set '{cfg.name}'; run `tailfuse fuse` first.")
    labels_info = store.labels()
    labels = labels_info["labels"]
    enc = store.stage("encode")
    vae_name = cfg.vae or enc["vae"]["name"]
    codec = VAECodec.load(vae_name, cfg.device, cfg.dtype)
    if codec.fingerprint()["weights_sha256"] != enc["vae"]["weights_sha256"]:
        log(f"note: decoding with VAE '{vae_name}', not the one the run was encoded with ({enc['vae']['name']})")
    out = store.root / cfg.name
    stage = f"decode-{cfg.name}"
    config_hash = stable_hash({"fuse": fuse_rec["config_hash"], "vae": codec.fingerprint()})
    rec = open_stage(store, stage, config_hash, force, [out / "images", out / "manifest.csv", out / "provenance.jsonl"], log, f"decoded images of '{cfg.name}'")
    if rec is not None and rec.get("status") == "done":
        log(f"decode already done for '{cfg.name}' ({rec['n_images']} images); skipping (use --force to redo).")
        return rec
    if rec is None:
        rec = {"stage": stage, "status": "running", "config_hash": config_hash, "vae": codec.identity(), "shards": [],
               "started_at": now(), "seconds": 0.0}
    folder_layout = labels_info.get("source") == "folder"
    table = pd.read_csv(out / "samples.csv")
    table["path"] = [_image_relpath(r, labels, folder_layout) for _, r in table.iterrows()]
    paths = dict(zip(table["synth_id"], table["path"]))
    shards = synthetic_latents(store, cfg.name)
    done_shards = set(rec["shards"])
    n_done = sum(len(ids) for si, ids in enumerate(shards._ids) if str(si) in done_shards)
    bar = tqdm(total=len(shards), initial=n_done, desc=f"decode {cfg.name}", unit="img", disable=not progress, file=sys.stderr)
    t0 = time.time()
    try:
        for si in range(len(shards.files)):
            if str(si) in done_shards:
                continue
            for ids, z in shards.iter_batches(cfg.batch_size, ids=shards._ids[si]):
                imgs = codec.decode(z)
                for sid, img in zip(ids, imgs):
                    p = out / paths[int(sid)]
                    p.parent.mkdir(parents=True, exist_ok=True)
                    save_png(img, str(p))
                bar.update(len(ids))
            rec["shards"].append(str(si))
            rec["seconds"] = round(rec["seconds"] + time.time() - t0, 2)
            t0 = time.time()
            store.write_stage(stage, rec)
    finally:
        bar.close()
    path_col = labels_info.get("path_column", "path")
    manifest = pd.DataFrame({path_col: table["path"], "split": "synthetic"})
    for lab in labels:
        manifest[lab] = table[lab].astype(int)
    write_csv_atomic(out / "manifest.csv", manifest)
    prov_cols = [c for c in table.columns if c not in labels]
    lines = []
    for _, r in table.iterrows():
        d = {k: (r[k].item() if hasattr(r[k], "item") else r[k]) for k in prov_cols}
        d["labels"] = [lab for lab in labels if int(r[lab]) == 1]
        lines.append(json.dumps(d))
    write_text_atomic(out / "provenance.jsonl", "\n".join(lines) + "\n")
    rec.update(status="done", n_images=len(table), finished_at=now())
    store.write_stage(stage, rec)
    log(f"decoded {len(table)} images into {out / 'images'}\nmanifest: {out / 'manifest.csv'}\nprovenance: {out / 'provenance.jsonl'}")
    return rec
