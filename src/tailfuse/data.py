"""Inputs: a CSV manifest (CXR-LT layout) or an image folder with one sub-folder per class.

Rules (documented in the README):

* CSV manifest: a path column (default ``path``; relative to the CSV's folder, or absolute), one 0/1 column per
  label, an optional ``split`` column (``train`` / ``val`` / ``test``) and any other columns, kept as metadata.
  Label columns are the ones named with ``--labels``, or else every column whose values are all 0 or 1. A column
  that is mostly 0/1 but holds other values (2, -1, blanks) is an error, not silently metadata.
* Or one column of class names (``--label-column diagnosis``: ``MEL``, ``NV``, ...; several labels as ``A|B``),
  which becomes one 0/1 label per class name (sorted) and stays in the table as metadata. With no 0/1 columns and
  no ``--labels``, a single text column with few distinct values is taken as that column (and said so).
* A dataset where every row carries exactly one label is multi-class; otherwise multi-label.
* No ``split`` column: a seeded split stratified by each sample's rarest label (and grouped by the group column,
  ``patient_id`` when present) into train/val/test 70/10/20. A ``split`` without ``val``: 10 % of train is carved
  into val the same way (test is never touched). The split used is recorded in the run's ``samples.csv``.
* Head/tail: ``--tail-labels`` explicitly, or automatically: labels sorted by training count; the head is the
  smallest set of most frequent labels that together hold at least ``head_share`` (0.75) of the training
  positives; every other label is tail.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .config import DataConfig
from .errors import TailfuseError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
SPLITS = ("train", "val", "test")
RESERVED = ("sample_id", "line", "abs_path", "split_source", "shard", "offset")
LABEL_SEPARATOR = "|"  # several class names in one cell of a label column
MAX_CLASSES = 100  # a detected label column has at most this many distinct class names
log = logging.getLogger("tailfuse")


@dataclass
class Dataset:
    table: pd.DataFrame  # sample_id, line, path, abs_path, split, split_source, <labels>, <metadata>
    labels: list[str]
    multi_label: bool
    source: str  # "csv" | "folder"
    source_path: str
    metadata_columns: list[str] = field(default_factory=list)
    path_column: str = "path"
    notes: list[str] = field(default_factory=list)
    label_column: str | None = None  # the input's one column of class names, when it had one

    def locations(self) -> "InputLocations":
        """What of the input a run must never write into: the manifest, and every folder holding an input image
        (a folder input's root)."""
        if self.source == "folder":
            return InputLocations(files=[], folders=[Path(self.source_path)])
        return InputLocations(files=[Path(self.source_path)], folders=_image_folders(self.table["abs_path"]))

    def label_matrix(self) -> np.ndarray:
        return self.table[self.labels].to_numpy(dtype=np.int64)

    def counts(self) -> pd.DataFrame:
        """Positives per label (rows) and split (columns), with a total."""
        out = pd.DataFrame(index=self.labels)
        for s in SPLITS:
            sub = self.table[self.table["split"] == s]
            out[s] = sub[self.labels].sum(axis=0).astype(int) if len(sub) else 0
        out["total"] = out[list(SPLITS)].sum(axis=1)
        return out


@dataclass
class InputLocations:
    """The parts of the input that tailfuse protects: files (the manifest) and folders (one that holds input images
    directly, or a folder input's root). A run folder may sit beside them, e.g. in the manifest's own folder."""

    files: list[Path]
    folders: list[Path]


def _image_folders(abs_paths) -> list[Path]:
    return [Path(d) for d in sorted({os.path.dirname(p) for p in abs_paths})]


def _absolute(paths, base: Path) -> list[str]:
    """Manifest paths made absolute: relative ones against the manifest's folder."""
    return [os.path.normpath(q if os.path.isabs(q) else os.path.join(base, q)) for q in paths]


def input_locations(cfg: DataConfig) -> InputLocations:
    """``Dataset.locations`` without loading the dataset: cheap enough to check a run folder before anything is
    written (a manifest is read for its path column only; one that cannot be read gives its own error later)."""
    p = Path(cfg.data).expanduser()
    if p.is_dir():
        return InputLocations(files=[], folders=[p])
    try:
        raw = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True, sep=_delimiter(p))
        raw.columns = [c.strip() for c in raw.columns]
        paths = [q.strip() for q in raw[cfg.path_column] if q.strip()]
    except (OSError, KeyError, ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError):
        paths = []
    return InputLocations(files=[p], folders=_image_folders(_absolute(paths, p.resolve().parent)))


def _fmt_lines(lines: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(x) for x in lines[:limit])
    return shown + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


def load_dataset(cfg: DataConfig) -> Dataset:
    if not cfg.data:
        raise TailfuseError("no input given: pass --data <manifest.csv | image folder>.")
    p = Path(cfg.data).expanduser()
    if not p.exists():
        raise TailfuseError(f"input {p} does not exist: pass a CSV manifest or a folder with one sub-folder per class.")
    if p.is_dir():
        if (p / "manifest.csv").is_file() and not _class_subfolders(p):
            raise TailfuseError(
                f"{p} is a folder holding manifest.csv but no class sub-folders: pass --data {p / 'manifest.csv'}."
            )
        ds = load_folder(p, cfg)
    else:
        ds = load_manifest(p, cfg)
    _assign_splits(ds, cfg)
    return ds


def _class_subfolders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def load_folder(root: Path, cfg: DataConfig) -> Dataset:
    classes = _class_subfolders(root)
    if len(classes) < 2:
        raise TailfuseError(
            f"image folder {root} needs one sub-folder per class (at least 2); found {len(classes)}. "
            "Or pass a CSV manifest."
        )
    rows = []
    ignored = 0
    for c in classes:
        for f in sorted(c.rglob("*")):
            if f.name.startswith(".") or not f.is_file():
                continue
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            rows.append({"path": str(f.relative_to(root)), "abs_path": str(f.resolve()), "class": c.name})
    if not rows:
        raise TailfuseError(f"image folder {root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found.")
    labels = [c.name for c in classes]
    table = pd.DataFrame(rows)
    for lab in labels:
        table[lab] = (table["class"] == lab).astype(np.int64)
    table = table.drop(columns=["class"])
    empty = [lab for lab in labels if table[lab].sum() == 0]
    if empty:
        if not cfg.drop_empty_labels:
            raise TailfuseError(
                f"image folder {root}: class folder(s) {', '.join(empty)} hold no images. "
                "Remove the empty folders or pass --drop-empty-labels."
            )
        labels = [lab for lab in labels if lab not in empty]
        table = table.drop(columns=empty)
    table.insert(0, "line", np.arange(len(table)) + 1)
    table["split"] = None
    notes = [f"{ignored} non-image files ignored"] if ignored else []
    return Dataset(table, labels, False, "folder", str(root), [], "path", notes)


def _delimiter(csv: Path) -> str:
    """Comma, or the semicolon / tab of a header that holds no comma (spreadsheets in many locales write those)."""
    try:
        with open(csv, encoding="utf-8-sig", errors="replace") as f:
            head = f.readline()
    except OSError:
        return ","
    if "," not in head:
        for sep in (";", "\t"):
            if sep in head:
                return sep
    return ","


def load_manifest(csv: Path, cfg: DataConfig) -> Dataset:
    try:
        raw = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True, sep=_delimiter(csv))
    except pd.errors.EmptyDataError:
        raise TailfuseError(f"manifest {csv} is empty: it needs a header row and one row per image.") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        raise TailfuseError(f"manifest {csv} cannot be read as CSV: {e}") from None
    raw.columns = [c.strip() for c in raw.columns]
    if len(raw) == 0:
        raise TailfuseError(f"manifest {csv} has a header but no rows.")
    pc = cfg.path_column
    if pc not in raw.columns:
        raise TailfuseError(
            f"manifest {csv} has no path column '{pc}' (columns: {', '.join(raw.columns)}). "
            "Add a column 'path' with each image's path (relative to the CSV's folder, or absolute), "
            "or name yours with --path-column."
        )
    for r in RESERVED:
        if r in raw.columns:
            raise TailfuseError(f"manifest {csv}: column name '{r}' is reserved by tailfuse; rename it.")
    lines = np.arange(len(raw)) + 2  # header is line 1
    blank = raw[pc].str.strip() == ""
    if blank.any():
        raise TailfuseError(
            f"manifest {csv}: empty path in column '{pc}' at line(s) {_fmt_lines(list(lines[blank.to_numpy()]))}."
        )

    lc = cfg.label_column or (None if cfg.labels else _detect_label_column(raw, csv, cfg))
    if lc:
        raw, classes = _expand_label_column(raw, lc, csv, cfg)
        cfg = replace(cfg, labels=classes, metadata_columns=[*cfg.metadata_columns, lc])
    labels, metadata = _label_columns(raw, csv, cfg)
    table = pd.DataFrame({"line": lines, "path": raw[pc].str.strip()})
    base = csv.resolve().parent
    table["abs_path"] = _absolute(table["path"], base)
    dup = table["abs_path"].duplicated(keep=False).to_numpy()
    if dup.any():
        first = table[dup].groupby("abs_path")["line"].apply(list).head(5)
        detail = "; ".join(f"{Path(k).name} at lines {', '.join(map(str, v))}" for k, v in first.items())
        raise TailfuseError(
            f"manifest {csv}: {int(dup.sum())} rows share an image path ({detail}). "
            "Each image must appear once: merge the duplicate rows (one row may carry several labels)."
        )
    for lab in labels:
        table[lab] = raw[lab].astype(np.int64).to_numpy()
    if "split" in raw.columns:
        split = raw["split"].str.strip().str.lower()
        bad = ~split.isin(SPLITS)
        if bad.any():
            vals = sorted(set(raw["split"][bad]))[:5]
            raise TailfuseError(
                f"manifest {csv}: column 'split' holds {vals} at line(s) {_fmt_lines(list(lines[bad.to_numpy()]))}; "
                "allowed values are train, val, test. Fix those rows, or drop the column to let tailfuse split."
            )
        table["split"] = split.to_numpy()
    else:
        table["split"] = None
    for m in metadata:
        table[m] = raw[m].to_numpy()

    empty = [lab for lab in labels if table[lab].sum() == 0]
    if empty:
        if not cfg.drop_empty_labels:
            raise TailfuseError(
                f"manifest {csv}: label column(s) {', '.join(empty)} have no positive sample (all 0). "
                "A label needs at least one image: remove the column, list it with --metadata-columns, "
                "or pass --drop-empty-labels."
            )
        labels = [lab for lab in labels if lab not in empty]
        table = table.drop(columns=empty)
    ys = table[labels].to_numpy()
    multi = bool((ys.sum(axis=1) != 1).any())
    return Dataset(table, labels, multi, "csv", str(csv.resolve()), metadata, pc, [], lc)


def _is_binary(col: pd.Series) -> bool:
    return bool(col.str.strip().isin(["0", "1", "0.0", "1.0"]).all())


def _detect_label_column(raw: pd.DataFrame, csv: Path, cfg: DataConfig) -> str | None:
    """The one text column of class names, when the manifest has no 0/1 label column; None otherwise."""
    group = cfg.group_column or ("patient_id" if "patient_id" in raw.columns else None)
    fixed = {cfg.path_column, "split", group, *cfg.metadata_columns}
    free = [c for c in raw.columns if c not in fixed]
    if any(_is_binary(raw[c]) for c in free):
        return None  # the 0/1 layout
    candidates = []
    for c in free:
        v = raw[c].str.strip()
        numeric = pd.to_numeric(v, errors="coerce").notna().all()
        names = {n.strip() for cell in v.unique() for n in cell.split(LABEL_SEPARATOR)} - {""}
        if not numeric and 2 <= len(names) <= min(MAX_CLASSES, len(raw) // 2):  # ~2+ images per class
            candidates.append(c)
    if len(candidates) > 1:
        raise TailfuseError(
            f"manifest {csv} has no 0/1 label columns, and {len(candidates)} columns could hold class names "
            f"({', '.join(candidates)}): name the one with the labels with --label-column."
        )
    if candidates:
        log.info(f"labels: class names in column '{candidates[0]}' (--label-column {candidates[0]})")
        return candidates[0]
    return None


def _expand_label_column(raw: pd.DataFrame, col: str, csv: Path, cfg: DataConfig) -> tuple[pd.DataFrame, list[str]]:
    """One 0/1 column per class name of ``col`` (``A|B`` gives both); the class names, sorted."""
    if cfg.labels:
        raise TailfuseError("give --labels (0/1 columns) or --label-column (one column of class names), not both.")
    if col not in raw.columns:
        raise TailfuseError(f"manifest {csv}: --label-column '{col}' is not a column (columns: {', '.join(raw.columns)}).")
    if col in (cfg.path_column, "split"):
        raise TailfuseError(f"--label-column '{col}' is the {'path' if col == cfg.path_column else 'split'} column.")
    cells = [[n.strip() for n in cell.split(LABEL_SEPARATOR) if n.strip()] for cell in raw[col]]
    blank = np.array([not c for c in cells])
    if blank.any():
        lines = np.arange(len(raw)) + 2
        raise TailfuseError(
            f"manifest {csv}: label column '{col}' is empty at line(s) {_fmt_lines(list(lines[blank]))}. Every "
            f"image needs a class name (several as A{LABEL_SEPARATOR}B); give images with no finding a name of "
            "their own (e.g. 'normal')."
        )
    classes = sorted({n for c in cells for n in c})
    clash = [n for n in classes if n in raw.columns or n in RESERVED]
    if clash:
        raise TailfuseError(
            f"manifest {csv}: class name(s) {', '.join(clash)} in column '{col}' are also column names; rename "
            "those columns or classes."
        )
    onehot = pd.DataFrame({n: ["1" if n in c else "0" for c in cells] for n in classes}, index=raw.index)
    return pd.concat([raw, onehot], axis=1), classes


def _label_columns(raw: pd.DataFrame, csv: Path, cfg: DataConfig) -> tuple[list[str], list[str]]:
    """Decide label and metadata columns and validate label values (0/1 only)."""
    pc = cfg.path_column
    group = cfg.group_column or ("patient_id" if "patient_id" in raw.columns else None)
    fixed = {pc, "split"} | set(cfg.metadata_columns) | ({group} if group else set())
    for m in cfg.metadata_columns:
        if m not in raw.columns:
            raise TailfuseError(f"manifest {csv}: --metadata-columns names '{m}', which is not a column.")
    lines = np.arange(len(raw)) + 2

    def bad_values(col: str) -> np.ndarray:
        return (~raw[col].str.strip().isin(["0", "1", "0.0", "1.0"])).to_numpy()

    if cfg.labels:
        missing = [lab for lab in cfg.labels if lab not in raw.columns]
        if missing:
            raise TailfuseError(
                f"manifest {csv}: label column(s) {', '.join(missing)} not found (columns: {', '.join(raw.columns)})."
            )
        labels = list(dict.fromkeys(cfg.labels))
    else:
        labels = []
        for col in raw.columns:
            if col in fixed:
                continue
            bad = bad_values(col)
            if not bad.any():
                labels.append(col)
            elif bad.mean() <= 0.1:
                labels.append(col)  # mostly 0/1: a label column with bad values, reported below
    if not labels:
        raise TailfuseError(
            f"manifest {csv} has no label columns: a label column holds 0 or 1 in every row, one column per "
            f"label (columns found: {', '.join(raw.columns)}). Add them, name them with --labels, or name a column "
            "of class names with --label-column."
        )
    for col in labels:
        bad = bad_values(col)
        if bad.any():
            vals = sorted(set(raw[col][bad]))[:5]
            shown = ", ".join(repr(v) for v in vals)
            raise TailfuseError(
                f"manifest {csv}: label column '{col}' holds values other than 0/1 ({shown}) at line(s) "
                f"{_fmt_lines(list(lines[bad]))}. Labels must be 0 or 1: fix those rows (map uncertain or blank "
                f"labels to 0 or 1), or list '{col}' with --metadata-columns if it is not a label."
            )
    metadata = [c for c in raw.columns if c not in labels and c not in (pc, "split")]
    return labels, metadata


def _strata(ds: Dataset, idx: np.ndarray) -> np.ndarray:
    """Stratum of each row: its rarest label (by total count), or '' when it carries none."""
    ys = ds.table[ds.labels].to_numpy()[idx]
    totals = ds.table[ds.labels].to_numpy().sum(axis=0)
    order = np.argsort(totals, kind="stable")  # rarest first
    out = np.full(len(idx), "", dtype=object)
    for j in order[::-1]:  # most common first, rarer ones overwrite
        out[ys[:, j] == 1] = ds.labels[j]
    return out


def _group_keys(ds: Dataset, cfg: DataConfig) -> np.ndarray:
    group = cfg.group_column or ("patient_id" if "patient_id" in ds.table.columns else None)
    if group is None:
        return np.char.add("row-", np.arange(len(ds.table)).astype(str)).astype(object)
    if group not in ds.table.columns:
        raise TailfuseError(f"--group-column '{group}' is not a column of the manifest.")
    keys = ds.table[group].astype(str).str.strip().to_numpy().astype(object)
    missing = keys == ""
    keys[missing] = [f"row-{i}" for i in np.flatnonzero(missing)]
    return keys


def _allocate(ds: Dataset, idx: np.ndarray, fractions: dict[str, float], cfg: DataConfig, default: str) -> np.ndarray:
    """Seeded, stratified (by rarest label), grouped assignment of rows ``idx`` to the keys of ``fractions``."""
    rng = np.random.default_rng(cfg.seed)
    groups = _group_keys(ds, cfg)[idx]
    strata = _strata(ds, idx)
    # a group's stratum is the rarest stratum among its rows
    totals = {lab: int(ds.table[lab].sum()) for lab in ds.labels}
    gstrat: dict[str, str] = {}
    for g, s in zip(groups, strata):
        cur = gstrat.get(g)
        if cur is None or (s and (cur == "" or totals[s] < totals[cur])):
            gstrat[g] = s
    out = np.full(len(idx), default, dtype=object)
    by_stratum: dict[str, list[str]] = {}
    for g in dict.fromkeys(groups):  # first-appearance order: deterministic
        by_stratum.setdefault(gstrat[g], []).append(g)
    # per split: groups per stratum by the largest-remainder method, so the totals match the fractions while
    # every stratum keeps at least one group in the default split
    strata_names = sorted(by_stratum)
    for gs in by_stratum.values():
        rng.shuffle(gs)
    free = {s: len(by_stratum[s]) - 1 for s in strata_names}  # groups that may still leave the default split
    taken = {s: 0 for s in strata_names}
    assign: dict[str, str] = {}
    n_total = len(gstrat)
    for name, frac in fractions.items():
        want = {s: frac * len(by_stratum[s]) for s in strata_names}
        k = {s: min(int(np.floor(want[s])), free[s]) for s in strata_names}
        target = min(int(round(frac * n_total)), sum(free.values()))
        order = sorted(strata_names, key=lambda s: -(want[s] - np.floor(want[s])))
        i = 0
        while sum(k.values()) < target and any(k[s] < free[s] for s in strata_names):
            s = order[i % len(order)]
            if k[s] < free[s]:
                k[s] += 1
            i += 1
        for s in strata_names:
            for g in by_stratum[s][taken[s] : taken[s] + k[s]]:
                assign[g] = name
            taken[s] += k[s]
            free[s] -= k[s]
    for i, g in enumerate(groups):
        out[i] = assign.get(g, default)
    return out


def _assign_splits(ds: Dataset, cfg: DataConfig) -> None:
    t = ds.table
    t.insert(0, "sample_id", np.arange(len(t), dtype=np.int64))
    if t["split"].isna().all():
        fr = cfg.split_fractions
        if len(fr) != 3 or abs(sum(fr) - 1) > 1e-6 or min(fr) < 0:
            raise TailfuseError(f"split fractions {fr} must be three non-negative numbers (train val test) summing to 1.")
        idx = np.arange(len(t))
        t["split"] = _allocate(ds, idx, {"test": fr[2], "val": fr[1]}, cfg, "train")
        t["split_source"] = "tailfuse"
        ds.notes.append(
            f"no split column: made a seeded (seed {cfg.seed}) stratified split "
            f"{fr[0]:.0%}/{fr[1]:.0%}/{fr[2]:.0%} train/val/test"
        )
    else:
        t["split_source"] = "manifest"
        if not (t["split"] == "val").any() and cfg.val_fraction > 0:
            tr = np.flatnonzero((t["split"] == "train").to_numpy())
            new = _allocate(ds, tr, {"val": cfg.val_fraction}, cfg, "train")
            t.loc[tr, "split"] = new
            t.loc[tr[new == "val"], "split_source"] = "tailfuse"
            ds.notes.append(
                f"manifest has no val split: carved {int((new == 'val').sum())} of {len(tr)} train images into val "
                f"(seed {cfg.seed}, stratified, grouped); test untouched"
            )
    if not (t["split"] == "train").any():
        raise TailfuseError("the data has no training images (split 'train').")


def validate(cfg: DataConfig) -> None:
    """Checks of the data settings that need no data (run before any work starts)."""
    from .images import RESIZE_POLICIES

    if cfg.image_size < 8 or cfg.image_size % 8:
        raise TailfuseError(f"--image-size {cfg.image_size}: give a positive multiple of 8 (the VAE's downsampling "
                            "factor), e.g. 128 or 256.")
    if cfg.resize not in RESIZE_POLICIES:
        raise TailfuseError(f"resize policy '{cfg.resize}' unknown; choose from {', '.join(RESIZE_POLICIES)}.")
    if not 0 < cfg.head_share <= 1:
        raise TailfuseError(f"--head-share {cfg.head_share} must be in (0, 1].")


def partition(ds: Dataset, cfg: DataConfig) -> tuple[list[str], list[str]]:
    """Return (head_labels, tail_labels) by the documented rule, or as given by ``tail_labels``."""
    train = ds.table[ds.table["split"] == "train"]
    counts = {lab: int(train[lab].sum()) for lab in ds.labels}
    if cfg.tail_labels:
        unknown = [lab for lab in cfg.tail_labels if lab not in ds.labels]
        if unknown:
            raise TailfuseError(
                f"--tail-labels names {', '.join(unknown)}, not label(s) of this data (labels: {', '.join(ds.labels)})."
            )
        tail = [lab for lab in ds.labels if lab in cfg.tail_labels]
    else:
        if not 0 < cfg.head_share <= 1:
            raise TailfuseError(f"head_share {cfg.head_share} must be in (0, 1].")
        order = sorted(ds.labels, key=lambda lab: (-counts[lab], ds.labels.index(lab)))
        total = sum(counts.values())
        head, acc = [], 0
        for lab in order:
            if acc >= cfg.head_share * total:
                break
            head.append(lab)
            acc += counts[lab]
        if len(head) == len(order):  # keep at least one tail label
            head = head[:-1]
        tail = [lab for lab in ds.labels if lab not in head]
    head = [lab for lab in ds.labels if lab not in tail]
    if not head:
        if cfg.tail_labels:
            raise TailfuseError("every label is a tail label: at least one head label is needed (fix --tail-labels).")
        raise TailfuseError(f"the data has a single label ({', '.join(ds.labels)}): tailfuse needs at least two, a "
                            "frequent (head) one to take context from and a rare (tail) one to make samples of.")
    no_train = [lab for lab in tail if counts[lab] == 0]
    if no_train:
        ds.notes.append(f"tail label(s) {', '.join(no_train)} have no training image: nothing can be made for them")
    return head, tail


def histogram(counts: pd.DataFrame, tail: list[str], width: int = 30) -> str:
    """A text class histogram: one row per label with counts per split and a bar of the train count."""
    name_w = max(5, *(len(str(i)) for i in counts.index))
    top = max(1, int(counts["train"].max()))
    head_line = f"{'label':<{name_w}}  {'role':<4}  {'train':>6} {'val':>5} {'test':>5} {'total':>6}  bar of train"
    out = [head_line, "-" * len(head_line)]
    for lab, row in counts.sort_values("train", ascending=False).iterrows():
        bar = "#" * max(1 if row["train"] else 0, round(width * row["train"] / top))
        role = "tail" if lab in tail else "head"
        out.append(
            f"{lab:<{name_w}}  {role:<4}  {row['train']:>6} {row['val']:>5} {row['test']:>5} {row['total']:>6}  {bar}"
        )
    return "\n".join(out)
