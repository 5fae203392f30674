"""The budget rule: how many new samples each tail label gets. One rule for fuse, evaluate and the Python API.

It takes imbalanced-learn's ``sampling_strategy`` shapes, restricted to the tail labels (head labels never get
samples):

* ``"auto"``: top each tail label up to the median training count of the head labels, at most ``max_ratio`` times
  its own real count (default 5, so a label with 2 real images is not asked for 300 copies of them);
* a float r > 0: top each tail label up to r times the median head-label count (same cap);
* a dict {label: total}: the number of training samples the label should have afterwards (imbalanced-learn's
  meaning); a tail label left out gets nothing;
* a callable ``f(train_counts) -> dict``: the same dict, computed from the real training counts.

The command-line flags map onto it: ``--per-class N`` is N new samples for every tail label, ``--balance-to M`` is
the dict {label: M}. A label without a training positive gets 0 (nothing to start from).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .errors import TailfuseError


def per_class_strategy(n: int) -> Callable[[dict], dict]:
    """``--per-class N``: N new samples for every tail label, as a sampling strategy."""
    if n < 0:
        raise TailfuseError(f"--per-class {n}: give a number >= 0.")

    def f(counts: dict) -> dict:
        return {lab: counts[lab] + n for lab in counts}

    f.rule = f"per_class = {n} new samples per tail label"
    return f


def validate_strategy(strategy, max_ratio: float = 5.0) -> None:
    """Raise a clear error for a strategy that cannot be used (before any work starts)."""
    if max_ratio < 1:
        raise TailfuseError("--max-ratio must be >= 1.")
    if strategy == "auto" or callable(strategy):
        return
    if isinstance(strategy, bool):
        raise TailfuseError(f"sampling strategy {strategy!r}: give 'auto', a positive number, a dict or a callable.")
    if isinstance(strategy, (int, float)):
        if not strategy > 0:
            raise TailfuseError(f"sampling strategy {strategy}: a ratio must be > 0.")
        return
    if isinstance(strategy, dict):
        bad = {k: v for k, v in strategy.items() if not isinstance(v, (int, np.integer)) or v < 0}
        if bad:
            raise TailfuseError(f"sampling strategy: target counts must be integers >= 0 (got {bad}).")
        return
    raise TailfuseError(f"sampling strategy {strategy!r}: give 'auto', a positive number, a dict {{label: total}} or a "
                        "callable.")


def budget(train_counts: dict[str, int], head: list[str], tail: list[str], strategy="auto",
           max_ratio: float = 5.0) -> dict:
    """New samples per tail label under ``strategy``; returns {"rule", "target", "per_label"}."""
    validate_strategy(strategy, max_ratio)
    counts = {lab: int(train_counts[lab]) for lab in tail}
    if strategy == "auto" or isinstance(strategy, (int, float)):
        if not head:
            raise TailfuseError("the run has no head labels; give --balance-to or --per-class.")
        median = float(np.median([train_counts[lab] for lab in head]))
        r = 1.0 if strategy == "auto" else float(strategy)
        target = int(round(r * median))
        per = {lab: (max(0, min(target - c, math.ceil((max_ratio - 1) * c))) if c > 0 else 0) for lab, c in counts.items()}
        how = "median head-label train count" if strategy == "auto" else f"{r:g} x the median head-label train count"
        return {"rule": f"top each tail label up to T = {target} ({how}), at most {max_ratio:g}x its real train count",
                "target": target, "max_ratio": max_ratio, "per_label": per}
    totals = strategy(dict(counts)) if callable(strategy) else strategy
    validate_strategy(dict(totals))
    unknown = [lab for lab in totals if lab not in counts]
    if unknown:
        raise TailfuseError(f"sampling strategy names {', '.join(map(str, unknown))}, which are not tail labels "
                            f"(tail: {', '.join(tail)}).")
    per = {lab: (max(0, int(totals[lab]) - c) if (lab in totals and c > 0) else 0) for lab, c in counts.items()}
    rule = getattr(strategy, "rule", None) or ("a callable" if callable(strategy) else "target counts per tail label")
    return {"rule": rule + " (0 for a label without training positives)", "target": None, "per_label": per}


def strategy_from_flags(per_class: int | None = None, balance_to: int | None = None, strategy=None, default=None):
    """The strategy the command-line flags ask for (at most one of them)."""
    given = [x is not None for x in (per_class, balance_to, strategy)]
    if sum(given) > 1:
        raise TailfuseError("give only one of --per-class, --balance-to and --sampling-strategy.")
    if per_class is not None:
        return per_class_strategy(int(per_class))
    if balance_to is not None:
        if balance_to < 0:
            raise TailfuseError("--balance-to must be >= 0.")
        b = int(balance_to)

        def f(counts: dict) -> dict:
            return {lab: b for lab in counts}

        f.rule = f"balance_to = {b}: top each tail label up to {b} training samples"
        return f
    if strategy is not None:
        return parse_strategy(strategy)
    return default


def parse_strategy(value):
    """'auto', a number, or a YAML/JSON mapping {label: total} given as text."""
    if isinstance(value, str):
        v = value.strip()
        if v == "auto":
            return v
        try:
            return float(v)
        except ValueError:
            import yaml

            try:
                parsed = yaml.safe_load(v)
            except yaml.YAMLError:
                parsed = None
            if isinstance(parsed, dict):
                return parsed
            raise TailfuseError(f"--sampling-strategy '{value}': give auto, a number, or a mapping like "
                                "'{BCC: 150, DF: 100}'.") from None
    return value
