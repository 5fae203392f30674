"""Stage 7, decode: synthetic latents -> PNG images, a manifest in the input's own layout, provenance (resumable).

Output, in ``<run>/<name>/``:
  images/000000.png ...     (image-folder input: images/<class>/000000.png)
  manifest.csv              the input's layout: path (relative to this folder) + split `synthetic` + one 0/1
                            column per label, in the input's column names and order (and the input's column of
                            class names when it had one); append it to your own
  provenance.jsonl          one JSON object per image: where it came from and how it was made
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .codec import VAECodec
from .config import DecodeConfig, stable_hash
from .errors import TailfuseError
from .dist import Dist, current
from .images import save_png
from .latentset import LatentSet
from .stage import Stage
from .store import RunStore, ShardSet, write_csv_atomic, write_text_atomic

log = logging.getLogger("tailfuse")


def _image_relpath(row: pd.Series, labels: list[str], folder_layout: bool) -> str:
    name = f"{int(row['synth_id']):06d}.png"
    if folder_layout:
        return f"images/{row['tail_label']}/{name}"
    return f"images/{name}"


def _mask_weights(take_tail: torch.Tensor, feather: float, size) -> torch.Tensor:
    """W: the latent-grid mask ``take_tail`` (N x h x w, bool), blurred by ``feather`` like fuse's code mix and
    upsampled (bilinear) to the image ``size``, in [0, 1]."""
    from .fusion.fuse import feather_weights

    w = feather_weights(take_tail.bool(), feather)
    return F.interpolate(w, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def pixel_detail(decoded: torch.Tensor, take_tail: torch.Tensor, feather: float, x_t: torch.Tensor,
                 rt_t: torch.Tensor, x_h: torch.Tensor, rt_h: torch.Tensor) -> torch.Tensor:
    """Add each source's own codec error back where the fusion mask takes that source.

    ``take_tail`` (N x h x w, bool) is the latent-grid mask, blurred by ``feather`` like fuse's code mix and
    upsampled (bilinear) to the image size: W. The result is ``decoded + W (x_t - rt_t) + (1 - W) (x_h - rt_h)``,
    clipped to [0, 1], with x the source images and rt their VAE round trips."""
    w = _mask_weights(take_tail, feather, decoded.shape[-2:])
    return (decoded + w * (x_t - rt_t) + (1 - w) * (x_h - rt_h)).clamp(0, 1)


def pixel_composite(take_tail: torch.Tensor, feather: float, x_t: torch.Tensor, x_h: torch.Tensor) -> torch.Tensor:
    """Fusion without the decoder: ``W x_t + (1 - W) x_h`` with W the latent-grid mask ``take_tail``, blurred by
    ``feather`` and upsampled as in :func:`pixel_detail`."""
    w = _mask_weights(take_tail, feather, x_t.shape[-2:])
    return (w * x_t + (1 - w) * x_h).clamp(0, 1)


class _Sources:
    """Source images and their round trips for --pixel-detail, read at the run's size and resize policy."""

    def __init__(self, store: RunStore, codec, ids: list[int], progress: bool, dist=None, roundtrips: bool = True):
        from .roundtrip import ensure_roundtrips

        info = store.labels()
        self.size = int(info.get("image_size") or (store.config().get("data") or {}).get("image_size") or 128)
        self.resize = (store.config().get("data") or {}).get("resize", "center-crop")
        self.abs_path = store.samples().set_index("sample_id")["abs_path"]
        self.rt = dict(zip(ids, ensure_roundtrips(store, ids, codec, progress=progress, dist=dist))) if roundtrips else {}

    def images(self, ids) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The source images and (when loaded) their round trips."""
        from .images import load_image
        from .roundtrip import read_png01

        x = torch.stack([load_image(self.abs_path[int(i)], self.size, self.resize) for i in ids])
        rt = torch.stack([read_png01(self.rt[int(i)]) for i in ids]) if self.rt else None
        return x, rt


def select_samples(table: pd.DataFrame, scores: dict[str, np.ndarray], drop_near_copies: bool) -> np.ndarray:
    """Boolean mask of the rows that enter the manifest: per slot, the candidate with the highest ``tail_prob``
    (near-copies excluded when ``drop_near_copies``); a slot whose every candidate is a near-copy gets none."""
    eligible = ~scores["near_copy"] if drop_near_copies else np.ones(len(table), bool)
    keep = np.zeros(len(table), bool)
    slots = table["slot"].to_numpy() if "slot" in table.columns else np.arange(len(table))
    prob = scores["tail_prob"]
    order = np.lexsort((-prob, slots))  # by slot, best first
    seen = set()
    for i in order:
        if slots[i] in seen or not eligible[i]:
            continue
        seen.add(slots[i])
        keep[i] = True
    return keep


def validate(cfg: DecodeConfig) -> None:
    if not 0 <= cfg.near_copy_quantile < 1:
        raise TailfuseError(f"--near-copy-quantile {cfg.near_copy_quantile} must be in [0, 1).")
    if cfg.batch_size < 1 or cfg.shard_size < 1:
        raise TailfuseError("decode batch and shard sizes must be at least 1.")
    if cfg.pixel_detail is True and cfg.pixel_composite:
        raise TailfuseError("--pixel-detail and --pixel-composite exclude each other: a composite is not decoded, so "
                            "it has no codec error to put back.")


def run_decode(run: str, cfg: DecodeConfig, force: bool = False, progress: bool = True, codec: VAECodec | None = None) -> dict:
    """Decode the latent set ``cfg.name`` (fused, refined or sampled) to PNGs, a manifest and provenance; returns the
    stage record. ``codec``: a loaded VAE (default: ``cfg.vae`` or the run's own). Work is split into shards of
    ``cfg.shard_size`` images, shared between processes; a killed decode redoes at most one shard per process."""
    # 1. check the settings; the latent set, the VAE, and how the set is to be decoded
    validate(cfg)
    store = RunStore(run)
    lset = LatentSet.open(store, cfg.name)
    shards = lset.shards
    labels_info = store.labels()
    labels = labels_info["labels"]
    enc = store.stage("encode")
    dist = current(cfg.device)
    codec = _load_codec(codec, cfg, enc)
    out = lset.folder
    table = lset.table()
    n_candidates = int(table["candidate"].max()) + 1 if "candidate" in table.columns and len(table) else 1
    select = n_candidates > 1 or cfg.drop_near_copies
    fused = {"tail_sample_id", "head_sample_id", "feather"} <= set(table.columns)
    detail = cfg.pixel_detail if cfg.pixel_detail is not None else (fused and not cfg.pixel_composite)
    pixel = "--pixel-detail" if detail else "--pixel-composite" if cfg.pixel_composite else None
    if pixel and not fused:
        raise TailfuseError(f"{pixel} needs a fused set (its source images and masks); '{cfg.name}' was not made "
                            f"by fusion. Decode it without {pixel}.")
    # 2. open the stage (skipped when done)
    grey = bool(labels_info.get("greyscale"))
    st = _open_stage(store, lset, cfg, codec, _stage_settings(cfg, detail, grey, select), force, dist)
    if st.done:
        log.info(f"decode already done for '{cfg.name}' ({st.record['n_images']} images); skipping (`{st.redo}` redoes it).")
        return st.record
    if dist.is_main:
        store.write_config(st.name, asdict(cfg))
    # 3. image paths, the source images (pixel detail or composites), and the shard loop
    folder_layout = labels_info.get("source") == "folder"
    table["path"] = [_image_relpath(r, labels, folder_layout) for _, r in table.iterrows()]
    sources = None
    if pixel:
        ids = sorted(set(table["tail_sample_id"].astype(int)) | set(table["head_sample_id"].astype(int)))
        sources = _Sources(store, codec, ids, progress and dist.is_main, dist, roundtrips=detail)
    _decode_shards(cfg, codec, shards, table, sources, st, out, grey, progress, dist)
    dist.barrier()
    # 4. finish: the best candidates, manifest and provenance, the stage's record
    keep = np.ones(len(table), bool)
    extra = {}
    if select and dist.is_main:
        keep, extra = _select_candidates(store, cfg, out, table, n_candidates, progress)
    if dist.is_main:
        _write_manifest_and_provenance(out, table, keep, labels, labels_info.get("path_column", "path"),
                                       {"pixel_detail": detail, "pixel_composite": cfg.pixel_composite},
                                       labels_info.get("label_column"), _source_metadata(store, labels_info))
    extra = dist.broadcast(extra)
    n_kept = dist.broadcast(int(keep.sum()))
    rec = st.finish(n_images=n_kept, n_decoded=len(table), **extra)
    log.info(f"decoded {len(table)} images into {out / 'images'}" + (f" ({n_kept} in the manifest)" if select else "")
             + f"\nmanifest: {out / 'manifest.csv'}\nprovenance: {out / 'provenance.jsonl'}")
    return rec


def _load_codec(codec: VAECodec | None, cfg: DecodeConfig, enc: dict) -> VAECodec:
    """The VAE to decode with (given, ``cfg.vae``, or the run's own); a note when it is not the run's."""
    vae_name = cfg.vae or enc["vae"]["name"]
    codec = codec or VAECodec.load(vae_name, cfg.device, cfg.dtype)
    if codec.fingerprint()["weights_sha256"] != enc["vae"]["weights_sha256"]:
        log.info(f"note: decoding with VAE '{codec.name}', not the one the run was encoded with ({enc['vae']['name']})")
    return codec


def _stage_settings(cfg: DecodeConfig, detail: bool, grey: bool, select: bool) -> dict:
    """The settings that enter the stage's hash (keys added later only when set, so earlier sets keep their hash)."""
    settings = {"pixel_detail": detail}
    if cfg.pixel_composite:  # the key only then, so earlier sets keep their hash
        settings["pixel_composite"] = True
    if grey:  # greyscale inputs: greyscale PNGs (the key only then, so colour runs keep their earlier hash)
        settings["greyscale"] = True
    if select:
        settings.update(drop_near_copies=cfg.drop_near_copies, near_copy_quantile=cfg.near_copy_quantile)
    return settings


def _open_stage(store: RunStore, lset: LatentSet, cfg: DecodeConfig, codec: VAECodec, settings: dict, force: bool,
                dist: Dist) -> Stage:
    """The stage ``decode-<name>``, hashed over the latent set, the VAE and ``settings``."""
    out = lset.folder
    config_hash = stable_hash({"fuse": lset.record["config_hash"], "vae": codec.fingerprint(), **settings})
    return Stage.open(store, f"decode-{cfg.name}", config_hash, what=f"decoded images of '{cfg.name}'", force=force,
                      dist=dist, wipe=[out / "images", out / "manifest.csv", out / "provenance.jsonl"],
                      inputs={f"{lset.kind}-{cfg.name}": lset.record["config_hash"]},
                      extra={"vae": codec.identity(), "settings": settings})


def _decode_shards(cfg: DecodeConfig, codec: VAECodec, shards: ShardSet, table: pd.DataFrame, sources: _Sources | None,
                   st: Stage, out: Path, grey: bool, progress: bool, dist: Dist) -> None:
    """Decode this process's shards of ``table`` batch by batch into the PNGs at ``table['path']``."""
    paths = dict(zip(table["synth_id"], table["path"]))
    by_id = table.set_index("synth_id")
    all_ids = table["synth_id"].to_numpy()
    chunks = [all_ids[a : a + cfg.shard_size] for a in range(0, len(all_ids), cfg.shard_size)]
    n_done = sum(int(v["n"]) for v in st.shards().values())
    bar = tqdm(total=len(all_ids), initial=n_done, desc=f"decode {cfg.name}", unit="img",
               disable=not progress or not dist.is_main, file=sys.stderr)
    try:
        for si in st.todo(list(range(len(chunks)))):
            chunk = chunks[si]
            for a in range(0, len(chunk), cfg.batch_size):
                ids = chunk[a : a + cfg.batch_size]
                imgs = _decode_batch(cfg, codec, shards, ids, by_id, sources)
                for sid, img in zip(ids, imgs):
                    p = out / paths[int(sid)]
                    p.parent.mkdir(parents=True, exist_ok=True)
                    save_png(img, str(p), grey=grey)
                dist.advance(bar, len(ids))
            st.finish_shard(si, {"n": len(chunk)})
    finally:
        bar.close()


def _decode_batch(cfg: DecodeConfig, codec: VAECodec, shards: ShardSet, ids, by_id: pd.DataFrame,
                  sources: _Sources | None) -> torch.Tensor:
    """One batch of images: decoded latents, with each source's codec error put back, or pixel composites."""
    if sources is None:
        return codec.decode(shards.get(ids))
    rows = by_id.loc[ids]
    x_t, rt_t = sources.images(rows["tail_sample_id"])
    x_h, rt_h = sources.images(rows["head_sample_id"])
    mask, feather = shards.get(ids, key="mask"), float(rows["feather"].iloc[0])
    if cfg.pixel_composite:
        return pixel_composite(mask, feather, x_t, x_h)
    return pixel_detail(codec.decode(shards.get(ids)).float().cpu(), mask, feather, x_t, rt_t, x_h, rt_h)


def _select_candidates(store: RunStore, cfg: DecodeConfig, out: Path, table: pd.DataFrame, n_candidates: int,
                       progress: bool) -> tuple[np.ndarray, dict]:
    """Score every decoded image and keep each slot's best candidate; adds the score columns to ``table``."""
    from .scoring import RealScorer, run_image_features

    t1 = time.time()
    scorer = RealScorer.fit(store, cfg.near_copy_quantile, progress=progress)
    paths = [str(out / p) for p in table["path"]]
    feats = run_image_features(store, paths, progress=progress, desc="synthetic image features")
    sc = scorer.score(feats, table["tail_label"].tolist(), paths)
    keep = select_samples(table, sc, cfg.drop_near_copies)
    for k in ("tail_prob", "nn_distance", "nn_ratio"):
        table[k] = sc[k].astype(np.float64)
    table["nn_sample_id"] = sc["nn_sample_id"]
    table["near_copy"] = sc["near_copy"]
    table["selected"] = keep
    extra = {"selection": {"candidates_per_sample": n_candidates, "n_candidates": int(len(table)),
                           "n_selected": int(keep.sum()), "n_near_copies": int(sc["near_copy"].sum()),
                           "near_copy_threshold": scorer.copy_threshold, "scorer": scorer.model.info,
                           "slots_without_a_sample": int(table["slot"].nunique() - keep.sum()) if "slot" in table else 0,
                           "seconds": round(time.time() - t1, 2)}}
    log.info(f"selection: kept {int(keep.sum())} of {len(table)} candidates ({n_candidates} per sample; "
             f"{int(sc['near_copy'].sum())} near-copies of real images" + (", left out" if cfg.drop_near_copies else "") + ")")
    return keep, extra


def _source_metadata(store: RunStore, labels_info: dict) -> pd.DataFrame:
    """The input's metadata columns (view, cell_type, patient_id, ...) of every real sample, by sample_id."""
    cols = [c for c in labels_info.get("metadata_columns") or [] if c != labels_info.get("label_column")]
    samples = store.samples()
    return samples.set_index("sample_id")[[c for c in cols if c in samples.columns]]


def _write_manifest_and_provenance(out: Path, table: pd.DataFrame, keep: np.ndarray, labels: list[str], path_col: str,
                                   pixel: dict, label_column: str | None = None,
                                   metadata: pd.DataFrame | None = None) -> None:
    """The manifest in the input's layout: path, split ``synthetic``, the label column(s), and the input's metadata
    columns with the values of each image's tail source (empty for images made from noise), so the augmented set can
    be split or grouped like the real one (by patient, view, ...)."""
    chosen = table[keep]
    manifest = pd.DataFrame({path_col: chosen["path"].to_numpy(), "split": "synthetic"})
    if label_column:  # the input named classes in one column: so does the manifest ('A|B' for several)
        onehot = chosen[labels].astype(int).to_numpy()
        manifest[label_column] = ["|".join(lab for lab, v in zip(labels, row) if v) for row in onehot]
    for lab in labels:
        manifest[lab] = chosen[lab].astype(int).to_numpy()
    if metadata is not None and len(metadata.columns):
        source = chosen["tail_sample_id"].astype(int) if "tail_sample_id" in chosen.columns else None
        for c in metadata.columns:
            manifest[c] = metadata[c].reindex(source).to_numpy() if source is not None else ""
    soft_cols = [f"soft_{lab}" for lab in labels if f"soft_{lab}" in table.columns]
    for c in soft_cols:
        manifest[c] = chosen[c].to_numpy()
    write_csv_atomic(out / "manifest.csv", manifest)
    prov_cols = [c for c in table.columns if c not in labels and c not in soft_cols]
    lines = []
    for _, r in table.iterrows():
        d = {k: (r[k].item() if hasattr(r[k], "item") else r[k]) for k in prov_cols}
        d["labels"] = [lab for lab in labels if int(r[lab]) == 1]
        if soft_cols:
            d["soft_labels"] = {c[5:]: float(r[c]) for c in soft_cols}
        d.update(pixel)
        lines.append(json.dumps(d))
    write_text_atomic(out / "provenance.jsonl", "\n".join(lines) + "\n")
