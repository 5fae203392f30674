"""Latent sets: a named set of synthetic latents in a run, whichever stage made it.

``fuse`` (fused latents), ``refine`` (refined latents), ``sample`` (latents sampled from noise) and evaluate's
``smote`` (SMOTE / MLSMOTE in latent space) each write a set
``<run>/<name>/``: ``latents/*.safetensors`` shards (``latents``, ``synth_id`` and, for fused sets, the fusion
``mask``), ``samples.csv`` (one row per latent: labels and provenance) and the stage record ``<kind>-<name>`` with
the shard files. Later stages (refine, decode) take a set by name and do not care which stage made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from safetensors import safe_open

from .errors import TailfuseError, q
from .store import RunStore, ShardSet

KINDS = ("fuse", "refine", "sample", "smote")  # the stages that make latent sets


@dataclass
class LatentSet:
    store: RunStore
    name: str
    kind: str
    record: dict

    @classmethod
    def open(cls, store: RunStore, name: str = "synthetic") -> "LatentSet":
        for kind in KINDS:
            rec = store.stage(f"{kind}-{name}")
            if rec is not None:
                if rec.get("status") != "done":
                    raise TailfuseError(f"the latent set '{name}' in {store.root} is unfinished; rerun `tailfuse {kind} --run {q(store.root)} --name {q(name)}` "
                                        "to complete it.")
                return cls(store, name, kind, rec)
        raise TailfuseError(f"run folder {store.root} has no latent set '{name}'; run `tailfuse fuse --run {q(store.root)}` "
                            "(or `tailfuse refine` / `tailfuse sample`) first.")

    @property
    def folder(self) -> Path:
        return self.store.root / self.name

    @property
    def shards(self) -> ShardSet:
        return ShardSet(self.folder, self.record["files"], id_key="synth_id")

    def table(self) -> pd.DataFrame:
        return pd.read_csv(self.folder / "samples.csv")

    @property
    def has_masks(self) -> bool:
        with safe_open(str(self.folder / self.record["files"][0]), framework="pt") as h:
            return "mask" in h.keys()

    def __len__(self) -> int:
        return int(self.record.get("n_synthetic", 0))
