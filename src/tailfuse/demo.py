"""The built-in demo dataset: ELPV solar-cell electroluminescence images (PyPI package ``elpv-dataset``).

2,624 grayscale 300x300 images of solar cells, each with a defect probability 0, 1/3, 2/3 or 1 given by
experts (Buerhop-Lutz et al. 2018; Deitsch et al. 2019; CC BY-NC-SA 4.0). tailfuse reads them as four classes;
the rarer defect grades (mildly and likely defective) are the tail. The demo copies the images it uses into the
run folder (``<run>/demo-data/images``, about 40 MB) with a manifest beside them, so the run and its provenance do
not depend on the virtual environment the package was installed in, and runs the pipeline on it. Fusion partners
are chosen within the cell's type (monocrystalline or polycrystalline): a mono cell fused with a poly one gives
an impossible hybrid (mono corners around poly texture, two kinds of busbar in one image).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import TailfuseError
from .store import write_csv_atomic

GRADES = {0.0: "functional", 1 / 3: "mildly_defective", 2 / 3: "likely_defective", 1.0: "defective"}
DEMO_TAIL = ["mildly_defective", "likely_defective"]
DEMO_HEAD_CAP = 400  # head-grade images kept (seeded choice) so the whole demo runs in minutes on 2 CPU cores


def demo_configs(manifest: Path, vae: str, device: str) -> dict:
    """The demo's settings: the ELPV tail grades, a shorter training schedule, 50 new images per tail grade."""
    from .config import DataConfig, DecodeConfig, EncodeConfig, FuseConfig, TrainConfig, VAEConfig

    return {
        "data": DataConfig(data=str(manifest), tail_labels=list(DEMO_TAIL), metadata_columns=["cell_type"]),
        "vae": VAEConfig(vae=vae, device=device),
        "encode": EncodeConfig(),
        "train": TrainConfig(generations=3, epochs=6, imitation_epochs=3, device=device),
        "fuse": FuseConfig(per_class=50, neighbours_within="cell_type", device=device),
        "decode": DecodeConfig(device=device),
    }


def elpv_manifest(out_csv: Path, head_cap: int | None = DEMO_HEAD_CAP, seed: int = 0, copy: bool = False,
                  per_grade: int | None = None) -> Path:
    """Write a CSV manifest of ELPV and return its path: absolute paths into the installed elpv-dataset package, or
    with ``copy`` the images copied to ``images/`` beside the CSV and paths relative to it (existing copies of the
    same size are kept, so a rerun copies nothing).

    Every tail-grade image is kept; of each head grade at most ``head_cap`` (seeded choice; None keeps all).
    ``per_grade`` keeps at most that many of every grade (a small subset, for tests)."""
    try:
        import elpv_dataset
    except ImportError:
        raise TailfuseError("the demo needs the PyPI package elpv-dataset: pip install elpv-dataset") from None
    root = Path(elpv_dataset.__file__).parent / "data"
    labels_file = root / "labels.csv"
    if not labels_file.is_file():
        raise TailfuseError(f"elpv-dataset is installed but {labels_file} is missing; reinstall the package.")
    raw = pd.read_csv(labels_file, sep=r"\s+", header=None, names=["path", "probability", "type"])
    rows = []
    for _, r in raw.iterrows():
        grade = min(GRADES, key=lambda g: abs(g - float(r["probability"])))
        row = {"path": str((root / r["path"]).resolve()), "cell_type": r["type"]}
        for g, name in GRADES.items():
            row[name] = int(g == grade)
        rows.append(row)
    table = pd.DataFrame(rows)
    if head_cap is not None or per_grade is not None:
        keep = []
        for name in GRADES.values():
            sub = table[table[name] == 1]
            cap = head_cap if name not in DEMO_TAIL else None
            cap = per_grade if cap is None else cap if per_grade is None else min(cap, per_grade)
            if cap is not None and len(sub) > cap:
                sub = sub.sample(n=cap, random_state=seed)
            keep.append(sub)
        table = pd.concat(keep).sort_index()
    if copy:
        table = table.assign(path=_copy_images(table["path"], Path(out_csv).parent / "images"))
    write_csv_atomic(out_csv, table)
    return out_csv


def _copy_images(paths: pd.Series, folder: Path) -> list[str]:
    """Copy the images into ``folder`` (atomically each; an existing copy of the same size is kept); relative paths."""
    import shutil

    from .store import atomic_file

    import logging

    folder.mkdir(parents=True, exist_ok=True)
    todo = [p for p in paths if not ((folder / Path(p).name).is_file()
                                     and (folder / Path(p).name).stat().st_size == Path(p).stat().st_size)]
    if todo:
        logging.getLogger("tailfuse").info(f"copying {len(todo)} ELPV images into {folder}")
    out = []
    for p in paths:
        src = Path(p)
        dst = folder / src.name
        if not (dst.is_file() and dst.stat().st_size == src.stat().st_size):
            with atomic_file(dst, src.suffix) as tmp:
                shutil.copyfile(src, tmp)
        out.append(f"images/{src.name}")
    return out
