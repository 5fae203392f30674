"""What the benchmark scripts here write: a JSON file of figures and a markdown table beside it, both carrying the
machine and the load average at the start and at the end (on 2 cores a figure means little without the load it was
measured under).

    load = Load()                      # at the start of the measured work
    ...
    res = {..., "machine": machine(), **load.record()}
    write_results(out, "codec-layout", res, md_lines + ["", f"{platform.platform()}; {load.footer()}."])
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def _fmt(values) -> str:
    return ", ".join(f"{x:.1f}" for x in values)


class Load:
    """The 1-, 5- and 15-minute load averages when it was made (the start) and when asked again (the end)."""

    def __init__(self, start: tuple[float, float, float] | None = None):
        self.start = tuple(start) if start is not None else os.getloadavg()

    def record(self) -> dict:
        return {"load_average_at_start": list(self.start), "load_average_at_end": list(os.getloadavg())}

    def footer(self, end=None) -> str:
        """'load average at the start a, b, c, at the end d, e, f' (the end: now, unless given)."""
        return f"load average at the start {_fmt(self.start)}, at the end {_fmt(end if end is not None else os.getloadavg())}"


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count()}


def write_results(out: str | Path, stem: str, res: dict, md: list[str], echo: bool = True) -> None:
    """``out/stem.json`` (``res``) and ``out/stem.md`` (the lines ``md``); prints the markdown when ``echo``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    if echo:
        print("\n".join(md))
