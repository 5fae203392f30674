"""`tailfuse report`: a self-contained HTML page to review a synthetic set (opens from disk: no server, no network).

Written to ``<run>/<set>/report/``:
  index.html, app.js, style.css   the page (copied from the package)
  data.js                         everything the page shows, as one script (file:// pages cannot fetch JSON)
  thumbs/src/<sample_id>.png      the real source images, at the run's image size
  thumbs/maps/<row_id>.png        saliency maps (latent grid, colour-mapped; scaled up by the browser)
  thumbs/masks/<synth_id>.png     fusion masks (white: taken from the tail image)
  overview/*.png                  class counts before / after, and the evaluation's plots when it has run

The page shows the run at a glance (data, head / tail labels, counts before and after, the settings, model and VAE
hashes, the evaluation's tables and plots), then a gallery per tail label: each synthetic image beside its tail and
head sources, their saliency maps and the fusion mask, its labels and its scores (the real-data classifier's
probability of its tail label, the distance to its nearest real training image, the near-copy flag), sortable by
each score, 100 per page. Reviewing happens in the page (see app.js); `tailfuse review` imports the decisions, and
a regenerated report shows them as imported.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from ..errors import TailfuseError
from ..latentset import LatentSet
from ..review import load_decisions, set_id, set_table
from ..store import RunStore, atomic_file, write_text_atomic
from ..threads import adaptive

log = logging.getLogger("tailfuse")
STATIC = ("index.html", "app.js", "style.css")


def _png(a: np.ndarray, path: Path) -> None:
    with atomic_file(path, ".png") as tmp:
        Image.fromarray(a).save(tmp)


def _colour(m: np.ndarray) -> np.ndarray:
    """A [0, 1] map -> RGB uint8 (matplotlib's viridis)."""
    import matplotlib

    return (matplotlib.colormaps["viridis"](np.clip(m, 0, 1))[..., :3] * 255).astype(np.uint8)


def _scores(store: RunStore, name: str, table: pd.DataFrame, progress: bool) -> pd.DataFrame:
    """tail_prob / nn_distance / nn_ratio / near_copy per image: from decode's selection, or computed once here
    (cached in <set>/scores.csv)."""
    cols = ["tail_prob", "nn_distance", "nn_ratio", "near_copy"]
    if all(c in table.columns for c in cols):
        return table[["synth_id", *cols]]
    cache = store.root / name / "scores.csv"
    if cache.is_file():
        sc = pd.read_csv(cache)
        if set(sc["synth_id"]) >= set(table["synth_id"]):
            return sc
    from ..scoring import RealScorer, run_image_features

    scorer = RealScorer.fit(store, progress=progress)
    paths = [str(store.root / name / p) for p in table["path"]]
    feats = run_image_features(store, paths, progress=progress, desc="synthetic image features")
    s = scorer.score(feats, table["tail_label"].tolist(), paths)
    sc = pd.DataFrame({"synth_id": table["synth_id"], "tail_prob": s["tail_prob"], "nn_distance": s["nn_distance"],
                       "nn_ratio": s["nn_ratio"], "near_copy": s["near_copy"]})
    from ..store import write_csv_atomic

    write_csv_atomic(cache, sc)
    return sc


def _saliency_folder(store: RunStore, ls: LatentSet) -> Path | None:
    rec = ls.record
    while rec is not None and rec.get("source") and ls.kind != "fuse":  # a refined set: its fused source's maps
        src = LatentSet.open(store, rec["source"])
        ls, rec = src, src.record
    if ls.kind != "fuse":
        return None
    tag = rec.get("saliency")
    if tag is None:
        cfg = (store.config().get(f"fuse-{ls.name}") or {})
        tag = f"{rec.get('model', 'train')}-g{int(rec.get('generation', 0)):02d}-{cfg.get('cam', 'gradcam')}-" \
              f"{cfg.get('cam_layer', 'full')}"
    folder = store.root / "saliency" / tag
    return folder if (folder / "maps.csv").is_file() else None


def _md_tables(md: str) -> str:
    """The evaluation's results.md as HTML: its tables as tables, the rest as paragraphs."""
    out, rows = [], []

    def flush():
        if rows:
            body = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c.strip())}</{'th' if i == 0 else 'td'}>"
                                            for c in r) + "</tr>" for i, r in enumerate(rows))
            out.append(f"<table class='eval'>{body}</table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = line.strip().strip("|").split("|")
            if not all(set(c.strip()) <= {"-", ":"} for c in cells):
                rows.append(cells)
            continue
        flush()
        if line.startswith("#"):
            out.append(f"<h3>{html.escape(line.lstrip('#').strip())}</h3>")
        elif line.strip() and not line.startswith("```"):
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


@adaptive
def run_report(run: str, name: str = "synthetic", per_page: int = 100, progress: bool = True) -> dict:
    """Write the review page of the decoded set ``name`` to ``<run>/<name>/report/``; returns its index.html, the
    number of images and the set's id."""
    t0 = time.time()
    # 1. check the inputs: the run, the set and its manifest
    if per_page < 1:
        raise TailfuseError("--per-page must be at least 1.")
    store = RunStore(run)
    store.require("encode")
    ls = LatentSet.open(store, name)
    sid = set_id(store, name)
    info = store.labels()
    labels, tail = info["labels"], info["tail_labels"]
    table = set_table(store, name).reset_index(drop=True)
    if table.empty:
        raise TailfuseError(f"the set '{name}' has no image in its manifest; nothing to review.")
    folder = store.root / name / "report"
    thumbs = folder / "thumbs"
    for sub in ("src", "maps", "masks"):
        (thumbs / sub).mkdir(parents=True, exist_ok=True)
    # 2. the images' scores; thumbnails of the source images, saliency maps and fusion masks
    sc = _scores(store, name, table, progress).set_index("synth_id")
    samples = store.samples().set_index("sample_id")
    fused = {"tail_sample_id", "head_sample_id"} <= set(table.columns)
    _source_thumbnails(store, info, table, samples, thumbs, fused, progress)
    sal = _saliency_folder(store, ls) if fused else None
    map_row = _map_thumbnails(store, sal, table, labels, thumbs) if sal is not None else {}
    masks_ok = fused and ls.has_masks
    if masks_ok:
        _mask_thumbnails(ls, table, thumbs)
    # 3. the overview: counts before and after, the evaluation
    before, added, evaluation = _overview(store, name, info, labels, tail, folder)
    # 4. the gallery, and the page's data and files
    items = _gallery_items(table, sc, samples, labels, map_row, fused, masks_ok, load_decisions(store, name))
    cfg = store.config()
    settings = {k: v for k, v in cfg.items() if k.endswith(name) or k in ("data", "vae", "train")}
    enc = store.stage("encode")
    data = {
        "set": name, "set_id": sid, "run": str(store.root.resolve()), "generated_at": time.strftime("%Y-%m-%d %H:%M"),
        "dataset": info.get("source_path"), "labels": labels, "head": info["head_labels"], "tail": tail,
        "multi_label": bool(info["multi_label"]), "counts_before": before, "added": added, "per_page": per_page,
        "settings": settings, "hashes": {"vae": enc["vae"].get("weights_sha256"), "vae_name": enc["vae"].get("name"),
                                         "model": ls.record.get("model_sha256") or ls.record.get("refiner_sha256")},
        "evaluation": evaluation, "items": items, "kind": ls.kind,
    }
    write_text_atomic(folder / "data.js", "window.TAILFUSE_DATA = " + json.dumps(data, default=str) + ";\n")
    for f in STATIC:
        write_text_atomic(folder / f, (resources.files("tailfuse.report") / f).read_text())
    log.info(f"report of '{name}' ({len(items)} images) written to {folder / 'index.html'} in {time.time() - t0:.0f} s")
    return {"index": str(folder / "index.html"), "n_items": len(items), "set_id": sid}


def _source_thumbnails(store: RunStore, info: dict, table: pd.DataFrame, samples: pd.DataFrame, thumbs: Path,
                       fused: bool, progress: bool) -> None:
    """thumbs/src/<sample_id>.png of every tail and head source (fused sets), at the run's size; kept when there."""
    size = int(info.get("image_size") or 128)
    resize = (store.config().get("data") or {}).get("resize", "center-crop")
    src_ids = sorted(set(table["tail_sample_id"].astype(int)) | set(table["head_sample_id"].astype(int))) if fused else []
    from ..images import load_image

    for i in tqdm(src_ids, desc="report: source images", disable=not progress, file=sys.stderr, leave=False):
        p = thumbs / "src" / f"{i}.png"
        if not p.is_file():
            a = load_image(samples.loc[i, "abs_path"], size, resize)
            _png((a.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), p)


def _map_thumbnails(store: RunStore, sal: Path, table: pd.DataFrame, labels: list[str], thumbs: Path) -> dict:
    """thumbs/maps/<row_id>.png of the maps the gallery shows; returns (sample_id, role, target) -> map row."""
    from ..fusion.stage import saliency_maps

    map_row = {}
    maps_csv, maps, _ = saliency_maps(store, sal.name)
    for r in maps_csv.itertuples():
        map_row[(int(r.sample_id), r.role, int(r.target))] = int(r.row_id)
    need = set()
    for r in table.itertuples():
        need.add(map_row.get((int(r.tail_sample_id), "tail", labels.index(r.tail_label))))
        hm = [v for (s, role, _), v in map_row.items() if s == int(r.head_sample_id) and role == "head"]
        need.update(hm[:1])
    need.discard(None)
    todo = [i for i in sorted(need) if not (thumbs / "maps" / f"{i}.png").is_file()]
    for a in range(0, len(todo), 256):
        part = todo[a : a + 256]
        for rid, m in zip(part, maps.get(part)):
            _png(_colour(m.numpy()), thumbs / "maps" / f"{rid}.png")
    return map_row


def _mask_thumbnails(ls: LatentSet, table: pd.DataFrame, thumbs: Path) -> None:
    """thumbs/masks/<synth_id>.png: each image's fusion mask (white: taken from the tail image)."""
    shards = ls.shards
    todo = [int(i) for i in table["synth_id"] if not (thumbs / "masks" / f"{int(i)}.png").is_file()]
    for a in range(0, len(todo), 512):
        part = todo[a : a + 512]
        for i, m in zip(part, shards.get(part, key="mask")):
            _png((m.numpy().astype(np.uint8) * 255), thumbs / "masks" / f"{i}.png")


def _overview(store: RunStore, name: str, info: dict, labels: list[str], tail: list[str],
              folder: Path) -> tuple[dict, dict, dict | None]:
    """The counts plot and the evaluation's tables and plots: (train counts before, added, evaluation or None)."""
    (folder / "overview").mkdir(exist_ok=True)
    man = pd.read_csv(store.root / name / "manifest.csv")
    before = {lab: int(info["counts"][lab]["train"]) for lab in labels}
    added = {lab: int(pd.to_numeric(man[lab]).sum()) for lab in labels if lab in man.columns}
    _counts_plot(labels, tail, before, added, folder / "overview" / "counts.png")
    evaluation = None
    res = store.root / "eval" / "results.md"
    if res.is_file():
        plots = []
        for p in sorted((store.root / "eval").glob("*.png")):
            shutil.copy(p, folder / "overview" / p.name)
            plots.append(f"overview/{p.name}")
        evaluation = {"html": _md_tables(res.read_text()), "plots": plots}
    return before, added, evaluation


def _gallery_items(table: pd.DataFrame, sc: pd.DataFrame, samples: pd.DataFrame, labels: list[str], map_row: dict,
                   fused: bool, masks_ok: bool, decisions: pd.DataFrame) -> list[dict]:
    """One entry per image for the page: scores, sources, maps, mask, refinement and any imported decision."""
    head_map = {}
    for (s, role, _), v in map_row.items():
        if role == "head":
            head_map.setdefault(s, v)
    dmap = {int(r.synth_id): r for r in decisions.itertuples()}
    items = []
    for r in table.itertuples():
        i = int(r.synth_id)
        s = sc.loc[i]
        item = {"id": i, "tail_label": r.tail_label, "labels": list(r.labels) if isinstance(r.labels, list) else [],
                "img": f"../{r.path}", "tail_prob": round(float(s["tail_prob"]), 4),
                "nn_distance": round(float(s["nn_distance"]), 3), "nn_ratio": round(float(s["nn_ratio"]), 3),
                "near_copy": bool(s["near_copy"])}
        if fused:
            t, h = int(r.tail_sample_id), int(r.head_sample_id)
            tm = map_row.get((t, "tail", labels.index(r.tail_label)))
            item.update(tail={"id": t, "img": f"thumbs/src/{t}.png", "path": str(samples.loc[t, "path"]),
                              "map": f"thumbs/maps/{tm}.png" if tm is not None else None},
                        head={"id": h, "img": f"thumbs/src/{h}.png", "path": str(samples.loc[h, "path"]),
                              "map": f"thumbs/maps/{head_map[h]}.png" if h in head_map else None},
                        mask=f"thumbs/masks/{i}.png" if masks_ok else None,
                        tail_share=round(float(getattr(r, "tail_share", float("nan"))), 3))
        for k in ("refine_d", "refine_n", "guidance"):
            if hasattr(r, k):
                item.setdefault("refine", {})[k] = getattr(r, k)
        if i in dmap:
            d = dmap[i]
            item["imported"] = {"decision": d.decision, "reviewer": str(d.reviewer), "decided_at": str(d.decided_at)}
        items.append(item)
    return items


def _counts_plot(labels, tail, before, added, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 3.6))
    ax.bar(x - 0.2, [before[lab] for lab in labels], 0.4, label="real training images")
    ax.bar(x + 0.2, [before[lab] + added.get(lab, 0) for lab in labels], 0.4, label="with the synthetic set")
    ax.set_xticks(x, [f"{lab}\n(tail)" if lab in tail else lab for lab in labels], rotation=0 if len(labels) < 9 else 60,
                  fontsize=8)
    ax.set_ylabel("training positives")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
