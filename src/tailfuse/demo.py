"""The built-in demo dataset: ELPV solar-cell electroluminescence images (PyPI package ``elpv-dataset``).

2,624 grayscale 300x300 images of solar cells, each with a defect probability 0, 1/3, 2/3 or 1 given by
experts (Buerhop-Lutz et al. 2018; Deitsch et al. 2019; CC BY-NC-SA 4.0). tailfuse reads them as four classes;
the rarer defect grades (mildly and likely defective) are the tail. The demo writes a manifest that points
at the images inside the installed package (nothing is copied) and runs the pipeline on it.
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
        "fuse": FuseConfig(per_class=50, device=device),
        "decode": DecodeConfig(device=device),
    }


def elpv_manifest(out_csv: Path, head_cap: int | None = DEMO_HEAD_CAP, seed: int = 0) -> Path:
    """Write a CSV manifest (absolute paths into the installed elpv-dataset package) and return its path.

    Every tail-grade image is kept; of each head grade at most ``head_cap`` (seeded choice; None keeps all)."""
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
    if head_cap is not None:
        keep = []
        for name in GRADES.values():
            sub = table[table[name] == 1]
            if name not in DEMO_TAIL and len(sub) > head_cap:
                sub = sub.sample(n=head_cap, random_state=seed)
            keep.append(sub)
        table = pd.concat(keep).sort_index()
    write_csv_atomic(out_csv, table)
    return out_csv
