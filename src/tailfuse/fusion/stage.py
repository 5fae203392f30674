"""Stage 3-5, fuse: saliency maps, head neighbours of every tail map, and fused synthetic latents (resumable).

Output, in ``<run>/<name>/`` (name default ``synthetic``):
  latents/00000.safetensors   fused latents (`latents`), which positions came from the tail sample (`mask`,
                              1 = tail), and `synth_id`; streamed shard by shard
  parts/00000.csv             labels and provenance of the samples of each shard
  samples.csv                 all synthetic samples: synth_id, one 0/1 column per label, provenance
Saliency maps and neighbours are cached in ``<run>/saliency/<model>-g<generation>-<cam>/``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..budget import budget, per_class_strategy, strategy_from_flags, validate_strategy
from ..config import FuseConfig, hashed_settings, stable_hash
from ..dist import Dist, current
from ..errors import TailfuseError
from ..latentset import LatentSet
from ..sparse.nets import SparseModel
from ..stage import Stage
from ..store import RunStore, ShardSet, file_sha256, save_tensors_atomic, write_csv_atomic

log = logging.getLogger("tailfuse")
from .fuse import draw_thresholds, fuse_latents, fusion_masks, plan, sample_generator
from .neighbours import INDEX_KINDS, Rows, nearest
from .saliency import (CAM_METHODS, compute_maps, fix_mmap_threshold, gaussian_smooth, rank_normalise, release_memory,
                       rows_needing_probabilities, saliency_targets)

POLICIES = ("union", "kept", "tail")
# latent positions (batch x h x w) one forward pass of the sparse model may hold: --batch-size 256 at 16 x 16 (TAESD
# at 128 px) as before; at Stable Diffusion's 64 x 64 it is 32 per batch. Grad-CAM keeps about 10 MB per 64 x 64
# map in activations and gradients, so batch 256 there peaked at 3.3 GB for one call (measured; 32: 0.56 GB)
POSITIONS_PER_BATCH = 32 * 64 * 64


def batch_for(batch_size: int, latent_shape) -> int:
    """``batch_size`` capped so that a batch holds at most POSITIONS_PER_BATCH latent positions: memory per
    batch does not grow with the latent size (the same maps and latents up to floating-point rounding)."""
    h, w = int(latent_shape[-2]), int(latent_shape[-1])
    return max(1, min(int(batch_size), POSITIONS_PER_BATCH // max(1, h * w)))


def _validate(cfg: FuseConfig) -> None:
    if cfg.cam_layer not in ("full", "half"):
        raise TailfuseError(f"--cam-layer '{cfg.cam_layer}' unknown; choose full or half.")
    if cfg.cam not in CAM_METHODS:
        raise TailfuseError(f"--cam '{cfg.cam}' unknown; choose from {', '.join(CAM_METHODS)}.")
    if cfg.index not in INDEX_KINDS:
        raise TailfuseError(f"--index '{cfg.index}' unknown; choose from {', '.join(INDEX_KINDS)}.")
    if cfg.labels_policy not in POLICIES:
        raise TailfuseError(f"--labels-policy '{cfg.labels_policy}' unknown; choose from {', '.join(POLICIES)}.")
    if cfg.detail not in ("none", "residual"):
        raise TailfuseError(f"--detail '{cfg.detail}' unknown; choose none or residual.")
    if cfg.code not in ("hard", "soft"):
        raise TailfuseError(f"--code '{cfg.code}' unknown; choose hard or soft.")
    if not 0 <= cfg.feather <= 4:
        raise TailfuseError(f"--feather {cfg.feather} out of range; give a sigma in latent positions from 0 (off) to 4.")
    if cfg.saliency_norm not in ("rank", "minmax"):
        raise TailfuseError(f"--saliency-norm '{cfg.saliency_norm}' unknown; choose rank or minmax.")
    if cfg.per_class is not None and cfg.balance_to is not None:
        raise TailfuseError("give either --per-class or --balance-to, not both.")
    for flag, v in (("--per-class", cfg.per_class), ("--balance-to", cfg.balance_to)):
        if v is not None and v < 0:
            raise TailfuseError(f"{flag} {v}: give a number of samples >= 0.")
    validate_strategy(strategy_from_flags(cfg.per_class, cfg.balance_to, cfg.sampling_strategy, default="auto"),
                      cfg.max_ratio)
    if cfg.neighbours < 1 or cfg.batch_size < 1 or cfg.shard_size < 1:
        raise TailfuseError("--neighbours, batch and shard sizes must be at least 1.")
    if not 0 <= cfg.fill_prob <= 1 or cfg.q_spread < 0:
        raise TailfuseError("--fill-prob must be in [0, 1] and --q-spread >= 0.")
    if cfg.candidates < 1:
        raise TailfuseError(f"--candidates {cfg.candidates}: give at least 1 (candidates made per synthetic sample).")


def _check_group_column(store: RunStore, cfg: FuseConfig) -> None:
    if not cfg.neighbours_within:
        return
    cols = list(pd.read_csv(store.samples_csv, nrows=0).columns)
    labels = store.labels()["labels"]
    usable = [c for c in cols if c not in ("sample_id", "path", "abs_path", "split", "split_source", "shard", "offset",
                                           "line", *labels)]
    if cfg.neighbours_within not in usable:
        raise TailfuseError(f"--neighbours-within '{cfg.neighbours_within}' is not a metadata column of this run; "
                            f"its metadata columns are: {', '.join(usable) or 'none'} (columns of the manifest that "
                            "are neither the path, the split nor a label).")


def model_identity(store: RunStore, model: str, generation: int | None) -> tuple[int, str]:
    rec = store.stage(model)
    if not rec or not rec.get("generations_done"):
        raise TailfuseError(f"run folder {store.root} has no trained model '{model}'; run `tailfuse train` first.")
    gen = rec["generations_done"][-1] if generation is None else generation
    path = store.root / model / f"gen-{gen:02d}" / "model.safetensors"
    if not path.is_file():
        raise TailfuseError(f"model '{model}' has no generation {gen} (generations: {rec['generations_done']}).")
    return gen, file_sha256(path)


def saliency_maps(store: RunStore, tag: str) -> tuple[pd.DataFrame, ShardSet, Path]:
    """A finished saliency stage ``saliency-<tag>``: its table (which sample, role and target each map is for), its
    maps by ``row_id``, and its folder."""
    folder = store.root / "saliency" / tag
    files = store.stage(f"saliency-{tag}")["files"]
    return pd.read_csv(folder / "maps.csv"), ShardSet(folder, files, id_key="row_id", key="maps"), folder


def run_saliency(store: RunStore, cfg: FuseConfig, model, gen: int, model_sha: str, progress: bool) -> tuple[pd.DataFrame, ShardSet, Path]:
    """Maps for every training sample (its target labels); cached per model, generation and CAM method."""
    tag = f"{cfg.model}-g{gen:02d}-{cfg.cam}-{cfg.cam_layer}"
    name = f"saliency-{tag}"
    folder = store.root / "saliency" / tag
    enc = store.stage("encode")
    config_hash = stable_hash({"model": model_sha, "cam": cfg.cam, "layer": cfg.cam_layer, "inputs": enc["inputs_hash"]})
    st = Stage.open(store, name, config_hash, what="saliency maps", wipe=[folder], inputs={"model": model_sha})
    if st.done:
        return saliency_maps(store, tag)
    labels_info = store.labels()
    labels, tail = labels_info["labels"], labels_info["tail_labels"]
    samples = store.samples()
    train = samples[samples["split"] == "train"].reset_index(drop=True)
    shards = store.latents()
    device = next(model.parameters()).device
    bs = batch_for(cfg.batch_size, shards.shape)
    fix_mmap_threshold()  # freed Grad-CAM batches go back to the system: the peak must not grow with the run
    ask = rows_needing_probabilities(train, labels, tail)  # C decides only between two or more head labels
    probs = np.zeros((len(train), len(labels)), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(ask), bs):
            z = shards.get(train["sample_id"].to_numpy()[ask[i : i + bs]]).to(device)
            probs[ask[i : i + bs]] = model.probabilities(model.classify(model.code(z))).cpu().numpy()
    table = saliency_targets(train, labels, tail, probs)
    table.insert(0, "row_id", np.arange(len(table), dtype=np.int64))
    n_unlabelled = int((train[labels].sum(axis=1) == 0).sum())
    folder.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(table), cfg.shard_size))
    files = [f"{si:05d}.safetensors" for si in range(len(starts))]
    bar = tqdm(total=len(table), desc=f"saliency ({cfg.cam})", unit="map", disable=not progress or not st.dist.is_main,
               file=sys.stderr)
    try:
        for si in st.todo(list(range(len(starts)))):
            part = table.iloc[starts[si] : starts[si] + cfg.shard_size]
            maps = []
            for b in range(0, len(part), bs):
                sub = part.iloc[b : b + bs]
                z = shards.get(sub["sample_id"].to_numpy()).to(device)
                maps.append(compute_maps(model, z, sub["target"].tolist(), cfg.cam, cfg.cam_layer).cpu())
                release_memory()  # a long pass must not hold more memory than a short one
                st.dist.advance(bar, len(sub))
            save_tensors_atomic(folder / files[si], {"maps": torch.cat(maps), "row_id": torch.from_numpy(part["row_id"].to_numpy().copy())})
            st.finish_shard(si, {"file": files[si], "n": len(part)})
            del maps
            release_memory(collect=True)
    finally:
        bar.close()
    if st.dist.is_main:
        write_csv_atomic(folder / "maps.csv", table)
    st.finish(files=files, n_maps=len(table), n_unlabelled_left_out=n_unlabelled)
    if n_unlabelled:
        log.info(f"note: {n_unlabelled} training samples carry no label and were left out of the head pool")
    return table, ShardSet(folder, files, id_key="row_id", key="maps"), folder


NORMALISE_VALUES = 1 << 18  # map values normalised at once: 1,024 maps of 16 x 16, 64 of 64 x 64


def _normalise(maps: torch.Tensor, how: str, smooth: float = 0.0, block: int = 1024) -> torch.Tensor:
    """Smoothed and normalised maps (float32), computed ``block`` maps at a time, and at most NORMALISE_VALUES
    values: the transient copies (rank normalisation works in float64, about 90 bytes per value in all) stay bounded
    however large the head pool and the maps are; each map is normalised alone."""
    out = torch.empty(maps.shape, dtype=torch.float32)
    block = max(1, min(block, NORMALISE_VALUES // max(1, int(np.prod(maps.shape[1:])))))
    for a in range(0, len(maps), block):
        m = maps[a : a + block]
        if smooth > 0:
            m = gaussian_smooth(m, smooth)
        if how == "rank":
            out[a : a + block] = rank_normalise(m)
            continue
        flat = m.reshape(len(m), -1)
        lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        out[a : a + block] = ((flat - lo) / (hi - lo).clamp_min(1e-7)).reshape(m.shape)
    return out


def run_neighbours(table: pd.DataFrame, maps: ShardSet, folder: Path, cfg: FuseConfig, labels: list[str],
                   groups: pd.Series | None = None, write: bool = True) -> pd.DataFrame:
    """For every tail map: the cfg.neighbours nearest head-pool maps. Positions in the pool map back to rows via
    ``head['row_id']`` and to samples via ``head['sample_id']`` (one lookup, here).

    ``groups`` (sample_id -> value of the ``--neighbours-within`` column): a tail map's partners come from head
    samples with the same value; a tail sample whose value no head sample shares falls back to the whole pool
    (counted, reported, and marked ``within_group = False``)."""
    tail = table[table["role"] == "tail"].reset_index(drop=True)
    head = table[table["role"] == "head"].reset_index(drop=True)
    if tail.empty:
        raise TailfuseError("no training sample carries a tail label: nothing to fuse.")
    tail_rows, head_rows = tail["row_id"].to_numpy(), head["row_id"].to_numpy()

    def normalised(rows: np.ndarray, block: int = 1024) -> Rows:
        """The maps of ``rows``, normalised block by block as the search reads them: the tail maps are searched a
        block at a time and a faiss index holds the head pool once, not also beside itself."""
        return Rows(len(rows), lambda: (_normalise(maps.get(rows[a : a + block]), cfg.saliency_norm,
                                                   cfg.saliency_smooth, block) for a in range(0, len(rows), block)))

    s_tail, s_head = normalised(tail_rows), normalised(head_rows)
    dist = np.zeros((len(tail), min(cfg.neighbours, len(head))), dtype=np.float32)
    pos = np.full(dist.shape, -1, dtype=np.int64)
    within = np.zeros(len(tail), dtype=bool)
    if groups is None:
        d, p = nearest(s_tail, s_head, cfg.neighbours, cfg.index)
        dist[:, : d.shape[1]], pos[:, : p.shape[1]] = d, p
    else:
        g_tail = groups.loc[tail["sample_id"]].to_numpy()
        g_head = groups.loc[head["sample_id"]].to_numpy()
        for value in pd.unique(g_tail):
            qi = np.flatnonzero(g_tail == value)
            pool = np.flatnonzero(g_head == value)
            if len(pool) == 0:
                d, p = nearest(normalised(tail_rows[qi]), s_head, cfg.neighbours, cfg.index)
            else:
                d, p = nearest(normalised(tail_rows[qi]), normalised(head_rows[pool]), cfg.neighbours, cfg.index)
                p = pool[p]
                within[qi] = True
            dist[qi[:, None], np.arange(d.shape[1])[None]] = d
            pos[qi[:, None], np.arange(p.shape[1])[None]] = p
        n_out = int((~within).sum())
        if n_out and write:
            log.info(f"note: {n_out} tail maps have no head sample with the same {cfg.neighbours_within}; their partners "
                "come from the whole head pool (within_group = False in provenance)")
    rows = []
    for i in range(len(tail)):
        for r in range(pos.shape[1]):
            p = int(pos[i, r])
            if p < 0:
                continue  # a group with fewer head samples than --neighbours
            rows.append({
                "tail_row": int(tail["row_id"][i]), "tail_sample_id": int(tail["sample_id"][i]),
                "tail_label": labels[int(tail["target"][i])], "rank": r,
                "head_row": int(head["row_id"][p]), "head_sample_id": int(head["sample_id"][p]),
                "distance": float(dist[i, r]), "within_group": bool(within[i]) if groups is not None else None,
            })
    out = pd.DataFrame(rows)
    within_tag = f"-within-{_slug(cfg.neighbours_within)}" if cfg.neighbours_within else ""
    if write:
        write_csv_atomic(folder / f"neighbours-{cfg.saliency_norm}-s{cfg.saliency_smooth:g}-{cfg.index}-k{cfg.neighbours}"
                                  f"{within_tag}.csv", out)
    return out


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))


def soft_targets(y_tail: np.ndarray, y_head: np.ndarray, tail_share: float, head_kept: float, multi: bool,
                 tail_col: int) -> np.ndarray:
    """Soft label vector of a fused sample (see FuseConfig.soft_labels)."""
    if not multi:
        h = max(0.0, 1.0 - float(tail_share)) ** 0.8  # Diff-Mix's split of the label by the edit strength
        y = np.zeros(len(y_tail), dtype=np.float64)
        y[tail_col] = 1.0 - h
        head_cols = np.flatnonzero(y_head > 0)
        if len(head_cols):
            y[head_cols] += h / len(head_cols)
        else:
            y[tail_col] = 1.0
        return y
    y = y_tail.astype(np.float64)
    extra = (y_head > 0) & (y_tail == 0)
    y[extra] = float(head_kept)
    return y


def target_counts(cfg: FuseConfig, train_counts: dict[str, int], head: list[str], tail: list[str]) -> dict[str, int]:
    """New samples per tail label: the budget rule (budget.py) with fuse's flags (default: 100 per tail label)."""
    strategy = strategy_from_flags(cfg.per_class, cfg.balance_to, cfg.sampling_strategy, default=per_class_strategy(100))
    return budget(train_counts, head, tail, strategy, cfg.max_ratio)["per_label"]


def run_fuse(run: str, cfg: FuseConfig, force: bool = False, progress: bool = True, model=None) -> dict:
    """Fuse tail and head samples into ``<run>/<cfg.name>``; returns the stage record. ``model``: a loaded
    SparseModel (default: the run's ``cfg.model`` at ``cfg.generation``). Shards are shared between processes."""
    # 1. check the settings and inputs; the number of new samples per tail label
    _validate(cfg)
    store = RunStore(run)
    store.require("encode")
    _check_group_column(store, cfg)
    gen, model_sha = model_identity(store, cfg.model, cfg.generation)
    dist = current(cfg.device)
    labels_info = store.labels()
    labels, head, tail = labels_info["labels"], labels_info["head_labels"], labels_info["tail_labels"]
    samples = store.samples().set_index("sample_id")
    train = samples[samples["split"] == "train"]
    counts = target_counts(cfg, {lab: int(train[lab].sum()) for lab in labels}, head, tail)  # validates the budget
    model = model if model is not None else SparseModel.from_run(store, cfg.model, gen, device=cfg.device)
    # 2. open the stage (skipped when done)
    enc = store.stage("encode")
    st, config_hash = _open_stage(store, cfg, gen, model_sha, enc, force, dist)
    if st.done:
        log.info(f"fuse already done for '{cfg.name}' ({st.record['n_synthetic']} samples); skipping (`{st.redo}` redoes it).")
        return st.record
    if dist.is_main:
        store.write_config(st.name, asdict(cfg))
    # 3. saliency maps, head neighbours of every tail map, and the plan of samples to make
    table, maps, sal_folder = run_saliency(store, cfg, model, gen, model_sha, progress)
    groups = samples[cfg.neighbours_within].astype(str) if cfg.neighbours_within else None
    neigh = run_neighbours(table, maps, sal_folder, cfg, labels, groups, write=dist.is_main)
    items = _plan_samples(table, labels, counts, cfg)
    st.update(n_planned=len(items))
    ctx = _FuseContext(
        cfg=cfg, model=model, device=next(model.parameters()).device, samples=samples, labels=labels,
        multi=labels_info["multi_label"], shards=store.latents(), maps=maps,
        nb={(int(r.tail_row), int(r.rank)): r for r in neigh.itertuples()},
        n_neigh=neigh.groupby("tail_row")["rank"].max().add(1).to_dict(),
        gen=gen, model_sha=model_sha, encode_hash=enc["config_hash"],
        saliency_hash=store.stage(f"saliency-{sal_folder.name}")["config_hash"], fuse_hash=config_hash)
    # 4. the shard loop
    out = store.root / cfg.name
    files = _fuse_shards(ctx, st, items, out, progress, dist)
    dist.barrier()
    # 5. finish: samples.csv and the stage's record
    return _finish(st, out, files, tail, sal_folder, dist)


@dataclass
class _FuseContext:
    """What every batch of the shard loop reads: settings, model, inputs, neighbours and the hashes of provenance."""

    cfg: FuseConfig
    model: SparseModel
    device: torch.device
    samples: pd.DataFrame  # indexed by sample_id
    labels: list[str]
    multi: bool
    shards: ShardSet  # the run's latents
    maps: ShardSet  # saliency maps
    nb: dict  # (tail_row, rank) -> neighbour row
    n_neigh: dict  # tail_row -> neighbours found (fewer in a small --neighbours-within group)
    gen: int
    model_sha: str
    encode_hash: str
    saliency_hash: str
    fuse_hash: str


def _open_stage(store: RunStore, cfg: FuseConfig, gen: int, model_sha: str, enc: dict, force: bool,
                dist: Dist) -> tuple[Stage, str]:
    """The stage ``fuse-<name>`` and its config hash (settings, model, encode); --force also wipes its decode."""
    out = store.root / cfg.name
    stage = f"fuse-{cfg.name}"
    settings = hashed_settings(cfg, exclude=("device", "batch_size"))
    config_hash = stable_hash({"fuse": settings, "model_sha256": model_sha, "encode": enc["config_hash"], "inputs": enc["inputs_hash"]})
    st = Stage.open(store, stage, config_hash, what=f"synthetic set '{cfg.name}'", force=force, dist=dist,
                    wipe=[out, store.stage_path(f"decode-{cfg.name}"), Stage.marker_dir(store, f"decode-{cfg.name}")],
                    inputs={"encode": enc["config_hash"], cfg.model: model_sha},
                    extra={"model": cfg.model, "generation": gen, "model_sha256": model_sha, "latent_set": True})
    return st, config_hash


def _plan_samples(table: pd.DataFrame, labels: list[str], counts: dict[str, int], cfg: FuseConfig) -> list:
    """The samples to make, (label, tail row, neighbour rank, repeat, slot, candidate) each, from the tail maps."""
    tail_rows: dict[str, list[int]] = {}
    for r in table[table["role"] == "tail"].itertuples():
        tail_rows.setdefault(labels[r.target], []).append(int(r.row_id))
    items = plan(tail_rows, counts, cfg.neighbours, cfg.candidates)
    if not items:
        raise TailfuseError("nothing to make: the requested counts are 0 for every tail label.")
    return items


def _fuse_shards(ctx: _FuseContext, st: Stage, items: list, out: Path, progress: bool, dist: Dist) -> list[str]:
    """Fuse the planned samples shard by shard (this process's shards); returns every shard's file name."""
    cfg = ctx.cfg
    bs = batch_for(cfg.batch_size, ctx.shards.shape)
    n_shards = (len(items) + cfg.shard_size - 1) // cfg.shard_size
    files = [f"latents/{si:05d}.safetensors" for si in range(n_shards)]
    done = sum(int(v["n"]) for v in st.shards().values())
    bar = tqdm(total=len(items), initial=done, desc=f"fuse {cfg.name}", unit="sample",
               disable=not progress or not dist.is_main, file=sys.stderr)
    try:
        for si in st.todo(list(range(n_shards))):
            lo = si * cfg.shard_size
            chunk = items[lo : lo + cfg.shard_size]
            lats, masks, prov = [], [], []
            for b in range(0, len(chunk), bs):
                part = chunk[b : b + bs]
                fused, take, rows = _fuse_batch(ctx, part, lo + b)
                lats.append(fused)
                masks.append(take.to(torch.uint8))
                prov += rows
                dist.advance(bar, len(part))
            save_tensors_atomic(out / files[si], {"latents": torch.cat(lats).float(), "mask": torch.cat(masks),
                                                  "synth_id": torch.tensor([p["synth_id"] for p in prov], dtype=torch.int64)})
            write_csv_atomic(out / "parts" / f"{si:05d}.csv", pd.DataFrame(prov))
            st.finish_shard(si, {"file": files[si], "n": len(prov)})
    finally:
        bar.close()
    return files


def _fuse_batch(ctx: _FuseContext, part: list, start: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Fuse one batch of planned samples: (fused latents, masks with True = tail, a provenance row per sample)."""
    cfg, labels = ctx.cfg, ctx.labels
    ids = np.arange(start, start + len(part))
    nrows = [ctx.nb[(row, rank % ctx.n_neigh[row])] for _, row, rank, *_ in part]
    t_ids = [int(n.tail_sample_id) for n in nrows]
    h_ids = [int(n.head_sample_id) for n in nrows]
    z_t, z_h = ctx.shards.get(t_ids).to(ctx.device), ctx.shards.get(h_ids).to(ctx.device)
    s_t = _normalise(ctx.maps.get([int(n.tail_row) for n in nrows]), cfg.saliency_norm, cfg.saliency_smooth)
    s_h = _normalise(ctx.maps.get([int(n.head_row) for n in nrows]), cfg.saliency_norm, cfg.saliency_smooth)
    q1s, q2s, take, ts, gs = _draw_masks(cfg, ids, s_t, s_h)
    fused = fuse_latents(ctx.model, z_t, z_h, take.to(ctx.device), cfg.code, cfg.detail, cfg.feather).cpu()
    share = take.float().mean((1, 2)).numpy()
    t_share = torch.cat(ts).float().mean((1, 2)).numpy()
    g_share = torch.cat(gs).float().mean((1, 2)).numpy()
    head_specific = ~torch.cat(gs)  # the head map's salient region (S_h >= q2)
    kept = ((~take & head_specific).float().sum((1, 2)) / head_specific.float().sum((1, 2)).clamp_min(1)).numpy()
    prov = []
    for j, ((lab, row, rank, rep, slot, cand), n) in enumerate(zip(part, nrows)):
        y, soft = _targets(ctx, lab, t_ids[j], h_ids[j], share[j], kept[j])
        prov.append({
            "synth_id": int(ids[j]), **{l: int(v) for l, v in zip(labels, y)}, **soft,
            "tail_label": lab, "slot": int(slot), "candidate": int(cand),
            "tail_sample_id": t_ids[j], "head_sample_id": h_ids[j],
            "tail_path": ctx.samples.loc[t_ids[j], "path"], "head_path": ctx.samples.loc[h_ids[j], "path"],
            "neighbour_rank": int(n.rank), "map_distance": float(n.distance), "repeat": int(rep),
            **({"within_group": bool(n.within_group)} if cfg.neighbours_within else {}),
            "q1": q1s[j], "q2": q2s[j], "fill_prob": cfg.fill_prob, "seed": cfg.seed,
            "detail": cfg.detail, "feather": cfg.feather, "tail_share": float(share[j]), "tail_specific_share": float(t_share[j]),
            "head_generic_share": float(g_share[j]), "head_specific_kept": float(kept[j]), "code": cfg.code, "cam": cfg.cam,
            "saliency_norm": cfg.saliency_norm, "model": cfg.model, "generation": ctx.gen,
            "model_sha256": ctx.model_sha, "encode_hash": ctx.encode_hash, "saliency_hash": ctx.saliency_hash,
            "fuse_hash": ctx.fuse_hash,
        })
    return fused, take, prov


def _draw_masks(cfg: FuseConfig, ids: np.ndarray, s_t: torch.Tensor, s_h: torch.Tensor) -> tuple:
    """Each sample's thresholds and fusion mask, from its own generator: (q1s, q2s, take_tail, T's, G's)."""
    q1s, q2s, takes, ts, gs = [], [], [], [], []
    for j, sid in enumerate(ids):
        g = sample_generator(cfg.seed, int(sid))
        q1, q2 = draw_thresholds(1, cfg.q_spread, g)
        mk = fusion_masks(s_t[j : j + 1], s_h[j : j + 1], q1, q2, cfg.fill_prob, g)
        q1s.append(float(q1)), q2s.append(float(q2))
        takes.append(mk["take_tail"]), ts.append(mk["T"]), gs.append(mk["G"])
    return q1s, q2s, torch.cat(takes), ts, gs


def _targets(ctx: _FuseContext, lab: str, t_id: int, h_id: int, share, kept) -> tuple[np.ndarray, dict]:
    """A fused sample's 0/1 labels (by the label policy) and its soft_<label> targets ({} without soft labels)."""
    cfg, labels, multi = ctx.cfg, ctx.labels, ctx.multi
    y_t = ctx.samples.loc[t_id, labels].to_numpy(dtype=np.int64)
    y_h = ctx.samples.loc[h_id, labels].to_numpy(dtype=np.int64)
    if not multi:
        y = np.zeros(len(labels), dtype=np.int64)
        y[labels.index(lab)] = 1
    elif cfg.labels_policy == "union" or (cfg.labels_policy == "kept" and kept >= 0.5):
        y = np.maximum(y_t, y_h)
    else:
        y = y_t
    soft = {}
    if cfg.soft_labels:
        y_s = soft_targets(y if not multi else y_t, y_h, float(share), float(kept), multi, labels.index(lab))
        soft = {f"soft_{l}": round(float(v), 6) for l, v in zip(labels, y_s)}
    return y, soft


def _finish(st: Stage, out: Path, files: list[str], tail: list[str], sal_folder: Path, dist: Dist) -> dict:
    """samples.csv of all shards (main process) and the stage's record."""
    parts = [pd.read_csv(out / "parts" / f"{si:05d}.csv") for si in range(len(files))]
    allrows = pd.concat(parts, ignore_index=True)
    if dist.is_main:
        write_csv_atomic(out / "samples.csv", allrows)
    per_label = {lab: int((allrows["tail_label"] == lab).sum()) for lab in tail}
    rec = st.finish(n_synthetic=len(allrows), per_label=per_label, mean_tail_share=float(allrows["tail_share"].mean()),
                    files=files, saliency=sal_folder.name)
    log.info(f"fused {len(allrows)} synthetic latents into {out} ("
             + ", ".join(f"{k} {v}" for k, v in per_label.items()) + f"); mean tail share {rec['mean_tail_share']:.2f}")
    return rec


def latent_set(store: RunStore, name: str = "synthetic") -> tuple[dict, ShardSet, Path]:
    """A finished set of synthetic latents, whichever stage made it: (its record, its shards, its folder)."""
    ls = LatentSet.open(store, name)
    return ls.record, ls.shards, ls.folder


def synthetic_latents(store: RunStore, name: str = "synthetic") -> ShardSet:
    return LatentSet.open(store, name).shards
