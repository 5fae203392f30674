"""The fault harness in CI: every stage killed with SIGKILL at random points resumes to output identical to an
uninterrupted run, with no temporary file left; a full disk fails with one line naming the file and resumes."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from conftest import subset_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fault_harness  # noqa: E402

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def test_every_stage_survives_random_kills(tmp_path, isic_dir, taesd_path):
    manifest = subset_manifest(isic_dir, tmp_path / "in" / "m.csv", per_label=2)
    res = fault_harness.run_harness(tmp_path / "h", manifest, taesd_path, kills=1, seed=1)
    bad = [t for t in res["trials"] if not t.get("resumed") or (t["killed"] and not t["identical"])]
    assert not bad, bad
    assert res["kills"] >= 3  # most trials land while the stage runs (the rest finished first)
    assert res["kills_survived_identical"] == res["kills"]
    assert all(t["files_compared"] > 0 for t in res["trials"])  # every stage's outputs were there to compare


def test_a_full_disk_fails_with_one_line_and_the_next_run_resumes(tmp_path, isic_dir, taesd_path, monkeypatch, capsys):
    import tailfuse.store as store
    from tailfuse.cli import main

    manifest = subset_manifest(isic_dir, tmp_path / "in" / "m.csv", per_label=2)
    args = ["encode", "--data", str(manifest), "--vae", str(taesd_path), "--batch-size", "4", "--shard-size", "8",
            "--quiet"]
    assert main([*args, "--run", str(tmp_path / "whole")]) == 0
    real = store._publish
    calls = {"n": 0}

    def full(tmp, path):
        calls["n"] += 1
        if calls["n"] == 4:  # the disk fills up in the middle of the stage
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real(tmp, path)

    monkeypatch.setattr(store, "_publish", full)
    capsys.readouterr()
    assert main([*args, "--run", str(tmp_path / "full")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "no space left" in err[0] and str(tmp_path / "full") in err[0], err
    assert not list((tmp_path / "full").rglob("*.tmp-*"))  # the half-written file was removed
    monkeypatch.setattr(store, "_publish", real)
    assert main([*args, "--run", str(tmp_path / "full")]) == 0  # resumes
    a = sorted((tmp_path / "whole" / "latents").glob("*"))
    b = sorted((tmp_path / "full" / "latents").glob("*"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_temporary_files_of_a_killed_writer_are_swept_when_a_stage_starts(tmp_path):
    """A SIGKILL during a write leaves '.<name>.tmp-<pid>' behind (the fault harness caught one in train/); the next
    stage start removes those of dead processes and keeps a live writer's."""
    import subprocess

    from tailfuse.stage import Stage
    from tailfuse.store import RunStore

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "train").mkdir()
    left = tmp_path / "train" / f".state.pt.tmp-{pid}"
    left.write_bytes(b"half a checkpoint")
    live = tmp_path / "train" / f".metrics.json.tmp-{os.getppid()}"
    live.write_text("{}")
    Stage.open(RunStore(tmp_path), "train", "h", what="a model")
    assert not left.exists() and live.exists()
