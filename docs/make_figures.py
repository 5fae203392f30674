"""The figures of the documentation, drawn from a finished run folder with tailfuse's own functions.

The committed figures in docs/img/ were made by:

    python docs/make_figures.py /work/runs/isic docs/img --set eval/tailfuse--soft_labels-False

(/work/runs/isic: ISIC2018-LT, 1,510 dermoscopy images at 128 px, TAESD, the default `train` settings; the set is
the hard-label fused set that `tailfuse evaluate --arms ...,tailfuse[soft_labels=false]` made in that run.)

RUN is a run folder with a finished encode, train and fuse + decode of the set ``--set`` (default ``synthetic``).
The VAE is the one the run was encoded with (``--vae`` overrides it); it decodes a handful of latents. Nothing in the
run folder is written. Examples are chosen by rule, not by eye: the first fused image of each tail label (in
synth_id order); encode.png and code.png show the tail and head sources of the first of them, neighbours.png and
decode.png the first two.

Writes to OUT:
  encode.png        images, their 4 latent channels, and the VAE round trip
  code.png          the sparse code: symbol per latent position, and what the code alone decodes to
  train.png         per-generation metrics of iterated learning (train/metrics.jsonl)
  neighbours.png    a tail image's saliency map and its nearest head images by saliency-map distance
  fusion.png        tail source, head source, both saliency maps, the fusion mask and the fused image
  decode.png        the fused latent decoded alone, with pixel detail, and the pixel-space composite control
  counts.png        training images per class before and after adding the set

The PNGs are written with a 128-colour palette to keep the repository small.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tailfuse.codec import VAECodec  # noqa: E402
from tailfuse.decode import pixel_composite  # noqa: E402
from tailfuse.fusion.stage import _normalise, saliency_maps  # noqa: E402
from tailfuse.images import load_image  # noqa: E402
from tailfuse.latentset import LatentSet  # noqa: E402
from tailfuse.report import _colour, _counts_plot  # noqa: E402
from tailfuse.roundtrip import read_png01, roundtrip_path  # noqa: E402
from tailfuse.sparse.nets import SparseModel  # noqa: E402
from tailfuse.store import RunStore  # noqa: E402

ATTRIBUTION = "ISIC 2018 images (CC BY-NC 4.0)"


class Run:
    """What the figures read from a run folder and a fused set."""

    def __init__(self, root: str, name: str, vae: str | None):
        self.store = RunStore(root)
        self.info = self.store.labels()
        self.labels, self.tail = self.info["labels"], self.info["tail_labels"]
        self.size = int(self.info.get("image_size") or 128)
        self.resize = (self.store.config().get("data") or {}).get("resize", "center-crop")
        self.samples = self.store.samples().set_index("sample_id")
        self.set = LatentSet.open(self.store, name)
        self.table = self.set.table()
        self.fuse_cfg = self.store.config().get(f"fuse-{name}") or {}
        self.vae_name = vae or self.store.stage("encode")["vae"]["name"]
        self._codec = None
        tag = self.set.record.get("saliency")
        if tag is None:  # older records: the tag from the fuse settings, as the report finds it
            g = int(self.set.record.get("generation", 0))
            tag = f"{self.set.record.get('model', 'train')}-g{g:02d}-{self.fuse_cfg.get('cam', 'gradcam')}-" \
                  f"{self.fuse_cfg.get('cam_layer', 'full')}"
        self.maps_csv, self.maps, self.sal_folder = saliency_maps(self.store, tag)

    @property
    def codec(self) -> VAECodec:
        if self._codec is None:
            self._codec = VAECodec.load(self.vae_name)
        return self._codec

    def image(self, sample_id: int) -> np.ndarray:
        return _hwc(load_image(self.samples.loc[int(sample_id), "abs_path"], self.size, self.resize))

    def synthetic_image(self, synth_id: int) -> np.ndarray:
        man = self.table.set_index("synth_id")
        path = self.set.folder / "images" / f"{int(synth_id):06d}.png"
        if not path.is_file() and "path" in man.columns:
            path = self.set.folder / man.loc[int(synth_id), "path"]
        return _hwc(load_image(str(path), self.size, self.resize))

    def saliency(self, sample_id: int, role: str, target: int | None = None) -> np.ndarray:
        """The map fusion compared: smoothed and normalised as the set's fuse settings say (h x w, [0, 1])."""
        rows = self.maps_csv[(self.maps_csv["sample_id"] == int(sample_id)) & (self.maps_csv["role"] == role)]
        if target is not None:
            rows = rows[rows["target"] == int(target)]
        raw = self.maps.get([int(rows["row_id"].iloc[0])])
        m = _normalise(raw, self.fuse_cfg.get("saliency_norm", "rank"), float(self.fuse_cfg.get("saliency_smooth", 1.0)))
        return m[0].numpy()

    def examples(self, n: int) -> pd.DataFrame:
        """The first fused image of each tail label, in synth_id order (at most n)."""
        t = self.table.sort_values("synth_id")
        return t.groupby("tail_label", sort=False).head(1).head(n).reset_index(drop=True)


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).clamp(0, 1).numpy()


def _overlay(img: np.ndarray, m: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """A latent-grid map (h x w) over the image, each latent position a block of pixels (no smoothing added)."""
    k = img.shape[0] // m.shape[0]
    up = np.kron(m, np.ones((k, k)))
    return (1 - alpha) * img + alpha * (_colour(up) / 255.0)


def _grid(rows: list[list[tuple[str, np.ndarray]]], out: Path, caption: str, scale: float = 1.0) -> None:
    """Tiles at their own pixel size (128 px -> 1.28 in at 100 dpi), a title over each."""
    n_r, n_c = len(rows), max(len(r) for r in rows)
    w, h = 1.38 * scale, 1.62 * scale
    lines = textwrap.wrap(caption, width=int(w * n_c * 100 / 4.9))
    foot = 0.12 * len(lines) + 0.08
    fig, axes = plt.subplots(n_r, n_c, figsize=(w * n_c, h * n_r + foot), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_c):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                title, a = row[j]
                ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
                ax.set_title(title, fontsize=7.5)
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=6.5, color="#555555", va="bottom")
    fig.tight_layout(rect=(0, foot / (h * n_r + foot), 1, 1), pad=0.3, h_pad=0.4, w_pad=0.3)
    _save(fig, out)


def _save(fig, out: Path) -> None:
    fig.savefig(out, dpi=100)
    plt.close(fig)
    img = Image.open(out).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    img.save(out, optimize=True)
    print(f"{out} ({out.stat().st_size // 1024} KB)")


def fig_encode(r: Run, ex: pd.DataFrame, out: Path) -> None:
    rows = []
    ids = [int(ex["tail_sample_id"].iloc[0]), int(ex["head_sample_id"].iloc[0])]
    z = r.store.latents().get(ids)
    for sid, zi in zip(ids, z):
        lab = "|".join(x for x in r.labels if r.samples.loc[sid, x] == 1)
        row = [(f"image {sid} ({lab})", r.image(sid))]
        for c in range(zi.shape[0]):
            ch = zi[c].numpy()
            row.append((f"latent channel {c}", (ch - ch.min()) / max(1e-6, float(ch.max() - ch.min()))))
        rt = roundtrip_path(r.store, sid)
        rt_img = _hwc(read_png01(rt)) if rt.is_file() else _hwc(r.codec.decode(zi[None])[0])
        row.append(("VAE round trip", rt_img))
        rows.append(row)
    c, h, w = z.shape[1:]
    _grid(rows, out / "encode.png", f"{ATTRIBUTION}. encode: {r.size} px images -> {c} x {h} x {w} latents "
          f"({r.vae_name.rsplit('/', 1)[-1]}, posterior mean); the round trip is decode(encode(image)).")


def fig_code(r: Run, ex: pd.DataFrame, model: SparseModel, out: Path) -> None:
    ids = [int(ex["tail_sample_id"].iloc[0]), int(ex["head_sample_id"].iloc[0])]
    z = r.store.latents().get(ids)
    with torch.no_grad():
        sym = model.logits(z).argmax(1)
        alone = r.codec.decode(model.decode(model.hard_code(z)))
    palette = plt.get_cmap("tab20b")(np.arange(20))[:, :3]
    rng = np.random.default_rng(0)
    colours = np.concatenate([palette, rng.uniform(0.15, 0.95, size=(max(0, model.k - 20), 3))])[: model.k]
    rows = []
    for sid, s, a in zip(ids, sym, alone):
        s = s.numpy()
        used = len(np.unique(s))
        rows.append([(f"image {sid}", r.image(sid)), (f"symbols ({used} of {model.k} used)", colours[s]),
                     ("the code alone, decoded", _hwc(a))])
    _grid(rows, out / "code.png", f"{ATTRIBUTION}. train: one of K = {model.k} symbols per latent position "
          "(colours: symbols); the code alone loses fine texture, fusion adds each source's residual back.")


def fig_train(r: Run, out: Path) -> None:
    m = [json.loads(x) for x in (r.store.root / "train" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    g = [e["generation"] for e in m]
    fig, ax = plt.subplots(1, 2, figsize=(7.2, 2.4))
    ax[0].plot(g, [e["sparsity"] for e in m], "o-", label="sparsity of the code")
    ax[0].plot(g, [e["imitation_agreement"] if e["imitation_agreement"] is not None else np.nan for e in m], "s-",
               label="student agrees with teacher")
    ax[0].plot(g, [e["val_map"] for e in m], "^-", label="classifier C: val mAP")
    ax[0].set_ylim(0, 1)
    ax[1].plot(g, [e["recon_rel_l1"] for e in m], "o-", label="soft code")
    ax[1].plot(g, [e["recon_rel_l1_hard"] for e in m], "s-", label="one-hot code")
    ax[1].plot(g, [e["recon_rel_l1_mixed"] for e in m], "^-", label="spliced codes")
    ax[1].set_ylabel("L1 / L1 of the mean latent", fontsize=8)
    ax[1].set_ylim(0, 1)
    for a, t in zip(ax, ("code and classifier (val)", "reconstruction (val)")):
        a.set_xlabel("generation", fontsize=8)
        a.set_xticks(g)
        a.set_title(t, fontsize=9)
        a.legend(fontsize=7)
        a.tick_params(labelsize=7)
    fig.tight_layout()
    _save(fig, out / "train.png")


def fig_neighbours(r: Run, ex: pd.DataFrame, out: Path) -> None:
    nb = pd.read_csv(r.sal_folder / f"neighbours-{_neighbours_tag(r)}.csv")
    rows = []
    for e in ex.head(2).itertuples():
        t, lab = int(e.tail_sample_id), e.tail_label
        timg = r.image(t)
        row = [(f"tail image {t} ({lab})", timg),
               ("its saliency map", _overlay(timg, r.saliency(t, "tail", r.labels.index(lab))))]
        for n in nb[(nb["tail_sample_id"] == t) & (nb["tail_label"] == lab)].sort_values("rank").itertuples():
            h = int(n.head_sample_id)
            himg = r.image(h)
            row.append((f"head #{int(n.rank) + 1}, d = {n.distance:.2f}", _overlay(himg, r.saliency(h, "head"))))
        rows.append(row)
    _grid(rows, out / "neighbours.png", f"{ATTRIBUTION}. Grad-CAM maps of the sparse classifier (smoothed, "
          "rank-normalised; yellow = salient) and the nearest head images by distance between maps.")


def _neighbours_tag(r: Run) -> str:
    files = sorted(r.sal_folder.glob("neighbours-*.csv"))
    want = f"k{int(r.fuse_cfg.get('neighbours', 3))}"
    pick = [f for f in files if f.stem.endswith(want)] or files
    return pick[0].stem[len("neighbours-"):]


def fig_fusion(r: Run, ex: pd.DataFrame, out: Path) -> None:
    masks = r.set.shards.get([int(i) for i in ex["synth_id"]], key="mask")
    rows = []
    for e, mask in zip(ex.itertuples(), masks):
        t, h, lab = int(e.tail_sample_id), int(e.head_sample_id), e.tail_label
        timg, himg = r.image(t), r.image(h)
        k = r.size // mask.shape[-1]
        rows.append([(f"tail source ({lab})", timg), ("head source", himg),
                     ("tail saliency", _overlay(timg, r.saliency(t, "tail", r.labels.index(lab)))),
                     ("head saliency", _overlay(himg, r.saliency(h, "head"))),
                     (f"mask: {e.tail_share:.0%} from tail", np.kron(mask.float().numpy(), np.ones((k, k)))),
                     (f"fused image ({lab})", r.synthetic_image(int(e.synth_id)))])
    _grid(rows, out / "fusion.png", f"{ATTRIBUTION}. fuse: the tail image's code where its map is high, the head "
          "image's where its map is low (white: from the tail), decoded; labels: the tail label.")


def fig_decode(r: Run, ex: pd.DataFrame, out: Path) -> None:
    ex = ex.head(2)
    ids = [int(i) for i in ex["synth_id"]]
    z = r.set.shards.get(ids)
    masks = r.set.shards.get(ids, key="mask")
    decoded = r.codec.decode(z)
    feather = float(r.fuse_cfg.get("feather", 1.0))
    rows = []
    for e, d, m in zip(ex.itertuples(), decoded, masks):
        xt = load_image(r.samples.loc[int(e.tail_sample_id), "abs_path"], r.size, r.resize)
        xh = load_image(r.samples.loc[int(e.head_sample_id), "abs_path"], r.size, r.resize)
        comp = pixel_composite(m[None], feather, xt[None], xh[None])[0]
        rows.append([(f"tail source ({e.tail_label})", _hwc(xt)), ("head source", _hwc(xh)),
                     ("fused latent, decoded", _hwc(d)), ("+ pixel detail (default)", r.synthetic_image(int(e.synth_id))),
                     ("pixel composite (control)", _hwc(comp))])
    _grid(rows, out / "decode.png", f"{ATTRIBUTION}. decode: pixel detail adds each source's codec error back "
          "where the mask takes that source; the composite pastes pixels with the same mask (no decoder).")


def fig_counts(r: Run, out: Path) -> None:
    man = pd.read_csv(r.set.folder / "manifest.csv")
    before = {lab: int(r.info["counts"][lab]["train"]) for lab in r.labels}
    added = {lab: int(pd.to_numeric(man[lab]).sum()) for lab in r.labels if lab in man.columns}
    _counts_plot(r.labels, r.tail, before, added, out / "counts.png")
    _save_existing(out / "counts.png")


def _save_existing(path: Path) -> None:
    img = Image.open(path).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    img.save(path, optimize=True)
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished run folder")
    ap.add_argument("out", help="folder for the PNGs (docs/img)")
    ap.add_argument("--set", default="synthetic", help="the fused and decoded set to draw (default synthetic)")
    ap.add_argument("--vae", help="the VAE (default: the one the run was encoded with)")
    ap.add_argument("--examples", type=int, default=3, help="fused images shown in fusion.png (default 3)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = Run(args.run, args.set, args.vae)
    ex = r.examples(args.examples)
    model = SparseModel.from_run(r.store, str(r.set.record.get("model", "train")), r.set.record.get("generation"))
    fig_encode(r, ex, out)
    fig_code(r, ex, model, out)
    fig_train(r, out)
    fig_neighbours(r, ex, out)
    fig_fusion(r, ex, out)
    fig_decode(r, ex, out)
    fig_counts(r, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
