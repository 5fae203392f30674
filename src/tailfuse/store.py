"""The run folder: the contract between stages.

Layout::

    <run>/
      run.yaml                 resolved configuration of every stage that ran
      samples.csv              one row per encoded sample: sample_id, path, abs_path, split, labels, metadata,
                               shard, offset
      labels.json              label names, head/tail labels, multi-label flag, counts per split
      skipped.csv              images that could not be read (path, manifest line, reason)
      latents/00000.safetensors ...  latent shards: `latents` (n x C x h x w float32) and `sample_id` (n int64)
      stages/<stage>.json      what each stage did: status, config and input hashes, finished shards, timings

Every file is written atomically (temporary name in the same folder, then ``os.replace``), so a killed run
leaves either the old or the new file, never half of one. Latents are read shard by shard (memory-mapped by
safetensors), so later stages can stream any number of them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import TailfuseError, q


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() gives a new file: every written file follows the umask


def _publish(tmp: Path, path: Path) -> None:
    """Give a finished temporary file the umask's mode (writers such as safetensors create 0600 files) and move it
    into place atomically."""
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)


@contextmanager
def atomic_file(path: Path, suffix: str = ""):
    """Write ``path`` atomically: yields a temporary name in the same folder (ending in ``suffix``, for writers that
    choose the format by the extension); on success the file gets the umask's mode and replaces ``path``; on any
    failure (a full disk, an interrupt) the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def torch_save_atomic(obj, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def npz_save_atomic(path: Path, **arrays) -> None:
    with atomic_file(path, ".npz") as tmp:
        np.savez(tmp, **arrays)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv_atomic(path: Path, df: pd.DataFrame) -> None:
    write_text_atomic(path, df.to_csv(index=False))


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class ShardSet:
    """Streaming, random-access reader over safetensors shards holding a tensor and an id vector (`sample_id`).

    ``iter_batches`` streams shard by shard (at most ``cache_shards`` in memory); ``get`` reads single rows
    through memory-mapped slices, so random access does not load whole shards."""

    def __init__(self, folder: Path, files: list[str], cache_shards: int = 2, id_key: str = "sample_id", key: str = "latents"):
        self.folder = Path(folder)
        self.files = list(files)
        self.id_key, self.key = id_key, key
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_shards = cache_shards
        self._ids: list[np.ndarray] = []
        for f in self.files:
            p = self.folder / f
            if not p.is_file():
                raise TailfuseError(f"run folder is missing latent shard {p}; rerun the stage that writes it.")
            with safe_open(str(p), framework="pt") as h:
                self._ids.append(h.get_tensor(id_key).numpy())
                if not hasattr(self, "shape"):
                    self.shape = tuple(h.get_slice(key).get_shape()[1:])
        self.index: dict[int, tuple[int, int]] = {
            int(sid): (si, off) for si, ids in enumerate(self._ids) for off, sid in enumerate(ids)
        }

    def __len__(self) -> int:
        return sum(len(i) for i in self._ids)

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate(self._ids) if self._ids else np.empty(0, dtype=np.int64)

    def _shard(self, si: int) -> dict[str, torch.Tensor]:
        if si in self._cache:
            self._cache.move_to_end(si)
            return self._cache[si]
        with safe_open(str(self.folder / self.files[si]), framework="pt") as h:
            data = {k: h.get_tensor(k) for k in h.keys()}
        self._cache[si] = data
        while len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return data

    def iter_batches(
        self, batch_size: int = 256, ids: np.ndarray | None = None, key: str | None = None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (sample_ids, tensor) batches shard by shard; ``ids`` restricts (and keeps shard order)."""
        keep = None if ids is None else set(int(i) for i in ids)
        for si, sid in enumerate(self._ids):
            mask = np.ones(len(sid), bool) if keep is None else np.array([int(i) in keep for i in sid], bool)
            if not mask.any():
                continue
            t = self._shard(si)[key or self.key]
            sel = np.flatnonzero(mask)
            for a in range(0, len(sel), batch_size):
                rows = sel[a : a + batch_size]
                yield sid[rows], t[torch.from_numpy(rows)]

    def get(self, ids: np.ndarray | list[int], key: str | None = None) -> torch.Tensor:
        """Tensors for ``ids``, in the order given (memory-mapped row reads). Each shard file a call touches is
        opened once and closed before returning, so the mapped pages of earlier calls do not pile up in the
        process's memory over a long random-access run (fuse reads head latents from every shard)."""
        key = key or self.key
        ids = [int(i) for i in ids]
        missing = [i for i in ids if i not in self.index]
        if missing:
            raise KeyError(f"ids not in this shard set: {missing[:5]}")
        if not ids:
            return torch.empty((0, *self.shape))
        rows: list[torch.Tensor | None] = [None] * len(ids)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for j, i in enumerate(ids):
            si, off = self.index[i]
            if si in self._cache:
                rows[j] = self._cache[si][key][off : off + 1]
            else:
                by_shard.setdefault(si, []).append((j, off))
        for si, wanted in by_shard.items():
            with safe_open(str(self.folder / self.files[si]), framework="pt") as h:
                sl = h.get_slice(key)
                for j, off in wanted:
                    rows[j] = sl[off : off + 1].clone()
        return torch.cat(rows)

    def load_all(self, key: str | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """Everything at once (for small runs and tests); prefer iter_batches for large ones."""
        parts = [self._shard(si)[key or self.key] for si in range(len(self.files))]
        return self.ids, (torch.cat(parts) if parts else torch.empty(0))


def sweep_temporary(root: Path) -> list[Path]:
    """Remove the temporary files (``.<name>.tmp-<pid>...``, see atomic_file) that a process killed mid-write left in
    the run folder: only those whose process is gone, so a live writer's file is never touched. Returns them."""
    gone = []
    for p in Path(root).rglob(".*.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[1].split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


_MPL_SET_BY_US: str | None = None


def contain_matplotlib(run: Path) -> None:
    """Keep matplotlib (imported by pytorch-grad-cam and the plots) from writing its font cache and config into the
    user's home: its cache goes to ``<run>/.cache/matplotlib`` and it draws with the Agg backend. Only before
    matplotlib is imported, and never over an MPLCONFIGDIR the user set."""
    global _MPL_SET_BY_US
    if "matplotlib" in sys.modules or os.environ.get("MPLCONFIGDIR", _MPL_SET_BY_US) != _MPL_SET_BY_US:
        return
    _MPL_SET_BY_US = os.environ["MPLCONFIGDIR"] = str(run.resolve() / ".cache" / "matplotlib")
    os.environ.setdefault("MPLBACKEND", "Agg")


class RunStore:
    """Paths and records of one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        contain_matplotlib(self.root)

    # --- paths
    @property
    def samples_csv(self) -> Path:
        return self.root / "samples.csv"

    @property
    def labels_json(self) -> Path:
        return self.root / "labels.json"

    @property
    def run_yaml(self) -> Path:
        return self.root / "run.yaml"

    @property
    def skipped_csv(self) -> Path:
        return self.root / "skipped.csv"

    def stage_path(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    # --- checks
    def check_outside(self, inputs=None) -> None:
        """Refuse a run folder that would write into the input (``data.InputLocations``): the folder of the manifest
        itself, or one inside (or equal to) a folder that holds input images or is a folder input. A run folder
        beside them, e.g. ``runs/x`` next to ``manifest.csv`` and ``images/``, is fine."""
        root = self.root.resolve()
        if inputs is not None:
            for folder in inputs.folders:
                d = Path(folder).resolve()
                if root == d or d in root.parents:
                    raise TailfuseError(
                        f"run folder {root} is inside {d}, which holds input images; tailfuse never writes into its "
                        "input. Choose a --run outside it (beside it is fine).")
            for f in inputs.files:
                if root == Path(f).resolve().parent:
                    raise TailfuseError(
                        f"run folder {root} is the folder of the manifest {Path(f).name}; tailfuse never writes into "
                        "its input. Choose a --run beside it, e.g. a sub-folder 'runs/<name>'.")
        if root.exists() and not root.is_dir():
            raise TailfuseError(f"run path {root} exists and is not a folder.")

    def create(self, inputs=None) -> None:
        """Make the run folder; refuse one that would write into the input (see check_outside)."""
        self.check_outside(inputs)
        self.root.resolve().mkdir(parents=True, exist_ok=True)

    def require(self, *stages: str) -> None:
        start = f"`tailfuse run --data <manifest> --run {q(self.root)}` (or `tailfuse encode`)"
        if not self.root.is_dir():
            raise TailfuseError(f"run folder {self.root} does not exist; start one with {start}.")
        if not self.stages():
            raise TailfuseError(f"run folder {self.root} holds no run yet; start one with {start}.")
        for s in stages:
            rec = self.stage(s)
            if not rec or rec.get("status") != "done":
                how = start if s == "encode" else f"`tailfuse {s} --run {q(self.root)}`"
                raise TailfuseError(f"run folder {self.root}: stage '{s}' has not finished; run {how} first.")

    # --- stage records
    def stage(self, stage: str) -> dict | None:
        p = self.stage_path(stage)
        if not p.is_file():
            return None
        return json.loads(p.read_text())

    def write_stage(self, stage: str, record: dict) -> None:
        write_json_atomic(self.stage_path(stage), record)

    def stages(self) -> dict[str, dict]:
        """Every stage record of the run (nested names such as ``fuse-eval/tailfuse`` included), in pipeline order."""
        d = self.root / "stages"
        if not d.is_dir():
            return {}
        found = {}
        for p in d.rglob("*.json"):
            rel = p.relative_to(d)
            if any(part.endswith(".shards") for part in rel.parts[:-1]):
                continue  # per-shard done-markers
            found[str(rel.with_suffix(""))] = json.loads(p.read_text())
        order = ("encode", "train", "saliency", "prior", "fuse", "refine", "sample", "smote", "decode")

        def key(name: str):
            head = name.split("/")[0]
            rank = next((i for i, o in enumerate(order) if head == o or head.startswith(o + "-")), len(order))
            return (rank, name)

        return {k: found[k] for k in sorted(found, key=key)}

    # --- run.yaml
    def write_config(self, section: str, values: dict) -> None:
        doc = {}
        if self.run_yaml.is_file():
            doc = yaml.safe_load(self.run_yaml.read_text()) or {}
        doc[section] = values
        write_text_atomic(self.run_yaml, yaml.safe_dump(doc, sort_keys=False))

    def config(self) -> dict:
        return (yaml.safe_load(self.run_yaml.read_text()) or {}) if self.run_yaml.is_file() else {}

    # --- tables
    def samples(self) -> pd.DataFrame:
        if not self.samples_csv.is_file():
            raise TailfuseError(f"run folder {self.root} has no samples.csv; run `tailfuse encode` first.")
        return pd.read_csv(self.samples_csv, keep_default_na=False, dtype={"split": str, "path": str})

    def labels(self) -> dict:
        if not self.labels_json.is_file():
            raise TailfuseError(f"run folder {self.root} has no labels.json; run `tailfuse encode` first.")
        return json.loads(self.labels_json.read_text())

    @property
    def data_root(self) -> Path:
        """The run folder whose latents this run reads: itself, or, for a fold of `tailfuse evaluate --folds`, the
        run it was made from (``latents_from`` in its encode record). Caches of per-image work (VAE round trips,
        image features) live there too, so the folds share them."""
        rec = self.stage("encode") or {}
        return (self.root / rec["latents_from"]).resolve() if rec.get("latents_from") else self.root

    def latents(self) -> ShardSet:
        rec = self.stage("encode")
        if not rec or rec.get("status") != "done":
            raise TailfuseError(f"run folder {self.root}: encode has not finished; run `tailfuse encode` first.")
        files = [rec["shards"][k]["file"] for k in sorted(rec["shards"], key=int) if rec["shards"][k]["file"]]
        return ShardSet(self.data_root, files)


LOCK_NAME = ".tailfuse.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def lock_holder(root: Path) -> dict | None:
    """The live process holding the run folder's lock, or None (no lock, or a stale one of a dead process)."""
    import socket

    p = Path(root) / LOCK_NAME
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1))):
        return None
    return info


class RunLock:
    """One writer per run folder: ``<run>/.tailfuse.lock`` holds the writer's pid, host, command and start time. A
    second writer is refused with a message naming the holder; a lock left by a killed process (its pid no longer
    alive on this host) is taken over, so a resume is never blocked."""

    def __init__(self, root: Path, command: str):
        self.path = Path(root) / LOCK_NAME
        self.command = command
        self.held = False

    def __enter__(self) -> "RunLock":
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": now()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE)
            except FileExistsError:
                holder = lock_holder(self.path.parent)
                if holder is not None:
                    raise TailfuseError(
                        f"run folder {self.path.parent} is in use by process {holder.get('pid')} on {holder.get('host')} "
                        f"(`{holder.get('command')}`, since {holder.get('since')}). Wait for it to finish; if that "
                        f"process is gone, delete {self.path}.") from None
                self.path.unlink(missing_ok=True)  # stale: its process is dead
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            return self
        raise TailfuseError(f"could not take the lock {self.path}; another process took it at the same moment.")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


class StageMismatch(TailfuseError):
    """A stage's earlier output was made with other settings or inputs (``--force`` replaces it)."""


def open_stage(store: RunStore, name: str, config_hash: str, force: bool, wipe: list[Path], log, what: str) -> dict | None:
    """Start, resume or skip a stage. Returns the record to resume (status running), a done record, or None (fresh).

    A record made with another configuration is refused unless ``force``; ``force`` deletes ``wipe`` and the record."""
    import shutil

    rec = store.stage(name)
    if rec is not None and (force or rec.get("config_hash") != config_hash):
        if not force:
            raise StageMismatch(
                f"run folder {store.root} holds {what} made with other settings or inputs. Pass --force to discard "
                "it and redo it, or choose another --name."
            )
        log(f"--force: discarding the earlier {what}")
        for p in wipe:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        store.stage_path(name).unlink(missing_ok=True)
        rec = None
    return rec


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
