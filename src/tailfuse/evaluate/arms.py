"""The image arms' synthetic sets, each a folder of PNG files plus a manifest under ``<run>/eval/<arm>/``.

* fusion arms (``tailfuse``, ``tailfuse-no-imitation``, ``reference``, ``tailfuse-kept``, and any of them with
  settings in brackets, e.g. ``tailfuse[candidates=3,soft_labels=true]``): `tailfuse fuse` then `tailfuse decode` with
  the arm's settings (the set is the run's own stage output, ``name = eval/<slug>``, stage records
  ``stages/fuse-eval/<slug>.json``). ``tailfuse-no-imitation`` uses the 'train-no-imitation' model (trained here,
  with the 'train' model's settings from run.yaml and ``no_imitation``, when it is missing); ``reference`` the
  reference code's choices: EigenCAM saliency and the ``tail`` label policy.
* ``smote``: SMOTE (multi-class) / MLSMOTE (multi-label) on the flattened VAE latents of the training split, decoded
  with the run's VAE (``eval/smote/images``, ``manifest.csv``, ``provenance.csv``).
* ``vae-roundtrip``: the tail training images themselves, encoded and decoded with no fusion (``<run>/roundtrip``),
  cycling through each tail label's images like fusion's plan; the control that separates what the VAE's decoder
  does to an image from what fusion does.

Sets are made for the largest budget asked for; the arm takes the first ``n_l`` samples of label l (fusion plans each
label independently, so the first n samples of a label do not depend on the others), so every arm adds exactly the
budgeted counts.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..config import DecodeConfig, FuseConfig, TrainConfig, stable_hash
from ..errors import TailfuseError
from ..store import RunStore, StageMismatch, file_sha256, write_csv_atomic, write_json_atomic
from .config import FUSION_ARMS, ArmSpec, EvaluateConfig
from .resample import mlsmote, smote_multiclass


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


def _fuse_with_budget(store: RunStore, arm: ArmSpec, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool,
                      log, force: bool = False) -> dict:
    from ..decode import run_decode
    from ..fusion.stage import run_fuse

    spec = {**FUSION_ARMS[arm.base], **dict(arm.fuse)}
    if not _model_done(store, spec["model"]):
        hint = " --no-imitation" if spec["model"] == "train-no-imitation" else ""
        raise TailfuseError(f"arm '{arm.name}' needs the trained model '{spec['model']}': run `tailfuse train --run "
                            f"{store.root}{hint}` first, or leave the arm out with --arms.")
    name = f"eval/{arm.slug}"
    fcfg = FuseConfig(**spec, per_class=max(per_label.values()), seed=cfg.data_seed, name=name, device=cfg.device)
    try:
        run_fuse(str(store.root), fcfg, force=force, progress=progress, log=log)
    except StageMismatch:
        log(f"evaluate: the synthetic set of arm '{arm.name}' was made with other settings; making it again")
        run_fuse(str(store.root), fcfg, force=True, progress=progress, log=log)
    dcfg = DecodeConfig(name=name, vae=cfg.vae, device=cfg.device, **dict(arm.decode))
    try:
        run_decode(str(store.root), dcfg, force=force, progress=progress, log=log)
    except StageMismatch:
        run_decode(str(store.root), dcfg, force=True, progress=progress, log=log)
    folder = store.root / name
    prov = pd.read_json(folder / "provenance.jsonl", lines=True)
    if "selected" in prov.columns:
        prov = prov[prov["selected"].astype(bool)].reset_index(drop=True)
    man = pd.read_csv(folder / "manifest.csv")
    if len(prov) != len(man):
        raise TailfuseError(f"{folder}: manifest.csv and provenance.jsonl differ in length; rerun with --force.")
    keep = []
    for lab, n in per_label.items():
        keep.extend(np.flatnonzero((prov["tail_label"] == lab).to_numpy())[:n].tolist())
    keep = sorted(keep)
    fuse_rec = store.stage(f"fuse-{name}")
    dec_rec = store.stage(f"decode-{name}")
    made = {"n_made": int(fuse_rec["n_synthetic"]), "n_used": len(keep), "model": fuse_rec["model"],
            "fuse_seconds": fuse_rec.get("seconds"), "decode_seconds": dec_rec.get("seconds"),
            "settings": {**{k: v for k, v in asdict(fcfg).items() if k not in ("name", "device")},
                         **{k: v for k, v in asdict(dcfg).items() if k not in ("name", "device")}}}
    if dec_rec.get("selection"):
        made["selection"] = dec_rec["selection"]
    short = {lab: n - int((prov["tail_label"] == lab).sum()) for lab, n in per_label.items()}
    short = {lab: v for lab, v in short.items() if v > 0}
    if short:
        made["short"] = short
        log(f"evaluate: arm '{arm.name}' has fewer samples than budgeted (" + ", ".join(f"{k} -{v}" for k, v in short.items())
            + "): selection left slots empty")
    return {"folder": folder, "manifest": man.iloc[keep].reset_index(drop=True),
            "tail_label": prov["tail_label"].iloc[keep].tolist(),
            "identity": {"fuse": fuse_rec["config_hash"], "decode": dec_rec["config_hash"]}, "made": made}


def _roundtrip_set(store: RunStore, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool, log) -> dict:
    from ..codec import VAECodec
    from ..roundtrip import ensure_roundtrips

    info = store.labels()
    labels = info["labels"]
    path_col = info.get("path_column", "path")
    samples = store.samples()
    train = samples[samples["split"] == "train"].reset_index(drop=True)
    ids, tail_label = [], []
    for lab, n in per_label.items():
        rows = train["sample_id"].to_numpy()[train[lab].to_numpy() == 1]
        if n <= 0 or not len(rows):
            continue
        ids.extend(int(rows[i % len(rows)]) for i in range(n))
        tail_label.extend([lab] * n)
    t0 = time.time()
    codec = VAECodec.load(cfg.vae or store.stage("encode")["vae"]["name"], cfg.device)
    paths = ensure_roundtrips(store, ids, codec, progress=progress)
    by_id = train.set_index("sample_id")
    man = pd.DataFrame({path_col: [str(p.resolve()) for p in paths], "split": "synthetic"})
    for lab in labels:
        man[lab] = [int(by_id.loc[i, lab]) for i in ids]
    folder = store.root / "eval" / "vae-roundtrip"
    write_csv_atomic(folder / "manifest.csv", man)
    write_csv_atomic(folder / "provenance.csv", pd.DataFrame({path_col: man[path_col], "sample_id": ids,
                                                              "tail_label": tail_label}))
    return {"folder": folder, "manifest": man, "tail_label": tail_label,
            "identity": {"roundtrip": stable_hash({"ids": ids, "vae": codec.fingerprint()})},
            "made": {"n_made": len(set(ids)), "n_used": len(ids), "seconds": round(time.time() - t0, 2),
                     "method": "VAE round trip (decode of the stored latent) of the tail training images, cycled"}}


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


def make_image_arm(store: RunStore, arm: ArmSpec, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool, log,
                   force: bool = False) -> dict:
    """Make (or reuse) the arm's synthetic set; return its manifest rows (absolute paths), targets and identity."""
    if sum(per_label.values()) == 0:
        raise TailfuseError("the augmentation budget is 0 for every tail label; nothing to add (see --balance-to, "
                            "--per-class).")
    if arm.is_fusion:
        out = _fuse_with_budget(store, arm, per_label, cfg, progress, log, force)
    elif arm.base == "vae-roundtrip":
        out = _roundtrip_set(store, per_label, cfg, progress, log)
    else:
        out = _smote_set(store, per_label, cfg, progress, log, force)
    info = store.labels()
    path_col = info.get("path_column", "path")
    man = out["manifest"]
    out["paths"] = [str((out["folder"] / p).resolve()) for p in man[path_col]]
    soft = [f"soft_{lab}" for lab in info["labels"]]
    if all(c in man.columns for c in soft):
        out["y"] = man[soft].to_numpy(dtype=np.float64)  # soft targets of a fusion arm with soft_labels
        out["soft"] = True
    else:
        out["y"] = man[info["labels"]].to_numpy(dtype=np.float64)
        out["soft"] = False
    missing = [p for p in out["paths"] if not os.path.isfile(p)]
    if missing:
        raise TailfuseError(f"arm '{arm.name}': {len(missing)} synthetic images are missing (e.g. {missing[0]}); rerun "
                            "with --force.")
    out["identity"]["manifest_sha256"] = file_sha256(Path(out["folder"]) / "manifest.csv")
    return out
