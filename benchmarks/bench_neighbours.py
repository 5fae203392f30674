"""Neighbour search of `tailfuse fuse` on a finished run's saliency maps: exact search against faiss (flat, HNSW),
each in its own process of one thread (--threads): wall time, peak RSS, and how many of each tail map's k neighbours
are those of exact search (recall at k) and whether the nearest is the same (the partner fuse takes first).

    python benchmarks/bench_neighbours.py RUN [--index exact,faiss-flat,faiss-hnsw] [--k 3] [--tag 50k]

RUN: a run in which `tailfuse fuse` has made its saliency maps (e.g. bench_scale.py's run-p1, 50,000 latents of
4 x 64 x 64). The search is fuse's own (`run_neighbours`, the run's default normalisation), on every tail map against
the whole head pool. Writes benchmarks/results/neighbours[-<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from _results import Load, child_env, parse, parser, provenance, write_results  # noqa: E402


def _maps(run: Path):
    """The run's saliency table, maps and folder (its first saliency stage), as fuse reads them, and the run."""
    from tailfuse.fusion.stage import saliency_maps
    from tailfuse.store import RunStore

    store = RunStore(run)
    name = next((k for k in store.stages() if k.startswith("saliency-")), None)
    if name is None or store.stage(name).get("status") != "done":
        raise SystemExit(f"{run} has no finished saliency maps: run `tailfuse fuse --run {run}` first.")
    return (*saliency_maps(store, name[len("saliency-"):]), store)


def one(run: Path, index: str, k: int, out: Path, threads: int = 1) -> None:
    """Child process: one search (``threads`` torch threads), its neighbours to ``out`` (csv) and its figures to
    ``out``.json."""
    import torch

    from tailfuse.config import FuseConfig
    from tailfuse.fusion.stage import run_neighbours

    torch.set_num_threads(threads)
    table, maps, folder, store = _maps(run)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.time()
    nb = run_neighbours(table, maps, folder, FuseConfig(index=index, neighbours=k), store.labels()["labels"], write=False)
    sec = time.time() - t
    nb[["tail_row", "rank", "head_row"]].to_csv(out, index=False)
    shape = maps.get(table["row_id"].to_numpy()[:1]).shape
    Path(f"{out}.json").write_text(json.dumps({
        "seconds": round(sec, 1), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_search_bytes": rss0 * 1024, "n_tail": int((table["role"] == "tail").sum()),
        "n_head": int((table["role"] == "head").sum()), "map_shape": list(shape[1:])}))


def main() -> int:
    ap = parser(__doc__, threads=1, threads_help="torch threads of each search's process (and of this one)")
    ap.add_argument("run")
    ap.add_argument("--index", default="exact,faiss-flat,faiss-hnsw", help="indexes to compare (exact comes first)")
    ap.add_argument("--k", type=int, default=3, help="neighbours per tail map (fuse's default --neighbours)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--to", help=argparse.SUPPRESS)
    a = parse(ap)
    if a.one:
        one(Path(a.run), a.one, a.k, Path(a.to), a.threads)
        return 0
    indexes = a.index.split(",")
    if "exact" not in indexes:
        indexes = ["exact", *indexes]  # recall is measured against it
    load = Load()
    rows, found = {}, {}
    env = child_env(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for ix in indexes:
            to = Path(tmp) / f"{ix}.csv"
            subprocess.run([sys.executable, __file__, a.run, "--one", ix, "--k", str(a.k), "--to", str(to),
                            "--threads", str(a.threads)], check=True, env=env)
            rows[ix] = json.loads(Path(f"{to}.json").read_text())
            found[ix] = pd.read_csv(to)
            print(ix, rows[ix], flush=True)
    ref = found["exact"].groupby("tail_row")["head_row"].apply(set)
    ref0 = found["exact"][found["exact"]["rank"] == 0].set_index("tail_row")["head_row"]
    for ix, nb in found.items():
        got = nb.groupby("tail_row")["head_row"].apply(set)
        rows[ix]["recall_at_k"] = round(float(np.mean([len(got[t] & ref[t]) / len(ref[t]) for t in ref.index])), 4)
        first = nb[nb["rank"] == 0].set_index("tail_row")["head_row"]
        rows[ix]["same_nearest"] = round(float((first.loc[ref0.index] == ref0).mean()), 4)
    r0 = rows["exact"]
    res = {**provenance(load, a), "k": a.k, "indexes": rows}
    command = res["command"]
    dim = int(np.prod(r0["map_shape"]))
    md = [f"# Neighbour search: {r0['n_tail']:,} tail maps against {r0['n_head']:,} head maps of "
          f"{' x '.join(map(str, r0['map_shape']))} (k = {a.k}; "
          f"{'one thread' if a.threads == 1 else f'{a.threads} threads'} per search)", "", f"Command: `{command}`", "",
          "| index | wall (s) | peak RSS (MiB) | RSS before the search (MiB) | recall at k (against exact) | same nearest |",
          "|---|---|---|---|---|---|"]
    for ix, r in rows.items():
        md.append(f"| {ix} | {r['seconds']} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['rss_before_search_bytes'] / 2**20:.0f} "
                  f"| {100 * r['recall_at_k']:.1f} % | {100 * r['same_nearest']:.1f} % |")
    md += ["", f"The head pool as float32: {r0['n_head'] * dim * 4 / 2**20:.0f} MiB. {platform.platform()}; "
           f"{load.footer()}."]
    write_results(a.out, f"neighbours{'-' + a.tag if a.tag else ''}", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
