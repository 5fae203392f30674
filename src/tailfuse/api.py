"""The Python API: ``TailFuseSampler`` (imbalanced-learn's resampler contract), ``run`` and ``evaluate``.

``TailFuseSampler.fit_resample(X, y)`` returns the real rows followed by new ones made by tailfuse (encode, iterated
learning, saliency-guided fusion, decode), in the form X came in:

* image paths (a list of ``str`` / ``Path``)        -> the same list plus the paths of the new PNG files;
* PIL images (a list)                               -> the same list plus new PIL images;
* an image array, ``N x H x W x C`` uint8 or ``N x C x H x W`` float in [0, 1] -> the same layout, dtype and size;
* encoded latents (``input="latents"``, ``N x C x h x w``, numpy or torch) -> latents, nothing decoded;
* feature vectors (a 2-D numeric array or a list of lists, ``N x D``) -> vectors: each row is taken as a 1 x D grid
  of one channel, so saliency picks the class-specific features and fusion swaps feature values between a rare
  sample and a similar common one (no VAE involved).

``y`` is a label vector (multi-class; a one-hot matrix is read the same way and answered one-hot) or a 0/1 label
matrix with several labels per row (multi-label). ``sampling_strategy`` follows imbalanced-learn: on multi-class
targets ``'auto'`` (= 'not majority'), ``'minority'``, ``'not minority'``, ``'all'``, a float (binary targets), a dict
{class: count after resampling} or a callable; on multi-label targets ``'auto'`` is tailfuse's own rule (each tail
label up to the median head-label count, at most 5x its own; see ``tailfuse.budget``), or a dict / callable of
target counts. The classes to over-sample are the "tail" whose samples are made; the others are the head that
fusion takes context from.

The run folder (``run=``, default a new temporary folder) holds everything, like a command-line run: after
``fit_resample``, ``sampler.run_`` is its path, ``sampler.provenance_`` a table saying for every new row which real
rows it came from and how, and ``tailfuse report --run <run_>`` reviews the images. ``random_state=None`` behaves
as 0: the whole pipeline is seeded, so two calls give the same result.
"""

from __future__ import annotations

import logging
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from imblearn.base import BaseSampler

from .config import DecodeConfig, FuseConfig, TrainConfig, stable_hash
from .errors import TailfuseError
from .store import RunStore, save_tensors_atomic, write_csv_atomic, write_json_atomic

log = logging.getLogger("tailfuse")
INPUTS = ("auto", "paths", "pil", "images", "latents", "features")


def _is_pathlike(v) -> bool:
    return isinstance(v, (str, Path))


def _input_kind(X, declared: str) -> str:
    if declared != "auto":
        return declared
    if isinstance(X, pd.DataFrame):
        return "features"
    if isinstance(X, (list, tuple)):
        if not len(X):
            raise ValueError("X is empty.")
        first = X[0]
        if _is_pathlike(first):
            return "paths"
        try:
            from PIL import Image

            if isinstance(first, Image.Image):
                return "pil"
        except ImportError:  # pragma: no cover
            pass
        return "features"
    a = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    if a.dtype.kind in "US" or a.dtype == object:
        if a.ndim == 1 and len(a) and _is_pathlike(a.flat[0]):
            return "paths"
        raise ValueError("X holds strings that are not image paths; tailfuse works on images, latents or numbers.")
    if a.ndim == 2:
        return "features"
    if a.ndim == 4:
        return "images"
    raise ValueError(f"X of shape {a.shape}: give image paths, PIL images, an N x H x W x C / N x C x H x W image array, "
                     "N x C x h x w latents (input='latents') or an N x D feature matrix.")


def _targets(y) -> tuple[np.ndarray, list, bool, dict]:
    """(0/1 matrix N x L, class / label names, multi-label?, how y came in)."""
    from sklearn.utils.multiclass import check_classification_targets, type_of_target

    fmt = {"list": isinstance(y, list), "torch": isinstance(y, torch.Tensor)}
    if isinstance(y, pd.Series):
        fmt["series"] = y.name
    elif isinstance(y, pd.DataFrame):
        fmt["frame"] = list(y.columns)
    a = y.detach().cpu().numpy() if fmt["torch"] else np.asarray(y)
    fmt["dtype"] = a.dtype
    if a.ndim == 2 and a.shape[1] == 1:
        fmt["column"] = True
        a = a[:, 0]
    if a.ndim == 1:
        check_classification_targets(a)
        classes = list(np.unique(a))
        Y = (a[:, None] == np.asarray(classes)[None, :]).astype(np.int64)
        fmt["kind"] = "vector"
        return Y, classes, False, fmt
    kind = type_of_target(a)
    if kind != "multilabel-indicator":
        raise ValueError(f"y of type {kind}: give a label vector or a 0/1 label matrix.")
    Y = a.astype(np.int64)
    multi = bool((Y.sum(1) != 1).any())
    fmt["kind"] = "matrix"
    return Y, list(range(Y.shape[1])), multi, fmt


def _restore_targets(Y: np.ndarray, classes: list, fmt: dict):
    if fmt["kind"] == "vector":
        out = np.asarray(classes, dtype=object)[Y.argmax(1)].astype(fmt["dtype"])
        if fmt.get("column"):
            out = out[:, None]
    else:
        out = Y.astype(fmt["dtype"])
    if "series" in fmt:  # pandas in, pandas out (as imbalanced-learn's samplers do)
        return pd.Series(np.ravel(out), name=fmt["series"])
    if "frame" in fmt:
        return pd.DataFrame(out if out.ndim == 2 else out[:, None], columns=fmt["frame"])
    if fmt["torch"]:
        return torch.from_numpy(np.ascontiguousarray(out))
    return out.tolist() if fmt["list"] else out


class TailFuseSampler(BaseSampler):
    """Over-sample the rare classes with tailfuse's synthetic samples (see the module docstring).

    Parameters: ``sampling_strategy`` (imbalanced-learn's shapes); ``labels_policy`` ('union', 'kept', 'tail': the
    labels of a fused sample on multi-label targets); ``neighbours`` (head partners per tail sample);
    ``random_state``; ``vae`` (a VAE folder or hub id; default $TAILFUSE_VAE) and ``device``; ``run`` (the run
    folder used as cache; default a temporary folder); ``input`` ('auto' or one of paths, pil, images, latents,
    features); ``image_size`` (images are brought to it; arrays keep theirs); ``pixel_detail``; the training
    schedule ``generations``, ``epochs``, ``imitation_epochs``, ``k`` (symbols); ``progress`` (progress bars)."""

    _sampling_type = "over-sampling"
    _parameter_constraints: dict = {}

    def __init__(self, sampling_strategy="auto", *, labels_policy="union", neighbours=3, random_state=None, vae=None,
                 device="cpu", run=None, input="auto", image_size=128, pixel_detail=None, generations=4, epochs=12,
                 imitation_epochs=6, k=64, progress=False):
        self.sampling_strategy = sampling_strategy
        self.labels_policy = labels_policy
        self.neighbours = neighbours
        self.random_state = random_state
        self.vae = vae
        self.device = device
        self.run = run
        self.input = input
        self.image_size = image_size
        self.pixel_detail = pixel_detail
        self.generations = generations
        self.epochs = epochs
        self.imitation_epochs = imitation_epochs
        self.k = k
        self.progress = progress

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # images and latents are dense
        return tags

    def _fit_resample(self, X, y):  # pragma: no cover - fit_resample is overridden whole
        raise NotImplementedError

    # --- validation, before any work
    def _check_params(self) -> None:
        if self.input not in INPUTS:
            raise ValueError(f"input={self.input!r}: choose from {', '.join(INPUTS)}.")
        if self.labels_policy not in ("union", "kept", "tail"):
            raise ValueError(f"labels_policy={self.labels_policy!r}: choose union, kept or tail.")
        for name in ("neighbours", "generations", "epochs", "k"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < (2 if name == "k" else 1):
                raise ValueError(f"{name}={v!r}: give a whole number >= {2 if name == 'k' else 1}.")
        if not isinstance(self.imitation_epochs, (int, np.integer)) or self.imitation_epochs < 1:
            raise ValueError(f"imitation_epochs={self.imitation_epochs!r}: give a whole number >= 1.")
        if not isinstance(self.image_size, (int, np.integer)) or self.image_size < 8 or self.image_size % 8:
            raise ValueError(f"image_size={self.image_size!r}: give a positive multiple of 8.")
        if self.random_state is not None and not isinstance(self.random_state, (int, np.integer)):
            raise ValueError("random_state must be an int or None (the pipeline takes one seed).")
        s = self.sampling_strategy
        if not (isinstance(s, (str, dict, float, int)) or callable(s)) or isinstance(s, bool):
            raise ValueError(f"sampling_strategy={s!r}: give a str, float, dict or callable.")

    def fit_resample(self, X, y, **params):
        """The real rows followed by the new ones, in the form ``X`` came in, and their targets.

        Args:
            X: image paths, PIL images, an image array, latents (``input="latents"``) or feature vectors.
            y: a label vector (multi-class) or a 0/1 label matrix (multi-label).

        Returns:
            ``(X_resampled, y_resampled)``. Sets ``sampling_strategy_``, ``provenance_`` and, when new samples were
            made, ``run_``.
        """
        self._check_params()
        kind = _input_kind(X, self.input)
        Y, classes, multi, yfmt = _targets(y)
        n = len(Y)
        if kind != "paths" and kind != "pil" and len(X) != n:
            raise ValueError(f"X has {len(X)} rows and y {n}.")
        if (Y.sum(0) > 0).sum() < 2:
            raise ValueError("tailfuse needs at least two classes present in y: it makes samples of the rare classes "
                             "from common ones.")
        counts = {c: int(v) for c, v in zip(classes, Y.sum(0))}
        if not multi:
            from imblearn.utils import check_sampling_strategy

            ylab = np.asarray(classes, dtype=object)[Y.argmax(1)]
            strat = check_sampling_strategy(self.sampling_strategy, ylab, "over-sampling")
            self.sampling_strategy_ = OrderedDict((c, int(strat.get(c, 0))) for c in classes if strat.get(c, 0) > 0)
        else:
            from .budget import budget
            from .data import Dataset, partition
            from .config import DataConfig

            names = [str(c) for c in classes]
            table = pd.DataFrame(Y, columns=names).assign(split="train")
            head, tail = partition(Dataset(table, names, True, "api", "", [], "path"), DataConfig())
            b = budget({nm: counts[c] for nm, c in zip(names, classes)}, head, tail, self.sampling_strategy)
            self.sampling_strategy_ = OrderedDict((classes[names.index(k)], v) for k, v in b["per_label"].items() if v > 0)
        if kind == "features":  # n_features_in_ and, for a DataFrame, feature_names_in_ (get_feature_names_out)
            from sklearn.utils.validation import validate_data

            validate_data(self, X, reset=True, skip_check_array=True)
        if not self.sampling_strategy_:
            self.provenance_ = pd.DataFrame()
            return X, y
        run = Path(self.run) if self.run is not None else Path(tempfile.mkdtemp(prefix="tailfuse-"))
        self.run_ = str(run)
        names = [str(c) for c in classes]
        tail = [str(c) for c in self.sampling_strategy_]
        head = [nm for nm in names if nm not in tail]
        seed = int(self.random_state or 0)
        shape_info = self._build_run(run, X, kind, Y, names, head, tail, multi)
        from .fusion.stage import run_fuse
        from .train import run_train

        run_train(str(run), TrainConfig(generations=self.generations, epochs=self.epochs,
                                        imitation_epochs=self.imitation_epochs, k=self.k, seed=seed), progress=self.progress)
        totals = {str(c): counts[c] + int(v) for c, v in self.sampling_strategy_.items()}
        fcfg = FuseConfig(sampling_strategy=totals, labels_policy=self.labels_policy, neighbours=self.neighbours,
                          seed=seed, device=self.device)
        run_fuse(str(run), fcfg, progress=self.progress)
        prov = pd.read_csv(run / "synthetic" / "samples.csv")
        Y_new = prov[names].to_numpy(dtype=np.int64)
        X_new = self._new_rows(run, kind, X, prov, shape_info)
        self.provenance_ = prov
        if kind != "features":
            self.n_features_in_ = 1  # one image (or latent) per row
        return self._join(X, X_new, kind, shape_info), _restore_targets(np.concatenate([Y, Y_new]), classes, yfmt)

    # --- the run folder
    def _build_run(self, run: Path, X, kind: str, Y: np.ndarray, names, head, tail, multi) -> dict:
        info = {}
        if kind in ("paths", "pil", "images"):
            paths = self._image_files(run, X, kind, info)
            manifest = pd.DataFrame({"path": paths, "split": "train"})
            for j, nm in enumerate(names):
                manifest[nm] = Y[:, j]
            csv = run / "input" / "manifest.csv"
            write_csv_atomic(csv, manifest)
            from .codec import resolve_vae_name
            from .config import DataConfig, EncodeConfig, VAEConfig
            from .encode import run_encode

            size = info.get("size", self.image_size)
            # every row given is a training row: no val split carved out
            run_encode(DataConfig(data=str(csv), labels=names, tail_labels=tail, image_size=size, strict=True,
                                  val_fraction=0.0),
                       VAEConfig(vae=resolve_vae_name(self.vae), device=self.device), EncodeConfig(), str(run),
                       progress=self.progress)
            return info
        if kind == "latents":
            z = X.detach().cpu().float() if isinstance(X, torch.Tensor) else torch.from_numpy(np.asarray(X, dtype=np.float32))
            info.update(dtype=X.dtype, torch=isinstance(X, torch.Tensor))
            if z.ndim != 4:
                raise ValueError(f"latents must be N x C x h x w, not {tuple(z.shape)}.")
        else:
            a = np.asarray(X)
            if a.ndim != 2 or a.dtype.kind not in "fiub":
                raise ValueError("feature vectors must form an N x D numeric matrix.")
            if not np.isfinite(a.astype(np.float64)).all():
                raise ValueError("X holds NaN or infinite values.")
            info.update(dtype=a.dtype, list=isinstance(X, list), n_features=a.shape[1],
                        frame=X if isinstance(X, pd.DataFrame) else None)
            z = torch.from_numpy(a.astype(np.float32))[:, None, None, :]  # one channel, a 1 x D grid
        write_latent_run(run, z, Y, names, head, tail, multi)
        return info

    def _image_files(self, run: Path, X, kind: str, info: dict) -> list[str]:
        if kind == "paths":
            info["list"] = isinstance(X, list)
            return [str(Path(p).resolve()) for p in X]
        from .images import save_png

        folder = run / "input" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        if kind == "pil":
            imgs = [np.asarray(im.convert("RGB")) for im in X]
            info["size"] = self.image_size
        else:
            a = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
            info.update(dtype=a.dtype, torch=isinstance(X, torch.Tensor))
            if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
                info["layout"] = "NHWC"
                a = a.transpose(0, 3, 1, 2)
            else:
                info["layout"] = "NCHW"
            if a.shape[2] != a.shape[3] or a.shape[2] % 8:
                raise ValueError(f"image arrays must be square with a side that is a multiple of 8, not {a.shape[2:]}.")
            info["size"] = int(a.shape[2])
            info["channels"] = int(a.shape[1])
            scale = 255.0 if a.dtype.kind in "ui" else 1.0
            imgs = [np.repeat(x, 3, 0) if x.shape[0] == 1 else x[:3] for x in a.astype(np.float32) / scale]
            imgs = [(np.clip(x, 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8) for x in imgs]
        for i, im in enumerate(imgs):
            p = folder / f"{i:06d}.png"
            save_png(torch.from_numpy(im.astype(np.float32) / 255.0).permute(2, 0, 1), str(p))
            out.append(str(p))
        return out

    def _new_rows(self, run: Path, kind: str, X, prov: pd.DataFrame, info: dict):
        from .latentset import LatentSet

        if kind in ("latents", "features"):
            _, z = LatentSet.open(RunStore(run), "synthetic").shards.load_all()
            return z
        from .decode import run_decode

        run_decode(str(run), DecodeConfig(pixel_detail=self.pixel_detail, device=self.device), progress=self.progress)
        return [str(run / "synthetic" / f"images/{int(i):06d}.png") for i in prov["synth_id"]]

    def _join(self, X, new, kind: str, info: dict):
        if kind == "paths":
            out = list(X) + new
            return out if info.get("list", True) else np.asarray(out, dtype=object)
        if kind == "pil":
            from PIL import Image

            return list(X) + [Image.open(p).convert("RGB") for p in new]
        if kind == "images":
            from PIL import Image

            a = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in new]).astype(np.float32) / 255.0
            if info["channels"] == 1:
                a = a.mean(-1, keepdims=True)
            a = a if info["layout"] == "NHWC" else a.transpose(0, 3, 1, 2)
            dtype = info["dtype"]
            a = (a * 255 + 0.5).astype(dtype) if np.dtype(dtype).kind in "ui" else a.astype(dtype)
            base = X.detach().cpu().numpy() if info.get("torch") else np.asarray(X)
            out = np.concatenate([base, a])
            return torch.from_numpy(out) if info.get("torch") else out
        if kind == "latents":
            base = X if info.get("torch") else torch.from_numpy(np.asarray(X))
            out = torch.cat([base.float(), new.float()]).to(base.dtype)
            return out if info.get("torch") else out.numpy()
        out = np.concatenate([np.asarray(X), new[:, 0, 0, :].numpy().astype(np.asarray(X).dtype)])
        if info.get("frame") is not None:  # a DataFrame comes back as one, its columns and dtypes kept
            f = info["frame"]
            extra = pd.DataFrame(out[len(f):], columns=f.columns).astype(f.dtypes.to_dict())
            return pd.concat([f, extra], ignore_index=True)
        return out.tolist() if info.get("list") else out.astype(info["dtype"])


def write_latent_run(run: Path, z: torch.Tensor, Y: np.ndarray, labels: list[str], head: list[str], tail: list[str],
                     multi: bool, shard: int = 512) -> RunStore:
    """A run folder holding given latents (every row a training sample), as encode would have written it."""
    store = RunStore(run)
    store.create()
    n = len(z)
    files, shards = [], {}
    for si in range(0, n, shard):
        f = f"latents/{si // shard:05d}.safetensors"
        save_tensors_atomic(run / f, {"latents": z[si : si + shard].float().contiguous(),
                                      "sample_id": torch.arange(si, min(n, si + shard), dtype=torch.int64)})
        files.append(f)
        shards[str(si // shard)] = {"file": f, "n": min(shard, n - si), "n_rows": min(shard, n - si), "skipped": [],
                                    "sha256": None}
    table = pd.DataFrame({"sample_id": np.arange(n), "line": np.arange(n) + 2, "path": [f"row-{i}" for i in range(n)],
                          "abs_path": [f"row-{i}" for i in range(n)]})
    for j, lab in enumerate(labels):
        table[lab] = Y[:, j]
    table["split"], table["split_source"] = "train", "api"
    table["shard"], table["offset"] = np.arange(n) // shard, np.arange(n) % shard
    write_csv_atomic(store.samples_csv, table)
    write_json_atomic(store.labels_json, {
        "labels": labels, "head_labels": head, "tail_labels": tail, "tail_rule": "sampling_strategy",
        "multi_label": multi, "counts": {lab: {"train": int(Y[:, j].sum()), "val": 0, "test": 0, "total": int(Y[:, j].sum())}
                                         for j, lab in enumerate(labels)},
        "source": "api", "source_path": None, "path_column": "path", "metadata_columns": [],
        "image_size": None, "latent_shape": list(z.shape[1:])})
    h = stable_hash({"latents": stable_hash(z.numpy().round(6).tolist()), "y": Y.tolist()})
    store.write_stage("encode", {"stage": "encode", "status": "done", "config_hash": h, "inputs_hash": h,
                                 "vae": {"name": None, "weights_sha256": None}, "n_encoded": n, "n_samples": n,
                                 "shards": shards, "latent_shape": list(z.shape[1:])})
    return store


@dataclass
class RunResult:
    """What `tailfuse run` made: where the synthetic images, their manifest and provenance are."""

    run: Path
    set: str
    images: Path
    manifest: Path
    provenance: Path
    n_images: int
    records: dict = field(repr=False, default_factory=dict)

    def table(self) -> pd.DataFrame:
        return pd.read_csv(self.manifest)


def run(data: str, run: str, *, config: str | None = None, progress: bool = True, **settings) -> RunResult:
    """`tailfuse run` as a function: the same names as its flags (``vae=``, ``per_class=``, ``tail_labels=[...]``,
    ``refine='5/50'``, ``pixel_detail=True``, any setting of the YAML sections), returning a RunResult."""
    from .cli import validate_sections
    from .config import load_yaml, resolve
    from .pipeline import run_all

    doc = load_yaml(config) if config else None
    vals = {"data": data, **{k: v for k, v in settings.items() if v is not None}}
    sections = {s: resolve(s, doc, vals) for s in ("data", "vae", "encode", "train", "fuse", "decode")}
    refine = resolve("refine", doc, {k: v for k, v in vals.items() if k in ("refine", "guidance", "device")}) \
        if vals.get("refine") else None
    known = set().union(*[set(vars(c)) for c in sections.values()], {"refine", "guidance"})
    unknown = sorted(set(vals) - known)
    if unknown:
        raise TailfuseError(f"unknown setting(s) {', '.join(unknown)} for tailfuse.run.")
    validate_sections({**sections, "refine": refine})
    out = run_all(run, **sections, refine=refine, progress=progress)
    folder = Path(run) / out["set"]
    return RunResult(Path(run), out["set"], folder / "images", folder / "manifest.csv", folder / "provenance.jsonl",
                     int(out["decode"]["n_images"]), out)


@dataclass
class EvaluationResult:
    """What `tailfuse evaluate` measured: the results (results.json's content) and where they are."""

    output: Path
    results: dict = field(repr=False)

    def table(self) -> pd.DataFrame:
        """One row per arm: mAP all / head / tail, and the tail-mAP difference to each control with its interval."""
        rows = []
        for arm, e in self.results["arms"].items():
            row = {"arm": arm, "map_all": e["map_all"], "map_head": e["map_head"], "map_tail": e["map_tail"]}
            for c, d in (e.get("delta_map_tail") or {}).items():
                row[f"delta_tail_vs_{c}"] = d["mean"]
                row[f"delta_tail_vs_{c}_ci95"] = tuple(d["ci95"])
            rows.append(row)
        return pd.DataFrame(rows).set_index("arm")


def evaluate(run: str, *, config: str | None = None, force: bool = False, progress: bool = True,
             **settings) -> EvaluationResult:
    """`tailfuse evaluate` as a function (``arms=[...]``, ``seeds=[...]``, ``folds=5``, ``budgets=[...]``, ...)."""
    from .config import load_yaml, resolve
    from .evaluation.harness import run_evaluate

    doc = load_yaml(config) if config else None
    cfg = resolve("evaluate", doc, settings)
    unknown = sorted(set(settings) - set(vars(cfg)))
    if unknown:
        raise TailfuseError(f"unknown setting(s) {', '.join(unknown)} for tailfuse.evaluation.")
    res = run_evaluate(run, cfg, force=force, progress=progress)
    return EvaluationResult(Path(res["output"]), res)
