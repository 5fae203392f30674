"""Argparse pieces shared by `tailfuse.cli` and the sub-commands defined elsewhere (evaluation.cli_args): both
import them from here, so neither imports the other back."""

from __future__ import annotations

import argparse


THREADS_HELP = ("a fixed count of CPU threads for each process's torch work (default: OMP_NUM_THREADS, else every "
                "core, and train, train-prior, evaluate and report follow the cores other jobs leave free; with "
                "--processes N, each process takes its share); recorded in every stage's record")


def add_verbosity_args(p: argparse.ArgumentParser) -> None:
    """-q / -v / --processes / --threads on a sub-command (absent from the namespace unless given: the top-level flags stand)."""
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars, warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug messages too")
    p.add_argument("--processes", type=int, default=argparse.SUPPRESS,
                   help="run the stage in N processes (each takes every N-th shard; output identical to one process)")
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS, help=THREADS_HELP)


def csv_list(s: str) -> list[str]:
    """A comma-separated option value as a list (blanks dropped)."""
    return [x.strip() for x in s.split(",") if x.strip()]


def float_csv(s: str) -> list[float]:
    try:
        return [float(x) for x in csv_list(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a comma-separated list of numbers") from None


def int_csv(s: str) -> list[int]:
    try:
        return [int(x) for x in csv_list(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a comma-separated list of integers") from None
