"""Dataclass configs, one per concern; YAML in, resolved ``run.yaml`` out.

The stages' dataclasses are defined in ``stage_config.py`` (EvaluateConfig in ``evaluation/config.py``) and
importable from here; this module maps them to YAML sections, resolves and hashes them.

Precedence: built-in defaults < the YAML file given with ``--config`` < command-line flags.
The resolved configuration of every stage that ran is written to ``<run>/run.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .errors import TailfuseError
from .evaluation.config import EvaluateConfig  # its own module: the evaluate package owns it
from .stage_config import (DataConfig, DecodeConfig, EncodeConfig, FuseConfig, PriorConfig, RefineConfig,
                           TrainConfig, VAEConfig)

SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "vae": VAEConfig,
    "encode": EncodeConfig,
    "train": TrainConfig,
    "fuse": FuseConfig,
    "decode": DecodeConfig,
    "prior": PriorConfig,
    "refine": RefineConfig,
    "evaluate": EvaluateConfig,
}


def register_section(name: str, cls: type) -> None:
    """Later stages add their own config section (train, fuse, ...)."""
    SECTIONS[name] = cls


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def update(obj: Any, values: dict, where: str) -> Any:
    """Return a copy of dataclass ``obj`` with ``values`` applied; unknown keys are errors."""
    known = {f.name: f for f in fields(obj)}
    clean = {}
    for key, value in values.items():
        k = key.replace("-", "_")
        if k not in known:
            raise TailfuseError(
                f"{where}: unknown setting '{key}'. Known settings: {', '.join(sorted(known))}."
            )
        clean[k] = value
    return dataclasses.replace(obj, **clean)


def load_yaml(path: str | Path) -> dict[str, dict]:
    p = Path(path)
    if not p.is_file():
        raise TailfuseError(f"config file {p} not found.")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise TailfuseError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise TailfuseError(f"config file {p} must hold a mapping of sections ({', '.join(SECTIONS)}).")
    for name, body in doc.items():
        if name not in SECTIONS:
            raise TailfuseError(f"config file {p}: unknown section '{name}'. Known: {', '.join(SECTIONS)}.")
        if body is not None and not isinstance(body, dict):
            raise TailfuseError(f"config file {p}: section '{name}' must be a mapping.")
    return {k: (v or {}) for k, v in doc.items()}


def resolve(section: str, yaml_doc: dict[str, dict] | None, cli_values: dict[str, Any]) -> Any:
    """Defaults < YAML section < CLI values that were actually given (not None)."""
    cfg = SECTIONS[section]()
    if yaml_doc and section in yaml_doc:
        cfg = update(cfg, yaml_doc[section], f"config section '{section}'")
    given = {k: v for k, v in cli_values.items() if v is not None}
    known = {f.name for f in fields(cfg)}
    cfg = update(cfg, {k: v for k, v in given.items() if k in known}, "command line")
    return cfg


def hashed_settings(cfg: Any, exclude: tuple = ()) -> dict:
    """A config's settings as they enter its stage's config hash: ``exclude`` left out, and fields listed in the
    class's ``HASH_OPTIONAL`` left out while they hold the default that reproduces the behaviour from before they
    existed."""
    optional = getattr(type(cfg), "HASH_OPTIONAL", {})
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in exclude and not (k in optional and v == optional[k])}


def stable_hash(obj: Any) -> str:
    """SHA-256 of a JSON-serialisable object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
