"""Expert review of a synthetic set: decisions in, accepted manifest out (`tailfuse review`).

A reviewer marks images accept / reject in the HTML report (`tailfuse report`) and exports a CSV; `tailfuse review
--decisions <csv>` checks it and records it in the set:

  <set>/review/decisions.csv   the latest decision per image: synth_id, decision, reviewer, decided_at, imported_at
  <set>/review/history.csv     every imported row, in order (nothing is ever overwritten or lost)
  <set>/manifest.accepted.csv  the set's manifest rows of the accepted images (the input's own layout)

Images are never deleted. The CSV must name the set it was made for (``set_id``, written by the report: a hash of
the set's fuse and decode records, so a file of another run or another set is refused), every ``synth_id`` must
be an image of the set, none may appear twice, and ``decision`` must be accept or reject. A bad file changes
nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from .config import stable_hash
from .errors import TailfuseError, q
from .latentset import LatentSet
from .store import RunStore, write_csv_atomic

log = logging.getLogger("tailfuse")
DECISIONS = ("accept", "reject")
COLUMNS = ["synth_id", "decision", "reviewer", "decided_at"]


def set_id(store: RunStore, name: str) -> str:
    """The identity of a decoded set: its latent set's and its decode's records."""
    ls = LatentSet.open(store, name)
    dec = store.stage(f"decode-{name}")
    if not dec or dec.get("status") != "done":
        raise TailfuseError(f"the set '{name}' of {store.root} is not decoded; run `tailfuse decode --run {q(store.root)} "
                            f"--name {q(name)}` first.")
    return stable_hash({"set": ls.record["config_hash"], "decode": dec["config_hash"]})[:16]


def set_table(store: RunStore, name: str) -> pd.DataFrame:
    """The set's images that are in its manifest (selected ones), with synth_id and path, in manifest order."""
    folder = store.root / name
    prov = pd.read_json(folder / "provenance.jsonl", lines=True)
    if "selected" in prov.columns:
        prov = prov[prov["selected"].astype(bool)].reset_index(drop=True)
    return prov


def load_decisions(store: RunStore, name: str) -> pd.DataFrame:
    p = store.root / name / "review" / "decisions.csv"
    if not p.is_file():
        return pd.DataFrame(columns=[*COLUMNS, "imported_at"])
    return pd.read_csv(p, dtype={"reviewer": str, "decided_at": str})


def run_review(run: str, decisions: str, name: str = "synthetic") -> dict:
    store = RunStore(run)
    store.require("encode")
    sid = set_id(store, name)
    path = Path(decisions)
    if not path.is_file():
        raise TailfuseError(f"decisions file {path} not found.")
    try:
        d = pd.read_csv(path, dtype={"reviewer": str, "decided_at": str, "set_id": str, "decision": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise TailfuseError(f"decisions file {path} cannot be read as CSV ({e}).") from None
    missing = [c for c in ("set_id", "synth_id", "decision") if c not in d.columns]
    if missing:
        raise TailfuseError(f"decisions file {path} lacks column(s) {', '.join(missing)}; export it from the report "
                            "(`tailfuse report`), which writes set_id, synth_id, decision, reviewer, decided_at.")
    if d.empty:
        raise TailfuseError(f"decisions file {path} holds no decision.")
    other = sorted(set(d["set_id"].astype(str)) - {sid})
    if other:
        raise TailfuseError(f"decisions file {path} was made for another set (set_id {', '.join(other)}; this is "
                            f"'{name}' of {store.root}, set_id {sid}). Nothing was changed.")
    ids = pd.to_numeric(d["synth_id"], errors="coerce")
    if ids.isna().any():
        raise TailfuseError(f"decisions file {path}: synth_id must be whole numbers (rows "
                            f"{', '.join(str(i + 2) for i in ids.index[ids.isna()][:5])}). Nothing was changed.")
    d["synth_id"] = ids.astype(int)
    dup = d["synth_id"][d["synth_id"].duplicated()].unique()
    if len(dup):
        raise TailfuseError(f"decisions file {path}: image(s) {', '.join(map(str, dup[:10]))} appear more than once. "
                            "Nothing was changed.")
    table = set_table(store, name)
    unknown = sorted(set(d["synth_id"]) - set(table["synth_id"].astype(int)))
    if unknown:
        raise TailfuseError(f"decisions file {path}: synth_id(s) {', '.join(map(str, unknown[:10]))} are not images "
                            f"of the set '{name}'. Nothing was changed.")
    dec = d["decision"].astype(str).str.strip().str.lower()
    bad = ~dec.isin(DECISIONS)
    if bad.any():
        raise TailfuseError(f"decisions file {path}: decision must be accept or reject (got "
                            f"{', '.join(sorted(set(d['decision'][bad].astype(str)))[:5])}). Nothing was changed.")
    d["decision"] = dec
    for c in ("reviewer", "decided_at"):
        if c not in d.columns:
            d[c] = ""
    d["reviewer"] = d["reviewer"].fillna("")
    d["decided_at"] = d["decided_at"].fillna("")
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    new = d[COLUMNS].assign(imported_at=now)
    folder = store.root / name / "review"
    old = load_decisions(store, name)
    merged = pd.concat([old[~old["synth_id"].astype(int).isin(new["synth_id"])], new], ignore_index=True)
    merged = merged.sort_values("synth_id").reset_index(drop=True)
    hist_path = folder / "history.csv"
    history = pd.read_csv(hist_path, dtype=str) if hist_path.is_file() else pd.DataFrame()
    write_csv_atomic(hist_path, pd.concat([history, new.astype(str)], ignore_index=True))
    write_csv_atomic(folder / "decisions.csv", merged)
    accepted = set(merged.loc[merged["decision"] == "accept", "synth_id"].astype(int))
    man = pd.read_csv(store.root / name / "manifest.csv")
    keep = table["synth_id"].astype(int).isin(accepted).to_numpy()
    if len(man) != len(table):
        raise TailfuseError(f"{store.root / name}: manifest.csv and provenance.jsonl differ in length; decode again.")
    write_csv_atomic(store.root / name / "manifest.accepted.csv", man[keep])
    out = {"set": name, "set_id": sid, "imported": len(new), "accepted": int(keep.sum()),
           "rejected": int((merged["decision"] == "reject").sum()), "undecided": int(len(table) - len(merged)),
           "manifest": str(store.root / name / "manifest.accepted.csv")}
    log.info(f"review: {len(new)} decisions recorded for '{name}' ({out['accepted']} accepted, {out['rejected']} "
             f"rejected, {out['undecided']} not reviewed); accepted manifest: {out['manifest']}")
    return out
