"""Shared fixtures.

Real data and models come from the shared folder: ``$TAILFUSE_SHARED`` if set, else ``../shared`` beside the
project root. Tests that need it skip with a reason when it is absent; with ``TAILFUSE_REQUIRE_SHARED=1`` (set by
.ci/run) they fail instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("TAILFUSE_SHARED", ROOT.parent / "shared")).resolve()


def _need(path: Path, what: str) -> Path:
    if path.exists():
        return path
    msg = f"{what} not found at {path} (set TAILFUSE_SHARED to the shared folder)"
    if os.environ.get("TAILFUSE_REQUIRE_SHARED") == "1":
        pytest.fail(msg + "; TAILFUSE_REQUIRE_SHARED=1 forbids skipping")
    pytest.skip(msg)


def _test_thread_count() -> int:
    """Two threads; under pytest-xdist (pyproject's addopts run two workers) each worker its share of the allowed
    CPUs, so the workers do not oversubscribe the cores (small networks slow down many times when they do)."""
    from tailfuse.threads import cpus_allowed

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    return max(1, cpus_allowed() // workers) if workers else 2


def _fixed_threads():
    """A fixed count, chosen (as ``--threads N`` would): stages that adapt their count to the load
    (tailfuse.threads) keep it, so a test's results do not depend on what else the machine runs. A model trained with
    1 thread differs in its last bits from one trained with 2, and the resume tests compare weights bit for bit."""
    from tailfuse import threads

    threads._explicit = _test_thread_count()
    torch.set_num_threads(threads._explicit)


@pytest.fixture(autouse=True, scope="session")
def _session_threads():
    """From the start, so module fixtures (trained before any test's own fixture) run like the tests do, whatever
    OMP_NUM_THREADS says."""
    _fixed_threads()


@pytest.fixture(autouse=True)
def _threads():
    _fixed_threads()
    yield


@pytest.fixture(scope="session")
def taesd_path() -> Path:
    return _need(Path(os.environ.get("TAILFUSE_VAE", shared_dir() / "models" / "taesd")), "TAESD model folder")


@pytest.fixture(scope="session")
def isic_dir() -> Path:
    return _need(shared_dir() / "data" / "isic2018_lt", "ISIC2018-LT dataset")


@pytest.fixture(scope="session")
def covid_dir() -> Path:
    return _need(shared_dir() / "data" / "covid_cxr", "COVID CXR dataset")


def subset_manifest(src_dir: Path, out_csv: Path, per_label: int, splits=("train", "val", "test"), seed: int = 0) -> Path:
    """Write a manifest with up to ``per_label`` rows per (label, split), paths absolute into the shared folder."""
    m = pd.read_csv(src_dir / "manifest.csv")
    meta = {"path", "split", "isic_id", "patient_id", "view", "license"}
    labels = [c for c in m.columns if c not in meta]
    picked = []
    for s in splits:
        ms = m[m["split"] == s]
        for lab in labels:
            rows = ms[ms[lab] == 1]
            picked.append(rows.sample(n=min(per_label, len(rows)), random_state=seed))
    sub = pd.concat(picked).drop_duplicates("path").sort_index()
    sub["path"] = [str((src_dir / p).resolve()) for p in sub["path"]]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    sub.to_csv(out_csv, index=False)
    return out_csv
