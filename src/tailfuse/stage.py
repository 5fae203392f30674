"""The one stage protocol: start, skip when done, refuse other settings without --force, resume, shards.

A stage is identified by its name in the run folder (``encode``, ``train``, ``fuse-synthetic``, ...). It declares a
config hash (of its settings and of the records of its inputs) and the outputs to delete on ``--force``::

    st = Stage.open(store, "fuse-synthetic", config_hash, what="synthetic set 'synthetic'", wipe=[folder],
                    force=force, inputs={"encode": ..., "train": ...})
    if st.done:
        return st.record
    for si in st.todo(range(n_shards)):          # shards not finished yet and owned by this process
        ... write the shard's files atomically ...
        st.finish_shard(si, {"file": ..., "n": ...})
    st.finish(n_synthetic=...)                     # after a barrier; the main process writes the record

Records live in ``<run>/stages/<name>.json``; every finished shard leaves its own atomic marker
``<run>/stages/<name>.shards/<key>.json`` (what it wrote, its seconds), so processes working on different shards
never write the same file, and the record is assembled from the markers when the stage finishes. A record made with
another configuration is refused (``StageMismatch``) unless ``force``, which deletes the stage's outputs, markers and
record first. A killed stage resumes from its markers: finished shards are not redone.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from .dist import Dist, current
from .errors import q
from .store import RunStore, StageMismatch, now, sweep_temporary, write_json_atomic

log = logging.getLogger("tailfuse")


def redo_command(store: RunStore, name: str) -> str:
    """The command that redoes stage ``name`` of a run (for hints: `tailfuse run` itself has no --force)."""
    kind, _, set_name = name.partition("-")
    run = f"--run {q(store.root)}"
    if name == "encode":
        return f"tailfuse encode {run} --data ... --force"
    if name.startswith("train"):
        extra = " --no-imitation" if name == "train-no-imitation" else (f" --name {q(name)}" if name != "train" else "")
        return f"tailfuse train {run}{extra} --force"
    if kind in ("fuse", "decode", "refine", "sample"):
        return f"tailfuse {kind} {run} --name {q(set_name)} --force"
    if kind == "saliency":
        return f"tailfuse fuse {run} --force"
    return f"tailfuse train-prior {run} --name {q(name)} --force" if name.startswith("prior") else f"the {kind} command with --force"


class Stage:
    def __init__(self, store: RunStore, name: str, record: dict, dist: Dist):
        self.store, self.name, self.record, self.dist = store, name, record, dist
        self._t0 = time.time()

    @classmethod
    def open(cls, store: RunStore, name: str, config_hash: str, *, what: str, wipe: list[Path] = (),
             force: bool = False, inputs: dict | None = None, extra: dict | None = None, dist: Dist | None = None) -> "Stage":
        """Start, resume or skip the stage ``name`` (see the module docstring). With several processes the main one
        decides and writes; the others follow its decision (a collective call: every process must make it)."""
        dist = dist or current()
        error = None
        if dist.is_main:
            try:
                cls._prepare(store, name, config_hash, what, wipe, force, inputs, extra)
            except StageMismatch as e:
                error = str(e)
        error = dist.broadcast(error)  # also the point after which every process sees the main one's writes
        if error:
            raise StageMismatch(error)
        st = cls(store, name, store.stage(name), dist)
        if not st.done:  # this attempt's threads and load (a resumed stage: the latest attempt's)
            from .threads import runtime_record

            st.update(runtime=runtime_record())
        return st

    @classmethod
    def _prepare(cls, store, name, config_hash, what, wipe, force, inputs, extra) -> None:
        left = sweep_temporary(store.root)  # a kill mid-write leaves a temporary file: its process is gone
        if left:
            log.debug(f"removed {len(left)} temporary file(s) left by a killed process")
        rec = store.stage(name)
        if rec is not None and (force or rec.get("config_hash") != config_hash):
            if not force:
                raise StageMismatch(f"run folder {store.root} holds {what} made with other settings or inputs. "
                                    f"`{redo_command(store, name)}` discards it and makes it again; or choose another "
                                    "--name (or --run) to keep both.")
            log.info(f"--force: discarding the earlier {what}")
            for p in list(wipe) + [cls.marker_dir(store, name)]:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.exists():
                    p.unlink()
            store.stage_path(name).unlink(missing_ok=True)
            rec = None
        if rec is None:
            shutil.rmtree(cls.marker_dir(store, name), ignore_errors=True)  # markers without a record: stale
            store.write_stage(name, {"stage": name, "status": "running", "config_hash": config_hash,
                                     "inputs": inputs or {}, "started_at": now(), **(extra or {})})

    # --- state
    @property
    def done(self) -> bool:
        return self.record.get("status") == "done"

    @property
    def redo(self) -> str:
        return redo_command(self.store, self.name)

    @staticmethod
    def marker_dir(store: RunStore, name: str) -> Path:
        return store.root / "stages" / f"{name}.shards"

    def _marker(self, key) -> Path:
        return self.marker_dir(self.store, self.name) / f"{key}.json"

    # --- shards
    def shard(self, key) -> dict | None:
        """The marker of a finished shard, or None."""
        p = self._marker(key)
        return json.loads(p.read_text()) if p.is_file() else None

    def shards(self) -> dict[str, dict]:
        """Every finished shard's marker, by key (numeric keys in numeric order)."""
        d = self.marker_dir(self.store, self.name)
        if not d.is_dir():
            return {}
        keys = [p.stem for p in d.glob("*.json")]
        keys.sort(key=lambda k: (0, int(k)) if k.isdigit() else (1, k))
        return {k: json.loads((d / f"{k}.json").read_text()) for k in keys}

    def forget_shard(self, key) -> None:
        self._marker(key).unlink(missing_ok=True)

    def todo(self, keys) -> list:
        """The shards this process owns (shard i goes to process i mod N) and has not finished."""
        return [k for i, k in enumerate(keys) if self.dist.owns(i) and self.shard(k) is None]

    def finish_shard(self, key, info: dict | None = None) -> None:
        seconds = round(time.time() - self._t0, 3)
        write_json_atomic(self._marker(key), {**(info or {}), "seconds": seconds})
        self._t0 = time.time()

    def update(self, **fields) -> None:
        """Record fields while running (main process)."""
        self.record.update(fields)
        if self.dist.is_main:
            self.store.write_stage(self.name, self.record)

    def finish(self, with_shards: bool = True, **fields) -> dict:
        """Wait for every process, then the main process writes the finished record (shards from the markers)."""
        self.dist.barrier()
        if with_shards:
            sh = self.shards()
            self.record["shards"] = sh
            self.record["seconds"] = round(sum(float(v.get("seconds", 0)) for v in sh.values())
                                           + float(fields.pop("extra_seconds", 0.0)), 2)
        self.record.update(status="done", finished_at=now(), **fields)
        from .threads import adapted_counts

        counts = adapted_counts()
        if counts and isinstance(self.record.get("runtime"), dict):  # an adaptive stage: the counts it went through
            self.record["runtime"]["threads_used"] = counts
        if self.dist.is_main:
            self.store.write_stage(self.name, self.record)
        self.dist.barrier()
        return self.record
