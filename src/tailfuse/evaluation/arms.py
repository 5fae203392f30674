"""The image arms' synthetic sets, each a folder of PNG files plus a manifest under ``<run>/eval/<arm>/``.

* fusion arms (``tailfuse``, ``tailfuse-no-imitation``, ``reference``, ``tailfuse-kept``, and any of them with
  settings in brackets, e.g. ``tailfuse[candidates=3,soft_labels=true]``): `tailfuse fuse` then `tailfuse decode` with
  the arm's settings (the set is the run's own stage output, ``name = eval/<slug>``, stage records
  ``stages/fuse-eval/<slug>.json``). ``tailfuse-no-imitation`` uses the 'train-no-imitation' model (trained here,
  with the 'train' model's settings from run.yaml and ``no_imitation``, when it is missing); ``reference`` the
  reference code's choices: EigenCAM saliency and the ``tail`` label policy.
* ``smote``: SMOTE (multi-class) / MLSMOTE (multi-label) on the flattened VAE latents of the training split, decoded
  with the run's VAE (``eval/smote/images``, ``manifest.csv``, ``provenance.csv``).
* ``cmo``: CMO's context-rich minority over-sampling in pixel space (``_cmo_set``): a tail image's CutMix box in a
  uniformly drawn training image, the target mixed by area; no VAE. Fusion's classical twin.
* ``vae-roundtrip``: the tail training images themselves, encoded and decoded with no fusion (``<run>/roundtrip``),
  cycling through each tail label's images like fusion's plan; the control that separates what the VAE's decoder
  does to an image from what fusion does.

Sets are made for the largest budget asked for; the arm takes the first ``n_l`` samples of label l (fusion plans each
label independently, so the first n samples of a label do not depend on the others), so every arm adds exactly the
budgeted counts.
"""

from __future__ import annotations

import logging

import os
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DecodeConfig, FuseConfig, TrainConfig, stable_hash
from ..errors import TailfuseError, q
from ..store import RunStore, StageMismatch, file_sha256, npz_save_atomic, write_csv_atomic
from .config import FUSION_ARM_DECODE, FUSION_ARMS, ArmSpec, EvaluateConfig
from .resample import mlsmote, smote_multiclass

log = logging.getLogger("tailfuse")


def _model_done(store: RunStore, name: str) -> bool:
    rec = store.stage(name)
    return bool(rec and rec.get("generations_done"))


def _train_like_run(store: RunStore, cfg: EvaluateConfig, what: str, hint: str, section: str, config_cls, runner,
                    overrides: dict, progress: bool) -> float:
    """Train the missing ``what`` with the run's ``section`` settings from run.yaml (or the defaults) plus
    ``overrides``, or refuse under --no-train-missing with the ``hint`` (the command that trains it); returns seconds
    spent."""
    if not cfg.train_missing:
        raise TailfuseError(f"run folder {store.root} has no {what}; {hint}")
    known = {f.name for f in fields(config_cls)}
    base = {k: v for k, v in (store.config().get(section) or {}).items() if k in known}
    base.update(overrides)
    log.info(f"evaluate: training the missing {what}")
    t = time.time()
    runner(str(store.root), config_cls(**base), progress=progress)
    return time.time() - t


def ensure_no_imitation_model(store: RunStore, cfg: EvaluateConfig, progress: bool) -> float:
    """Train 'train-no-imitation' (the ablation arm's model) with the 'train' model's settings when missing; returns
    seconds spent."""
    from ..train import run_train

    if _model_done(store, "train-no-imitation") and store.stage("train-no-imitation").get("status") == "done":
        return 0.0
    hint = f"run `tailfuse train --run {q(store.root)} --no-imitation` first, or leave the arm out with --arms."
    return _train_like_run(store, cfg, "model 'train-no-imitation'", hint, "train", TrainConfig, run_train,
                           {"no_imitation": True, "name": None}, progress)


def ensure_prior(store: RunStore, cfg: EvaluateConfig, progress: bool) -> float:
    """Train the run's latent prior (the diffusion arms need it) with its settings from run.yaml (or the defaults)
    when missing; returns seconds spent."""
    from ..config import PriorConfig
    from ..diffusion.train_prior import run_train_prior

    if (store.stage("prior") or {}).get("status") == "done":
        return 0.0
    hint = f"run `tailfuse train-prior --run {q(store.root)}` first, or leave the diffusion arms out with --arms."
    return _train_like_run(store, cfg, "trained prior", hint, "prior", PriorConfig, run_train_prior, {"name": "prior"},
                           progress)


def _decoded_set(store: RunStore, name: str, per_label: dict[str, int], arm: str) -> tuple[pd.DataFrame, list[int], dict]:
    """The manifest rows of a decoded set that make the budget: the first n_l selected samples of each tail label."""
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
    short = {lab: n - int((prov["tail_label"] == lab).sum()) for lab, n in per_label.items()}
    short = {lab: v for lab, v in short.items() if v > 0}
    if short:
        log.info(f"evaluate: arm '{arm}' has fewer samples than budgeted (" + ", ".join(f"{k} -{v}" for k, v in short.items())
            + "): selection left slots empty")
    return man.iloc[keep].reset_index(drop=True), prov["tail_label"].iloc[keep].tolist(), short


def _decode(store: RunStore, dcfg: DecodeConfig, force: bool, progress: bool) -> dict:
    from ..decode import run_decode

    try:
        return run_decode(str(store.root), dcfg, force=force, progress=progress)
    except StageMismatch:
        return run_decode(str(store.root), dcfg, force=True, progress=progress)


def _fuse_with_budget(store: RunStore, arm: ArmSpec, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool, force: bool = False) -> dict:
    from ..config import RefineConfig
    from ..diffusion.refine import run_refine
    from ..fusion.stage import run_fuse

    spec = {**FUSION_ARMS[arm.base], **dict(arm.fuse)}
    if not _model_done(store, spec["model"]):
        hint = " --no-imitation" if spec["model"] == "train-no-imitation" else ""
        raise TailfuseError(f"arm '{arm.name}' needs the trained model '{spec['model']}': run `tailfuse train --run "
                            f"{q(store.root)}{hint}` first, or leave the arm out with --arms.")
    name = f"eval/{arm.slug}"
    train_counts = {lab: int(c["train"]) for lab, c in store.labels()["counts"].items()}
    totals = {lab: train_counts[lab] + n for lab, n in per_label.items()}  # exactly n_l new samples of label l
    fcfg = FuseConfig(**spec, sampling_strategy=totals, seed=cfg.data_seed, name=name, device=cfg.device)
    try:
        run_fuse(str(store.root), fcfg, force=force, progress=progress)
    except StageMismatch:
        log.info(f"evaluate: the synthetic set of arm '{arm.name}' was made with other settings; making it again")
        run_fuse(str(store.root), fcfg, force=True, progress=progress)
    fuse_rec = store.stage(f"fuse-{name}")
    made = {"n_made": int(fuse_rec["n_synthetic"]), "model": fuse_rec["model"], "fuse_seconds": fuse_rec.get("seconds")}
    identity = {"fuse": fuse_rec["config_hash"]}
    ref = arm.refine_settings()
    settings = {k: v for k, v in asdict(fcfg).items() if k not in ("name", "device")}
    if ref:
        rcfg = RefineConfig(source=name, refine=ref["refine"], guidance=float(ref.get("guidance", 2.0)),
                            seed=cfg.data_seed, name=f"{name}-refined", device=cfg.device)
        try:
            rrec = run_refine(str(store.root), rcfg, force=force, progress=progress)
        except StageMismatch:
            rrec = run_refine(str(store.root), rcfg, force=True, progress=progress)
        name = rcfg.out_name
        made["refine_seconds"] = rrec.get("seconds")
        identity["refine"] = rrec["config_hash"]
        settings.update(refine=rcfg.refine, guidance=rcfg.guidance)
    dcfg = DecodeConfig(name=name, vae=cfg.vae, device=cfg.device, **{**FUSION_ARM_DECODE.get(arm.base, {}), **dict(arm.decode)})
    dec_rec = _decode(store, dcfg, force, progress)
    man, tail_label, short = _decoded_set(store, name, per_label, arm.name)
    made.update(n_used=len(man), decode_seconds=dec_rec.get("seconds"),
                settings={**settings, **{k: v for k, v in asdict(dcfg).items() if k not in ("name", "device")}})
    if dec_rec.get("selection"):
        made["selection"] = dec_rec["selection"]
    if short:
        made["short"] = short
    identity["decode"] = dec_rec["config_hash"]
    return {"folder": store.root / name, "manifest": man, "tail_label": tail_label, "identity": identity, "made": made}


def _prior_sample_set(store: RunStore, arm: ArmSpec, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool, force: bool = False) -> dict:
    from ..diffusion.refine import run_sample

    st = arm.settings()
    name = f"eval/{arm.slug}"
    kw = dict(steps=int(st["steps"]), guidance=float(st["guidance"]), seed=cfg.data_seed, name=name, device=cfg.device,
              progress=progress)
    try:
        rec = run_sample(str(store.root), per_label, force=force, **kw)
    except StageMismatch:
        rec = run_sample(str(store.root), per_label, force=True, **kw)
    dcfg = DecodeConfig(name=name, vae=cfg.vae, device=cfg.device, drop_near_copies=bool(st["drop_near_copies"]))
    dec_rec = _decode(store, dcfg, force, progress)
    man, tail_label, short = _decoded_set(store, name, per_label, arm.name)
    made = {"n_made": int(rec["n_synthetic"]), "n_used": len(man), "sample_seconds": rec.get("seconds"),
            "decode_seconds": dec_rec.get("seconds"), "settings": st, **({"short": short} if short else {})}
    return {"folder": store.root / name, "manifest": man, "tail_label": tail_label,
            "identity": {"sample": rec["config_hash"], "decode": dec_rec["config_hash"]}, "made": made}


def _roundtrip_set(store: RunStore, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool) -> dict:
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


def _smote_set(store: RunStore, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool,
               force: bool = False) -> dict:
    """SMOTE / MLSMOTE in the VAE latent space of the training split, as a latent set (stage ``smote-eval/smote``)
    decoded by `tailfuse decode` like every other set."""
    import torch

    from ..stage import Stage
    from ..store import save_tensors_atomic

    info = store.labels()
    labels, multi = info["labels"], info["multi_label"]
    samples = store.samples()
    train = samples[samples["split"] == "train"].reset_index(drop=True)
    enc = store.stage("encode")
    name = "eval/smote"
    folder = store.root / name
    counts = {labels.index(lab): n for lab, n in per_label.items() if n > 0}
    y = train[labels].to_numpy(dtype=np.int64)
    ident = stable_hash({"method": "mlsmote" if multi else "smote", "k": cfg.smote_k, "seed": cfg.data_seed,
                         "counts": per_label, "train_ids": train["sample_id"].tolist(), "inputs": enc["inputs_hash"],
                         "encode": enc["config_hash"]})
    kw = dict(what="the SMOTE set", wipe=[folder], extra={"latent_set": True})
    try:
        st = Stage.open(store, f"smote-{name}", ident, force=force, **kw)
    except StageMismatch:  # made for another budget or split: made again
        st = Stage.open(store, f"smote-{name}", ident, force=True, **kw)
    if not st.done:
        t0 = time.time()
        z = store.latents().get(train["sample_id"].to_numpy()).numpy()
        if multi:
            new_z, new_y, prov = mlsmote(z, y, counts, cfg.smote_k, cfg.data_seed)
            table = pd.DataFrame(prov)
            table["tail_label"] = [labels[j] for j in table["label_column"]] if len(table) else []
            table["seed_sample_id"] = train["sample_id"].to_numpy()[table["seed_row"]] if len(table) else []
            table["reference_sample_id"] = train["sample_id"].to_numpy()[table["reference_row"]] if len(table) else []
            notes = {"method": "MLSMOTE (Charte et al. 2015), ranking label rule", "k": cfg.smote_k}
        else:
            new_z, new_y, sm_notes = smote_multiclass(z, y, counts, cfg.smote_k, cfg.data_seed)
            table = pd.DataFrame({"tail_label": [labels[j] for j in new_y.argmax(1)]})
            notes = {"method": "imbalanced-learn SMOTE", "k": cfg.smote_k, **{str(k): v for k, v in sm_notes.items()}}
        table.insert(0, "synth_id", np.arange(len(new_z)))
        for j, lab in enumerate(labels):
            table[lab] = new_y[:, j].astype(int)
        table["slot"] = table["synth_id"]
        if st.dist.is_main:
            save_tensors_atomic(folder / "latents" / "00000.safetensors",
                                {"latents": torch.from_numpy(np.ascontiguousarray(new_z)).float(),
                                 "synth_id": torch.arange(len(new_z), dtype=torch.int64)})
            write_csv_atomic(folder / "samples.csv", table)
        st.finish(with_shards=False, files=["latents/00000.safetensors"], n_synthetic=int(len(new_z)),
                  seconds=round(time.time() - t0, 2), notes=notes)
    dec_rec = _decode(store, DecodeConfig(name=name, vae=cfg.vae, device=cfg.device), force, progress)
    man, tail_label, _ = _decoded_set(store, name, per_label, "smote")
    rec = store.stage(f"smote-{name}")
    made = {"n_made": int(rec["n_synthetic"]), "n_used": len(man), "sample_seconds": rec.get("seconds"),
            "decode_seconds": dec_rec.get("seconds"), **(rec.get("notes") or {})}
    return {"folder": folder, "manifest": man, "tail_label": tail_label,
            "identity": {"smote": ident, "decode": dec_rec["config_hash"]}, "made": made}


def cutmix_box(size: int, rng: np.random.Generator) -> tuple[int, int, int, int, float]:
    """CutMix's box (Yun et al. 2019, as CMO uses it): lambda ~ Beta(1, 1), a box of side size * sqrt(1 - lambda)
    centred at a uniform position and clipped to the image. Returns y0, y1, x0, x1 and the background's exact kept
    share (1 - box area / image area)."""
    lam = rng.beta(1.0, 1.0)
    cut = int(size * np.sqrt(1.0 - lam))
    cy, cx = rng.integers(0, size), rng.integers(0, size)
    y0, y1 = int(np.clip(cy - cut // 2, 0, size)), int(np.clip(cy + cut // 2, 0, size))
    x0, x1 = int(np.clip(cx - cut // 2, 0, size)), int(np.clip(cx + cut // 2, 0, size))
    return y0, y1, x0, x1, 1.0 - (y1 - y0) * (x1 - x0) / float(size * size)


def _cmo_set(store: RunStore, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool) -> dict:
    """CMO, context-rich minority over-sampling (Park et al. 2022), as a set of images: for each of the n_l images of
    tail label l, a training image carrying l (the minority foreground, drawn uniformly among them) is CutMixed into
    a training image drawn uniformly from the whole training set (the context: mostly head images, the natural
    distribution). The box (``cutmix_box``) takes the foreground's pixels at the same place; the target is
    ``lambda y_background + (1 - lambda) y_foreground`` with lambda the exact kept area (soft_<label> columns; the
    0/1 columns carry the foreground's labels, and the background's too on multi-label data). Pixels at the run's
    image size; no VAE. CMO draws its foregrounds with weights 1/n_c over every class; here the budget decides how many
    images each tail label gets, as for every arm. Made once per run (seed ``data_seed``) in ``<run>/eval/cmo/``."""
    from ..images import load_image, save_png

    info = store.labels()
    labels, multi, grey = info["labels"], bool(info["multi_label"]), bool(info.get("greyscale"))
    path_col = info.get("path_column", "path")
    size = int(info.get("image_size") or 128)
    resize = (store.config().get("data") or {}).get("resize", "center-crop")
    samples = store.samples()
    train = samples[samples["split"] == "train"].reset_index(drop=True)
    y = train[labels].to_numpy(dtype=np.float64)
    folder = store.root / "eval" / "cmo"
    ident = stable_hash({"method": "cmo", "seed": cfg.data_seed, "per_label": per_label, "size": size,
                         "resize": resize, "train_ids": train["sample_id"].tolist(), "grey": grey, "v": 1})
    done = folder / "identity.txt"
    if not (done.is_file() and done.read_text() == ident and (folder / "manifest.csv").is_file()):
        t0 = time.time()
        rng = np.random.default_rng(cfg.data_seed)
        rows, cache = [], {}

        def img(i):
            if i not in cache:
                cache[i] = load_image(train["abs_path"].iloc[i], size, resize)
            return cache[i]

        k = 0
        for lab, n in per_label.items():
            fg_pool = np.flatnonzero(y[:, labels.index(lab)] > 0)
            for _ in range(n):
                fg, bg = int(rng.choice(fg_pool)), int(rng.integers(0, len(train)))
                y0, y1, x0, x1, lam = cutmix_box(size, rng)
                x = img(bg).clone()
                x[:, y0:y1, x0:x1] = img(fg)[:, y0:y1, x0:x1]
                rel = f"images/{k:06d}.png"
                (folder / "images").mkdir(parents=True, exist_ok=True)
                save_png(x, str(folder / rel), grey=grey)
                soft = lam * y[bg] + (1 - lam) * y[fg]
                hard = np.maximum(y[bg], y[fg]) if multi else y[fg]
                rows.append({path_col: rel, "split": "synthetic", **{lb: int(hard[j]) for j, lb in enumerate(labels)},
                             **{f"soft_{lb}": float(soft[j]) for j, lb in enumerate(labels)},
                             "tail_label": lab, "foreground_sample_id": int(train["sample_id"].iloc[fg]),
                             "background_sample_id": int(train["sample_id"].iloc[bg]), "lambda": lam,
                             "box": [y0, y1, x0, x1]})
                k += 1
        table = pd.DataFrame(rows)
        write_csv_atomic(folder / "provenance.csv", table)
        write_csv_atomic(folder / "manifest.csv", table[[path_col, "split", *labels, *[f"soft_{lb}" for lb in labels]]])
        from ..store import write_text_atomic

        write_text_atomic(folder / "seconds.txt", f"{time.time() - t0:.2f}")
        write_text_atomic(done, ident)
    man = pd.read_csv(folder / "manifest.csv")
    prov = pd.read_csv(folder / "provenance.csv")
    seconds = float((folder / "seconds.txt").read_text()) if (folder / "seconds.txt").is_file() else None
    return {"folder": folder, "manifest": man, "tail_label": prov["tail_label"].tolist(), "identity": {"cmo": ident},
            "made": {"n_made": len(man), "n_used": len(man), "seconds": seconds,
                     "method": "CMO: a tail image's CutMix box (lambda ~ Beta(1, 1)) in a uniformly drawn training "
                               "image, target mixed by area, pixel space"}}


def _reviewed_set(store: RunStore, per_label: dict[str, int], cfg: EvaluateConfig) -> dict:
    """The accepted images of a reviewed set (`tailfuse review`), budgeted like every arm: the first n_l accepted
    images of each tail label (fewer when the review accepted fewer; reported)."""
    name = cfg.reviewed_set
    folder = store.root / name
    acc = folder / "manifest.accepted.csv"
    if not acc.is_file():
        raise TailfuseError(f"arm 'tailfuse-reviewed' needs the reviewed set '{name}': review its report "
                            f"(`tailfuse report --run {q(store.root)} --name {q(name)}`), then `tailfuse review --run "
                            f"{q(store.root)} --name {q(name)} --decisions <csv>`; or leave the arm out with --arms.")
    from ..review import set_table

    path_col = store.labels().get("path_column", "path")
    man = pd.read_csv(acc)
    label_of = dict(zip(set_table(store, name)["path"], set_table(store, name)["tail_label"]))
    tails = [label_of[p] for p in man[path_col]]
    keep = []
    for lab, n in per_label.items():
        keep.extend([i for i, t in enumerate(tails) if t == lab][:n])
    keep = sorted(keep)
    short = {lab: n - sum(t == lab for t in tails) for lab, n in per_label.items()}
    short = {k: v for k, v in short.items() if v > 0}
    if short:
        log.info("evaluate: the review accepted fewer images than budgeted (" + ", ".join(f"{k} -{v}" for k, v in short.items()) + ")")
    return {"folder": folder, "manifest": man.iloc[keep].reset_index(drop=True), "tail_label": [tails[i] for i in keep],
            "identity": {"accepted": file_sha256(acc)},
            "made": {"n_made": int(len(man)), "n_used": len(keep), "set": name, **({"short": short} if short else {})}}


def make_image_arm(store: RunStore, arm: ArmSpec, per_label: dict[str, int], cfg: EvaluateConfig, progress: bool,
                   force: bool = False) -> dict:
    """Make (or reuse) the arm's synthetic set; return its manifest rows (absolute paths), targets and identity."""
    if sum(per_label.values()) == 0:
        raise TailfuseError("the augmentation budget is 0 for every tail label; nothing to add (see --balance-to, "
                            "--per-class).")
    if arm.is_fusion:
        out = _fuse_with_budget(store, arm, per_label, cfg, progress, force)
    elif arm.base == "prior-sample":
        out = _prior_sample_set(store, arm, per_label, cfg, progress, force)
    elif arm.base == "vae-roundtrip":
        out = _roundtrip_set(store, per_label, cfg, progress)
    elif arm.base == "tailfuse-reviewed":
        out = _reviewed_set(store, per_label, cfg)
    elif arm.base == "cmo":
        out = _cmo_set(store, per_label, cfg, progress)
    else:
        out = _smote_set(store, per_label, cfg, progress, force)
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


def feature_diffusion_set(store: RunStore, arm: ArmSpec, per_label: dict[str, int], cfg: EvaluateConfig,
                          x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                          progress: bool) -> dict:
    """LDMLR-style baseline: a small conditional diffusion model (``FeaturePrior``, the same trainer as the latent
    prior) on the real training images' frozen classifier features; tail features sampled with DDIM and guidance,
    budgeted like every arm (label vectors planned as for prior sampling). No images: the features join the
    classifier's training set directly. Cached under ``<run>/eval/<arm>/``."""
    import torch

    from ..config import PriorConfig
    from ..diffusion import samplers
    from ..diffusion.refine import _sample_noise, tail_plan_labels
    from ..diffusion.train_prior import train_feature_prior

    st = arm.settings()
    folder = store.root / "eval" / arm.slug
    tl, ys, src = tail_plan_labels(store, per_label)
    ident = stable_hash({"x": stable_hash(np.round(x_train, 4).tolist()), "y": y_train.tolist(), "settings": st,
                         "labels": ys.tolist(), "seed": cfg.data_seed})
    cache = folder / f"features-{ident[:16]}.npz"
    t0 = time.time()
    if cache.is_file():
        with np.load(cache) as z:
            gen = z["features"]
    else:
        pcfg = PriorConfig(epochs=int(st["epochs"]), batch_size=64, lr=1e-3, seed=cfg.data_seed)
        model = train_feature_prior(x_train, y_train, x_val, y_val, pcfg, folder / f"model-{ident[:16]}", progress)
        sched = samplers.ddim_scheduler(model.scheduler())
        with torch.no_grad():
            eps = samplers.guided(model, torch.from_numpy(ys), float(st["guidance"]))
            noise = _sample_noise(cfg.data_seed, range(len(tl)), (x_train.shape[1],))
            gen = model.destandardise(samplers.sample(eps, noise, sched, int(st["steps"]))).numpy()
        npz_save_atomic(cache, features=gen, labels=ys, tail_label=np.array(tl), source=np.array(src))
    return {"features": gen.astype(np.float32), "y": ys.astype(np.float64), "tail_label": tl,
            "identity": {"feature_diffusion": ident},
            "made": {"n_made": len(tl), "seconds": round(time.time() - t0, 2), "settings": st,
                     "method": "LDMLR-style: conditional DDPM (residual MLP) on frozen EfficientNet-Lite0 features"}}
