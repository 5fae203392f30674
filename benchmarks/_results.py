"""The options and the result layout every benchmark script here shares (benchmarks/README.md maps each result file
to the script and command that made it).

Options: ``parser`` makes the argparse parser with the common options (``--out``, ``--threads``, and where the script
needs them ``--vae`` and a dataset path, defaulting to the shared folder); the script adds its own; ``parse`` parses
and sets torch's thread count.

Results: a JSON file of figures and a markdown table beside it. Every JSON carries ``provenance(load, args)``: the
exact command line that made it, the git commit (and whether the checkout had uncommitted changes), the --threads
value, the machine and the load average at the start and at the end (on 2 cores a figure means little without the
load it was measured under); ``write_results`` adds the commit to the markdown.

    ap = parser(__doc__, threads=1, vae=True, data="isic2018_lt")   # --out, --threads, --vae, --data
    ap.add_argument("--repeats", type=int, default=3)                # the script's own options
    a = parse(ap)                                                     # also torch.set_num_threads(a.threads)
    load = Load()                                                     # at the start of the measured work
    ...
    res = {..., **provenance(load, a)}
    write_results(a.out, "codec-layout", res, md_lines + ["", f"{platform.platform()}; {load.footer()}."])
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project root
RESULTS = ROOT / "benchmarks" / "results"


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


# --- where the data and models are -------------------------------------------------------------------------------

def shared_dir() -> Path:
    """The shared folder of real datasets and models: ``$TAILFUSE_SHARED``, else ``../shared`` beside the project root
    (as the tests read it)."""
    return Path(os.environ.get("TAILFUSE_SHARED") or ROOT.parent / "shared").resolve()


def default_vae() -> str:
    """``$TAILFUSE_VAE``, else TAESD in the shared folder."""
    return os.environ.get("TAILFUSE_VAE") or str(shared_dir() / "models" / "taesd")


# --- options -------------------------------------------------------------------------------------------------------

def parser(doc: str | None, *, threads: int | None, threads_help: str | None = None, vae: bool = False,
           data: str | None = None, data_flag: str = "--data", data_help: str = "", out: bool = True,
           **kw) -> argparse.ArgumentParser:
    """The parser with the options every script has, before the script's own.

    ``--out``: the results folder (default benchmarks/results). ``--threads``: torch's thread count, set on purpose
    by ``parse`` and recorded; ``threads`` is the script's default (None: not set, torch's own default applies, as
    the script did before it had the option). ``vae``: add ``--vae`` (default ``$TAILFUSE_VAE``, else the shared
    folder's TAESD). ``data``: add ``data_flag`` defaulting to that path inside the shared folder's data/ (e.g.
    "isic2018_lt" or "isic2018_lt/manifest.csv"). ``out=False`` for a script that writes no result files. Other
    keyword arguments go to ArgumentParser."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    g = ap.add_argument_group("options every benchmark script has (benchmarks/_results.py)")
    if out:
        g.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    default = f"default {threads}" if threads is not None else "default: not set, torch's own default"
    g.add_argument("--threads", type=int, default=threads, metavar="N",
                   help=(threads_help or "torch threads of this process (torch.set_num_threads)") + f" ({default}); "
                        "recorded in the result")
    if vae:
        g.add_argument("--vae", default=default_vae(),
                       help="VAE folder or hub id (default: $TAILFUSE_VAE, else <shared>/models/taesd, where <shared> "
                            "is $TAILFUSE_SHARED or ../shared beside the project root)")
    if data:
        g.add_argument(data_flag, default=str(shared_dir() / "data" / data),
                       help=(data_help + " " if data_help else "") + f"(default <shared>/data/{data})")
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the options and set torch's thread count to --threads when it is given (or defaults to a number)."""
    args = ap.parse_args(argv)
    set_threads(getattr(args, "threads", None))
    return args


def set_threads(threads: int | None) -> None:
    """A chosen count, as ``--threads`` gives one to tailfuse: torch's threads, and the adapting stages (train,
    train-prior, evaluate, report) keep it instead of following the free cores."""
    if threads is not None:
        from tailfuse.threads import configure  # the installed package, as the scripts import it

        configure(threads)


def child_env(threads: int | None, env: dict | None = None) -> dict:
    """The environment for a process this script starts: OMP_NUM_THREADS (torch's default thread count) set to
    ``threads`` when it is not None; otherwise the environment as it is."""
    env = dict(os.environ if env is None else env)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# --- what made a result --------------------------------------------------------------------------------------------

def command_line(argv: list[str] | None = None) -> str:
    """This script's command line as typed, from the project root: 'python benchmarks/<script>.py <arguments>'."""
    argv = sys.argv if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(argv[0]).name}", *(shlex.quote(x) for x in argv[1:])])


def git_state() -> dict:
    """The checkout's commit and whether tracked files differ from it (None where git or the repository is absent)."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_uncommitted_changes": None if status is None else bool(status)}


def machine() -> dict:
    """Platform, CPU count and Python; torch's version and thread count when this process has imported torch."""
    out = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        out.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return out


def provenance(load: Load | None = None, args: argparse.Namespace | None = None) -> dict:
    """What every result JSON records about how it was made: the command line, the git commit, the working folder
    (relative paths in the command are relative to it), every option's value (defaults included), --threads, the
    machine and (with ``load``) the load averages at the start and now."""
    return {"command": command_line(), **git_state(), "cwd": os.getcwd(),
            **({"options": vars(args)} if args is not None else {}), "threads": getattr(args, "threads", None),
            "machine": machine(), **(load.record() if load else {})}


def commit_line(res: dict) -> str | None:
    """'Made at commit abc1234 (with uncommitted changes).' from a result's provenance, or None without one."""
    c = res.get("git_commit")
    if not c:
        return None
    return f"Made at commit {c[:10]}" + (" (with uncommitted changes)" if res.get("git_uncommitted_changes") else "") + "."


def write_results(out: str | Path, stem: str, res: dict, md: list[str], echo: bool = True, provenance_in: dict | None = None) -> None:
    """``out/stem.json`` (``res``) and ``out/stem.md`` (the lines ``md``, then the commit they were made at, read from
    ``provenance_in`` or else ``res``); prints the markdown when ``echo``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    line = commit_line(provenance_in if provenance_in is not None else res)
    md = list(md) + (["", line] if line else [])
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    if echo:
        print("\n".join(md))
