"""Stage 1, encode: images -> VAE latents, in shards, resumable."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .codec import VAECodec
from .config import DataConfig, EncodeConfig, VAEConfig, stable_hash
from .data import Dataset, histogram, load_dataset, partition
from .data import validate as validate_data
from .errors import TailfuseError, q
from .images import BadImage, is_colour, load_image, path_problem
from .dist import Dist, current
from .stage import Stage
from .store import RunStore, ShardSet, StageMismatch, save_tensors_atomic, write_csv_atomic, write_json_atomic

log = logging.getLogger("tailfuse")

STAGE = "encode"
SKIP_COLUMNS = ["sample_id", "line", "path", "reason"]


def _file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _inputs_hash(ds: Dataset) -> str:
    """Hash of what encode reads: the table (ids, paths, splits, labels) and each file's size and mtime."""
    t = ds.table
    stats = []
    for p in t["abs_path"]:
        try:
            st = os.stat(p)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append(None)
    cols = ["sample_id", "abs_path", "split", *ds.labels]
    return stable_hash({"table": t[cols].astype(str).to_numpy().tolist(), "stats": stats})


def _prescan(ds: Dataset, strict: bool) -> None:
    """Cheap checks before any encoding: missing and zero-byte files."""
    missing, empty = [], []
    for line, p in zip(ds.table["line"], ds.table["abs_path"]):
        problem = path_problem(p)
        if problem is not None:
            missing.append((line, p, problem))
        elif os.path.isfile(p) and os.path.getsize(p) == 0:
            empty.append((line, p))
    n = len(ds.table)
    where = "line" if ds.source == "csv" else "file #"
    if missing and len(missing) == n:
        base = os.path.dirname(ds.source_path) if ds.source == "csv" else ds.source_path
        raise TailfuseError(
            f"none of the {n} image paths can be opened (first: {missing[0][1]}: {missing[0][2]}). Relative paths are "
            "resolved against "
            f"{base}; check the path column or move the CSV next to the images."
        )
    bad = missing + [(ln, p, "zero-byte file") for ln, p in empty]
    if bad and strict:
        shown = "; ".join(f"{where} {ln}: {p} ({r})" for ln, p, r in bad[:5])
        raise TailfuseError(
            f"{len(bad)} image(s) cannot be read ({shown}{' ...' if len(bad) > 5 else ''}). "
            "Fix or remove those rows, or drop --strict to skip them (they are then listed in skipped.csv)."
        )


def median_input_side(ds: Dataset, n: int = 200) -> int | None:
    """Median shorter side of up to ``n`` input images (evenly spaced rows; image headers only)."""
    from PIL import Image

    paths = ds.table["abs_path"].to_numpy()
    sides = []
    for p in paths[np.linspace(0, len(paths) - 1, min(n, len(paths))).astype(int)]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except Exception:  # unreadable images are reported by the encode itself
            continue
    return int(np.median(sides)) if sides else None


def _resolution_note(ds: Dataset, size: int) -> None:
    side = median_input_side(ds)
    if side is not None and side >= 2 * size:
        log.info(f"note: the input images are {side} px (median shorter side) and are brought to {size} px; the "
                 f"synthetic images will be {size} px too. --image-size {2 * size} keeps more "
                 "detail at about 4x the time (README, 'Image size').")


def run_encode(
    data_cfg: DataConfig,
    vae_cfg: VAEConfig,
    enc_cfg: EncodeConfig,
    run: str,
    force: bool = False,
    progress: bool = True,
    codec: VAECodec | None = None,
) -> dict:
    """Encode the dataset into ``run``; returns the stage record. Resumes an interrupted encode. ``codec``: a
    loaded VAE (default: ``vae_cfg.vae`` loaded here). Shards are shared between processes (see dist.py)."""
    # 1. check the settings, read the dataset and its labels
    _check_settings(data_cfg, vae_cfg, enc_cfg, codec)
    dist = current(vae_cfg.device)
    ds = load_dataset(data_cfg)
    head, tail = partition(ds, data_cfg)
    store = RunStore(run)
    _open_run_folder(store, ds, data_cfg, head, tail, dist)
    # 2. the VAE, and the stage (skipped when done, refused when made with other settings or inputs)
    codec = codec or VAECodec.load(vae_cfg.vae, vae_cfg.device, vae_cfg.dtype)
    _check_image_size(data_cfg, codec)
    config_hash = _config_hash(data_cfg, enc_cfg, codec)
    inputs_hash = _inputs_hash(ds)
    _refuse_other_encode(store, data_cfg, config_hash, inputs_hash, force)
    n = len(ds.table)
    n_shards = (n + enc_cfg.shard_size - 1) // enc_cfg.shard_size
    st = Stage.open(store, STAGE, config_hash, what="an encode of this run folder", force=force, dist=dist,
                    wipe=[store.samples_csv, store.labels_json, store.skipped_csv, store.root / "latents"],
                    extra={"inputs_hash": inputs_hash, "vae": codec.identity(), "n_samples": n, "n_shards": n_shards,
                           "shard_size": enc_cfg.shard_size})
    if st.done:
        log.info(f"encode already done in {store.root} ({st.record['n_encoded']} latents); skipping (`{st.redo}` redoes it).")
        return st.record
    if dist.is_main:
        store.write_config("data", asdict(data_cfg))
        store.write_config("vae", {**asdict(vae_cfg), "vae": codec.name})
        store.write_config("encode", asdict(enc_cfg))
    keys, todo, n_done = _pending_shards(st, store, n_shards, dist)
    # 3. the shard loop
    _encode_shards(ds, data_cfg, enc_cfg, codec, store, st, todo, config_hash, n_done, progress, dist)
    dist.barrier()
    # 4. finish: samples table, labels, skipped report (the main process)
    return _finish(ds, data_cfg, store, st, keys, head, tail, dist)


def _check_settings(data_cfg: DataConfig, vae_cfg: VAEConfig, enc_cfg: EncodeConfig, codec: VAECodec | None) -> None:
    """Refuse bad data, batch / shard and VAE settings before any work (the VAE's only when it is not given)."""
    validate_data(data_cfg)
    if enc_cfg.batch_size < 1 or enc_cfg.shard_size < 1:
        raise TailfuseError("batch size and shard size must be at least 1.")
    if codec is None:
        from .codec import validate_vae

        validate_vae(vae_cfg)


def _open_run_folder(store: RunStore, ds: Dataset, data_cfg: DataConfig, head: list, tail: list, dist: Dist) -> None:
    """Create the run folder (main process), say what the dataset holds, and check its files before encoding."""
    if dist.is_main:
        store.create(ds.locations())
    dist.barrier()
    for note in ds.notes:
        log.info(f"note: {note}")
    kind = "multi-label" if ds.multi_label else "multi-class"
    log.info(f"{len(ds.table)} images, {len(ds.labels)} labels ({kind}), from {ds.source_path}")
    log.info(histogram(ds.counts(), tail))
    log.info(f"head: {', '.join(head)}\ntail: {', '.join(tail)}")
    _prescan(ds, data_cfg.strict)
    if dist.is_main:
        _resolution_note(ds, data_cfg.image_size)


def _check_image_size(data_cfg: DataConfig, codec: VAECodec) -> None:
    """The image size must be a multiple of the VAE's downsampling factor."""
    if data_cfg.image_size % codec.downsample or data_cfg.image_size < codec.downsample:
        raise TailfuseError(
            f"image size {data_cfg.image_size} must be a multiple of the VAE's downsampling factor {codec.downsample}."
        )


def _config_hash(data_cfg: DataConfig, enc_cfg: EncodeConfig, codec: VAECodec) -> str:
    """Hash of the settings an encode depends on: image size, resize policy, VAE, batch and shard size."""
    return stable_hash(
        {
            "image_size": data_cfg.image_size,
            "resize": data_cfg.resize,
            "vae": codec.fingerprint(),
            "batch_size": enc_cfg.batch_size,
            "shard_size": enc_cfg.shard_size,
        }
    )


def _refuse_other_encode(store: RunStore, data_cfg: DataConfig, config_hash: str, inputs_hash: str,
                         force: bool) -> None:
    """Without --force, an encode made with other settings or input data is refused (StageMismatch)."""
    rec = store.stage(STAGE)
    if rec is not None and not force and (rec.get("config_hash") != config_hash or rec.get("inputs_hash") != inputs_hash):
        what = "settings (image size, resize, VAE, batch or shard size)" if rec.get("config_hash") != config_hash else "input data"
        raise StageMismatch(
            f"run folder {store.root} holds an encode made with other {what}. Use a new --run folder, "
            f"or `tailfuse encode --run {q(store.root)} --data {q(data_cfg.data)} --force` discards it and encodes again."
        )


def _pending_shards(st: Stage, store: RunStore, n_shards: int, dist: Dist) -> tuple[list[str], list[str], int]:
    """Every shard's key, the keys this process still has to encode, and the images already encoded."""
    # finished shards whose file changed or vanished are redone
    for k, sh in st.shards().items():
        f = sh.get("file")
        if f is not None and not ((store.root / f).is_file() and _file_digest(store.root / f) == sh["sha256"]):
            st.forget_shard(k)
    keys = [str(si) for si in range(n_shards)]
    todo = st.todo(keys)
    n_done = sum(sh["n_rows"] for sh in st.shards().values())
    if n_done and dist.is_main:
        log.info(f"resuming: {len(st.shards())} of {n_shards} shards already encoded")
    return keys, todo, n_done


def _encode_shards(ds: Dataset, data_cfg: DataConfig, enc_cfg: EncodeConfig, codec: VAECodec, store: RunStore,
                   st: Stage, todo: list[str], config_hash: str, n_done: int, progress: bool, dist: Dist) -> None:
    """Encode the shards in ``todo`` (images read by a thread pool), each recorded as it finishes."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    bar = tqdm(total=len(ds.table), initial=n_done, desc="encode", unit="img", disable=not progress or not dist.is_main, file=sys.stderr)
    try:
        for key in todo:
            si = int(key)
            rows = ds.table.iloc[si * enc_cfg.shard_size : (si + 1) * enc_cfg.shard_size]
            entry = _encode_shard(si, rows, data_cfg, enc_cfg, codec, store, config_hash, pool, bar, dist)
            st.finish_shard(key, entry)
            if dist.is_main:
                _write_skipped(store, st.shards())
    finally:
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)


def _encode_shard(si: int, rows: pd.DataFrame, data_cfg: DataConfig, enc_cfg: EncodeConfig, codec: VAECodec,
                  store: RunStore, config_hash: str, pool: ThreadPoolExecutor, bar, dist: Dist) -> dict:
    """Encode one shard's rows batch by batch and write its latents file; returns the shard's entry."""
    ids, lats, skipped, n_colour = [], [], [], 0
    for b in range(0, len(rows), enc_cfg.batch_size):
        batch = rows.iloc[b : b + enc_cfg.batch_size]
        good = _read_batch(batch, data_cfg, pool, skipped)
        if good:
            n_colour += sum(is_colour(im) for _, im in good)
            z = codec.encode(torch.stack([im for _, im in good]))
            ids.extend(i for i, _ in good)
            lats.append(z)
        dist.advance(bar, len(batch))
    entry = {"n_rows": len(rows), "n": len(ids), "skipped": skipped, "file": None, "sha256": None,
             "n_colour": n_colour}
    if ids:
        fname = f"latents/{si:05d}.safetensors"
        path = store.root / fname
        save_tensors_atomic(
            path,
            {"latents": torch.cat(lats).float(), "sample_id": torch.tensor(ids, dtype=torch.int64)},
            # one key: safetensors writes a metadata map in an order that differs between processes
            metadata={"tailfuse": f"stage={STAGE};config_hash={config_hash}"},
        )
        entry.update(file=fname, sha256=_file_digest(path))
    return entry


def _read_batch(batch: pd.DataFrame, data_cfg: DataConfig, pool: ThreadPoolExecutor, skipped: list) -> list:
    """A batch's readable images as (sample_id, image); unreadable ones go to ``skipped`` (fatal with --strict)."""

    def load(p):
        try:
            return load_image(p, data_cfg.image_size, data_cfg.resize)
        except BadImage as e:
            return e

    imgs = list(pool.map(load, batch["abs_path"]))
    good = []
    for (_, r), im in zip(batch.iterrows(), imgs):
        if isinstance(im, BadImage):
            if data_cfg.strict:
                raise TailfuseError(
                    f"line {r['line']}: {r['path']}: {im.reason}. Fix or remove the row, or drop --strict "
                    "to skip unreadable images (finished shards are kept)."
                )
            skipped.append({"sample_id": int(r["sample_id"]), "line": int(r["line"]), "path": r["path"], "reason": im.reason})
        else:
            good.append((int(r["sample_id"]), im))
    return good


def _finish(ds: Dataset, data_cfg: DataConfig, store: RunStore, st: Stage, keys: list[str], head: list, tail: list,
            dist: Dist) -> dict:
    """The samples table and labels (main process), the skipped report, and the stage's record."""
    shards_done = st.shards()
    skipped_ids = {s["sample_id"] for sh in shards_done.values() for s in sh["skipped"]}
    files = [shards_done[k]["file"] for k in keys if shards_done[k]["file"] is not None]
    shards = ShardSet(store.root, files)
    table = ds.table[~ds.table["sample_id"].isin(skipped_ids)].copy()
    if table.empty:
        raise TailfuseError("no image could be read; see skipped.csv in the run folder for the reasons.")
    labels = list(ds.labels)
    if skipped_ids:  # the kept images decide the class counts and the head/tail split, not the manifest's rows
        labels, head, tail = _labels_of_kept(ds, table, labels, skipped_ids, data_cfg, store, head, tail)
    if dist.is_main:
        _write_skipped(store, shards_done)
        _write_samples_and_labels(ds, table, labels, head, tail, data_cfg, store, shards, shards_done)
    rec = st.finish(n_encoded=len(table), n_skipped=len(skipped_ids), latent_shape=list(shards.shape))
    log.info(f"encoded {len(table)} images to {store.root} (latents {tuple(shards.shape)}), {rec['seconds']:.1f} s")
    if skipped_ids:
        log.info(f"skipped {len(skipped_ids)} unreadable image(s): listed in {store.skipped_csv}")
    return rec


def _labels_of_kept(ds: Dataset, table: pd.DataFrame, labels: list, skipped_ids: set, data_cfg: DataConfig,
                    store: RunStore, head: list, tail: list) -> tuple[list, list, list]:
    """Labels, head and tail of the kept images; a label left without images fails or goes (--drop-empty-labels)."""
    kept = Dataset(table, labels, ds.multi_label, ds.source, ds.source_path, ds.metadata_columns, ds.path_column,
                   label_column=ds.label_column)
    empty = [lab for lab in labels if int(table[lab].sum()) == 0]
    if empty and not data_cfg.drop_empty_labels:
        raise TailfuseError(
            f"label(s) {', '.join(empty)} have no readable image left: every image carrying them was skipped (see "
            f"{store.skipped_csv}). Fix those images and rerun (with --force, as the input changed), or pass "
            "--drop-empty-labels to leave the label out.")
    if empty:
        log.warning(f"note: label(s) {', '.join(empty)} dropped: every image carrying them was unreadable")
        labels = [lab for lab in labels if lab not in empty]
        kept = Dataset(table, labels, ds.multi_label, ds.source, ds.source_path, ds.metadata_columns, ds.path_column,
                       label_column=ds.label_column)
    head2, tail2 = partition(kept, data_cfg)
    if (head2, tail2) != (head, tail):
        log.warning(f"note: without the {len(skipped_ids)} unreadable image(s) the head labels are "
                    f"{', '.join(head2)} and the tail labels {', '.join(tail2)}")
    log.info("class counts of the images kept:\n" + histogram(kept.counts(), tail2))
    return labels, head2, tail2


def _write_samples_and_labels(ds: Dataset, table: pd.DataFrame, labels: list, head: list, tail: list,
                              data_cfg: DataConfig, store: RunStore, shards: ShardSet, shards_done: dict) -> None:
    """samples.csv (each kept image's shard and offset; adds those columns to ``table``) and labels.json."""
    shard_of = {sid: si for sid, (si, _) in shards.index.items()}
    offset_of = {sid: off for sid, (_, off) in shards.index.items()}
    table["shard"] = table["sample_id"].map(shard_of).astype(np.int64)
    table["offset"] = table["sample_id"].map(offset_of).astype(np.int64)
    write_csv_atomic(store.samples_csv, table)
    kept = Dataset(table, labels, ds.multi_label, ds.source, ds.source_path, ds.metadata_columns, ds.path_column,
                   label_column=ds.label_column)
    counts = kept.counts()
    write_json_atomic(
        store.labels_json,
        {
            "labels": labels,
            "head_labels": head,
            "tail_labels": tail,
            "tail_rule": "given" if data_cfg.tail_labels else f"auto: head covers >= {data_cfg.head_share} of train positives",
            "multi_label": ds.multi_label,
            "counts": {lab: {k: int(v) for k, v in counts.loc[lab].items()} for lab in labels},
            "source": ds.source,
            "source_path": ds.source_path,
            "path_column": ds.path_column,
            "metadata_columns": ds.metadata_columns,
            "label_column": ds.label_column,
            "image_size": data_cfg.image_size,
            # every image greyscale (R = G = B): decoded images are written back as greyscale
            "greyscale": all(sh.get("n_colour", 1) == 0 for sh in shards_done.values() if sh["n"]),
            "latent_shape": list(shards.shape),
        },
    )


def _write_skipped(store: RunStore, shards: dict) -> None:
    rows = [s for k in sorted(shards, key=int) for s in shards[k]["skipped"]]
    if rows or store.skipped_csv.exists():
        write_csv_atomic(store.skipped_csv, pd.DataFrame(rows, columns=SKIP_COLUMNS))
