"""`tailfuse info`: what a run folder holds."""

from __future__ import annotations

from .errors import TailfuseError, q
from .store import RunStore, lock_holder


def run_info(run: str) -> dict:
    store = RunStore(run)
    if not store.root.is_dir():
        raise TailfuseError(f"run folder {store.root} does not exist.")
    stages = store.stages()
    if not stages and not store.labels_json.is_file():
        raise TailfuseError(
            f"{store.root} is not a tailfuse run folder (no stages/ records, no labels.json). Make one with "
            f"`tailfuse run --data <manifest> --run {q(store.root)}` or `tailfuse encode`, or pass the folder given as "
            "--run to them."
        )
    out: dict = {"run": str(store.root.resolve()), "stages": {}}
    holder = lock_holder(store.root)
    if holder:
        out["in_use_by"] = holder
    for name, rec in stages.items():
        status = rec.get("status")
        if status == "running" and holder is None:
            status = "interrupted (resume by rerunning)"  # no live process holds the run folder
        s = {"status": status}
        for k in ("n_encoded", "n_skipped", "seconds", "finished_at", "generation", "n_samples"):
            if k in rec:
                s[k] = rec[k]
        rt = rec.get("runtime") or {}
        if rt:  # what the stage ran with, so a slow stage can explain itself
            s["threads"] = rt.get("threads")
            if rt.get("threads_used"):  # an adaptive stage: the counts it went through as other jobs came and went
                s["threads_used"] = rt["threads_used"]
            if rt.get("load_average_at_start"):
                s["load_at_start"] = rt["load_average_at_start"][0]
        out["stages"][name] = s
    if store.labels_json.is_file():
        lab = store.labels()
        out.update(
            samples=sum(1 for _ in open(store.samples_csv)) - 1 if store.samples_csv.is_file() else 0,
            latent_shape=lab.get("latent_shape"),
            labels=lab["labels"],
            head_labels=lab["head_labels"],
            tail_labels=lab["tail_labels"],
            multi_label=lab["multi_label"],
            label_counts=lab["counts"],
            image_size=lab.get("image_size"),
            source=lab.get("source_path"),
        )
        if store.samples_csv.is_file():
            splits = store.samples()["split"].value_counts()
            out["splits"] = {k: int(splits.get(k, 0)) for k in ("train", "val", "test")}
    else:
        enc = stages.get("encode", {})
        done = sum(sh.get("n", 0) for sh in enc.get("shards", {}).values())
        out.update(samples=done, latent_shape=None, labels=[], tail_labels=[], head_labels=[])
    for name, rec in stages.items():
        if name.startswith("train") and rec.get("last"):
            key = "train" if name == "train" else name.replace("-", "_")
            out[key] = {"model": name, "status": rec.get("status"), **rec["last"]}
    sets = {}
    for name, rec in stages.items():  # every decoded set: how many images, where their manifest is
        if name.startswith("decode-") and "/" not in name and rec.get("status") == "done":
            folder = store.root / name[len("decode-"):]
            sets[name[len("decode-"):]] = {"images": rec.get("n_images"), "manifest": str(folder / "manifest.csv"),
                                           "accepted_manifest": str(folder / "manifest.accepted.csv")
                                           if (folder / "manifest.accepted.csv").is_file() else None}
    out["synthetic_sets"] = sets
    enc = stages.get("encode")
    if enc:
        out["vae"] = enc.get("vae")
        out["skipped"] = enc.get("n_skipped", sum(len(sh.get("skipped", [])) for sh in enc.get("shards", {}).values()))
    return out


def format_info(info: dict) -> str:
    lines = [f"run: {info['run']}"]
    if info.get("source"):
        lines.append(f"input: {info['source']}")
    if info.get("vae"):
        v = info["vae"]
        lines.append(f"vae: {v.get('name')} ({v.get('class')}, scaling {v.get('scaling_factor')}, shift {v.get('shift_factor')})")
    shape = info.get("latent_shape")
    lines.append(f"samples: {info.get('samples', 0)}" + (f"   latent shape: {'x'.join(map(str, shape))}" if shape else ""))
    if info.get("splits"):
        lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()))
    if info.get("skipped"):
        lines.append(f"skipped (unreadable) images: {info['skipped']} (see skipped.csv)")
    if info.get("labels"):
        kind = "multi-label" if info.get("multi_label") else "multi-class"
        lines.append(f"labels ({len(info['labels'])}, {kind}):")
        w = max(len(x) for x in info["labels"])
        lines.append(f"  {'label':<{w}}  role  {'train':>6} {'val':>5} {'test':>5}")
        for lab in info["labels"]:
            c = info["label_counts"][lab]
            role = "tail" if lab in info["tail_labels"] else "head"
            lines.append(f"  {lab:<{w}}  {role}  {c['train']:>6} {c['val']:>5} {c['test']:>5}")
    for name, st in (info.get("synthetic_sets") or {}).items():
        lines.append(f"synthetic set '{name}': {st['images']} images, manifest {st['manifest']}"
                     + (f" (reviewed: {st['accepted_manifest']})" if st.get("accepted_manifest") else ""))
    if not info.get("synthetic_sets"):
        lines.append("synthetic images: none yet (`tailfuse fuse` then `tailfuse decode`, or `tailfuse run`)")
    lines.append("stages:" + ("" if info["stages"] else " none"))
    for name, s in info["stages"].items():
        extra = ", ".join(f"{k} {v}" for k, v in s.items() if k != "status")
        lines.append(f"  {name}: {s['status']}" + (f" ({extra})" if extra else ""))
    for key, t in info.items():
        if key.startswith("train") and isinstance(t, dict):
            vals = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items() if not isinstance(v, dict))
            lines.append(f"{key} (last generation): {vals}")
    return "\n".join(lines)
