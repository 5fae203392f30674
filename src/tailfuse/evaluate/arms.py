"""The image arms' synthetic sets, each a folder of PNG files plus a manifest under ``<run>/eval/<arm>/``.

* ``tailfuse``: `tailfuse fuse` with the default settings and the 'train' model, then `tailfuse decode` (the set is
  the run's own stage output, ``name = eval/tailfuse``, stage records ``stages/fuse-eval/tailfuse.json``).
* ``tailfuse-no-imitation``: the same with the 'train-no-imitation' model (trained here, with the 'train' model's
  settings from run.yaml and ``no_imitation``, when it is missing).
* ``reference``: the same with the reference code's choices: EigenCAM saliency and the ``tail`` label policy.
* ``smote``: SMOTE (multi-class) / MLSMOTE (multi-label) on the flattened VAE latents of the training split, decoded
  with the run's VAE (``eval/smote/images``, ``manifest.csv``, ``provenance.csv``).

The fusion stages make ``max(n_l)`` samples per tail label (one ``per_class`` for all, since fusion plans each label
independently the first n samples of a label do not depend on the others); the arm takes the first ``n_l`` of label
l, so every arm adds exactly the budgeted counts.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..config import DecodeConfig, FuseConfig, TrainConfig, stable_hash
from ..errors import TailfuseError
from ..store import RunStore, StageMismatch, file_sha256, write_csv_atomic, write_json_atomic
from .config import EvaluateConfig
from .resample import mlsmote, smote_multiclass

FUSION_ARMS = {
    "tailfuse": {"model": "train"},
    "tailfuse-no-imitation": {"model": "train-no-imitation"},
    "reference": {"model": "train", "cam": "eigencam", "labels_policy": "tail"},
    "tailfuse-kept": {"model": "train", "labels_policy": "kept"},
}


def _model_done(store: RunStore, name: str) -> bool:
    rec = store.stage(name)
    return bool(rec and rec.get("generations_done"))


def ensure_no_imitation_model(store: RunStore, cfg: EvaluateConfig, progress: bool, log) -> float:
    """Train 'train-no-imitation' with the 'train' model's settings when missing; returns seconds spent."""
    if _model_done(store, "train-no-imitation") and (store.stage("train-no-imitation") or {}).get("status") == "done":
        return 0.0
    if not cfg.train_missing:
        raise TailfuseError(f"run folder {store.root} has no model 'train-no-imitation'; run `tailfuse train --run "
                            f"{store.root} --no-imitation` first, or leave the arm out with --arms.")
    from ..train import run_train

    known = {f.name for f in fields(TrainConfig)}
    base = {k: v for k, v in (store.config().get("train") or {}).items() if k in known}
    base.update(no_imitation=True, name=None)
    log("evaluate: training the 'train-no-imitation' model (the ablation arm needs it; same settings as 'train')")
    t = time.time()
    run_train(str(store.root), TrainConfig(**base), progress=progress, log=log)
    return time.time() - t


def _fuse_with_budget(store: RunStore, arm: str, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool, log,
                      force: bool = False) -> dict:
    from ..decode import run_decode
    from ..fusion.stage import run_fuse

    spec = FUSION_ARMS[arm]
    if not _model_done(store, spec["model"]):
        hint = " --no-imitation" if spec["model"] == "train-no-imitation" else ""
        raise TailfuseError(f"arm '{arm}' needs the trained model '{spec['model']}': run `tailfuse train --run "
                            f"{store.root}{hint}` first, or leave the arm out with --arms.")
    name = f"eval/{arm}"
    fcfg = FuseConfig(**spec, per_class=max(per_label.values()), seed=cfg.data_seed, name=name, device=cfg.device)
    try:
        run_fuse(str(store.root), fcfg, force=force, progress=progress, log=log)
    except StageMismatch:
        log(f"evaluate: the synthetic set of arm '{arm}' was made with other settings; making it again")
        run_fuse(str(store.root), fcfg, force=True, progress=progress, log=log)
    run_decode(str(store.root), DecodeConfig(name=name, vae=cfg.vae, device=cfg.device), force=force, progress=progress,
               log=log)
    folder = store.root / name
    table = pd.read_csv(folder / "samples.csv")
    man = pd.read_csv(folder / "manifest.csv")
    if len(table) != len(man):
        raise TailfuseError(f"{folder}: manifest.csv and samples.csv differ in length; rerun with --force.")
    keep = []
    for lab, n in per_label.items():
        keep.extend(np.flatnonzero((table["tail_label"] == lab).to_numpy())[:n].tolist())
    keep = sorted(keep)
    fuse_rec = store.stage(f"fuse-{name}")
    dec_rec = store.stage(f"decode-{name}")
    return {"folder": folder, "manifest": man.iloc[keep].reset_index(drop=True),
            "tail_label": table["tail_label"].iloc[keep].tolist(),
            "identity": {"fuse": fuse_rec["config_hash"], "decode": dec_rec["config_hash"], "rows": keep},
            "made": {"n_made": int(len(table)), "n_used": int(len(keep)), "fuse_seconds": fuse_rec.get("seconds"),
                     "decode_seconds": dec_rec.get("seconds")}}


def _smote_set(store: RunStore, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool, log,
               force: bool = False) -> dict:
    from ..codec import VAECodec
    from ..images import save_png

    info = store.labels()
    labels, multi = info["labels"], info["multi_label"]
    samples = store.samples()
    train = samples[samples["split"] == "train"].reset_index(drop=True)
    enc = store.stage("encode")
    folder = store.root / "eval" / "smote"
    counts = {labels.index(lab): n for lab, n in per_label.items() if n > 0}
    y = train[labels].to_numpy(dtype=np.int64)
    vae_name = cfg.vae or enc["vae"]["name"]
    ident = stable_hash({"method": "mlsmote" if multi else "smote", "k": cfg.smote_k, "seed": cfg.data_seed,
                         "counts": per_label, "train_ids": train["sample_id"].tolist(), "inputs": enc["inputs_hash"],
                         "encode": enc["config_hash"], "vae_weights": enc["vae"]["weights_sha256"]})
    rec_path = folder / "record.json"
    path_col = info.get("path_column", "path")
    if rec_path.is_file() and not force:
        import json

        rec = json.loads(rec_path.read_text())
        if rec.get("hash") == ident and (folder / "manifest.csv").is_file():
            man = pd.read_csv(folder / "manifest.csv")
            if all((folder / p).is_file() for p in man[path_col]):
                log(f"evaluate: SMOTE set already made ({len(man)} images); reusing it")
                prov = pd.read_csv(folder / "provenance.csv")
                return {"folder": folder, "manifest": man, "tail_label": prov["tail_label"].tolist(),
                        "identity": {"smote": ident}, "made": rec["made"]}
    t0 = time.time()
    z = store.latents().get(train["sample_id"].to_numpy()).numpy()
    if multi:
        new_z, new_y, prov = mlsmote(z, y, counts, cfg.smote_k, cfg.data_seed)
        prov_df = pd.DataFrame(prov)
        prov_df["tail_label"] = [labels[j] for j in prov_df["label_column"]] if len(prov_df) else []
        prov_df["seed_sample_id"] = train["sample_id"].to_numpy()[prov_df["seed_row"]] if len(prov_df) else []
        prov_df["reference_sample_id"] = train["sample_id"].to_numpy()[prov_df["reference_row"]] if len(prov_df) else []
        notes = {"method": "MLSMOTE (Charte et al. 2015), ranking label rule", "k": cfg.smote_k}
    else:
        new_z, new_y, sm_notes = smote_multiclass(z, y, counts, cfg.smote_k, cfg.data_seed)
        prov_df = pd.DataFrame({"tail_label": [labels[j] for j in new_y.argmax(1)]})
        notes = {"method": "imbalanced-learn SMOTE", "k": cfg.smote_k,
                 **{str(k): v for k, v in sm_notes.items()}}
    codec = VAECodec.load(vae_name, cfg.device)
    if codec.fingerprint()["weights_sha256"] != enc["vae"]["weights_sha256"]:
        log(f"note: decoding SMOTE latents with VAE '{vae_name}', not the one the run was encoded with")
    import shutil

    import torch

    shutil.rmtree(folder / "images", ignore_errors=True)  # a set made with other settings is replaced whole
    (folder / "images").mkdir(parents=True, exist_ok=True)

    paths = [f"images/{i:06d}.png" for i in range(len(new_z))]
    bs = 32
    for a in tqdm(range(0, len(new_z), bs), desc="decode smote", disable=not progress, file=sys.stderr, leave=False):
        imgs = codec.decode(torch.from_numpy(np.ascontiguousarray(new_z[a : a + bs])).float())
        for p, img in zip(paths[a : a + bs], imgs):
            save_png(img, str(folder / p))
    man = pd.DataFrame({path_col: paths, "split": "synthetic"})
    for j, lab in enumerate(labels):
        man[lab] = new_y[:, j].astype(int)
    write_csv_atomic(folder / "manifest.csv", man)
    prov_df.insert(0, path_col, paths)
    write_csv_atomic(folder / "provenance.csv", prov_df)
    made = {"n_made": int(len(man)), "n_used": int(len(man)), "seconds": round(time.time() - t0, 2), **notes}
    write_json_atomic(rec_path, {"hash": ident, "made": made, "vae": codec.identity()})
    return {"folder": folder, "manifest": man, "tail_label": prov_df["tail_label"].tolist(), "identity": {"smote": ident},
            "made": made}


def make_image_arm(store: RunStore, arm: str, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool, log,
                   force: bool = False) -> dict:
    """Make (or reuse) the arm's synthetic set; return its manifest rows (absolute paths), labels and identity."""
    if sum(per_label.values()) == 0:
        raise TailfuseError("the augmentation budget is 0 for every tail label; nothing to add (see --balance-to, "
                            "--per-class).")
    if arm in FUSION_ARMS:
        out = _fuse_with_budget(store, arm, per_label, cfg, progress, log, force)
    else:
        out = _smote_set(store, per_label, cfg, progress, log, force)
    info = store.labels()
    path_col = info.get("path_column", "path")
    man = out["manifest"]
    out["paths"] = [str((out["folder"] / p).resolve()) for p in man[path_col]]
    out["y"] = man[info["labels"]].to_numpy(dtype=np.int64)
    missing = [p for p in out["paths"] if not os.path.isfile(p)]
    if missing:
        raise TailfuseError(f"arm '{arm}': {len(missing)} synthetic images are missing (e.g. {missing[0]}); rerun "
                            "with --force.")
    out["identity"]["manifest_sha256"] = file_sha256(Path(out["folder"]) / "manifest.csv")
    return out
