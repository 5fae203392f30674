"""tailfuse: synthetic images for the rare classes of long-tailed image datasets.

Stages (see the README): encode -> train -> fuse -> [refine] -> decode -> evaluate, all reading and writing one run
folder. From Python::

    import tailfuse
    result = tailfuse.run(data="manifest.csv", run="runs/isic", vae="path/to/taesd", per_class=100)
    X_res, y_res = tailfuse.TailFuseSampler(vae="path/to/taesd").fit_resample(paths, y)
    ds = tailfuse.datasets.AugmentedImageDataset("runs/isic", synthetic_prob=0.3)
    table = tailfuse.evaluate("runs/isic", arms=["real", "oversample", "tailfuse"]).table()
"""

from ._version import __version__
from .errors import TailfuseError

__all__ = ["TailfuseError", "TailFuseSampler", "run", "evaluate", "datasets", "__version__"]


def __getattr__(name):  # the API imports torch and friends: only when asked for
    if name in ("TailFuseSampler", "run", "evaluate", "RunResult", "EvaluationResult"):
        from . import api

        return getattr(api, name)
    if name == "datasets":  # import_module: `from . import datasets` would ask this __getattr__ again, endlessly
        import importlib

        return importlib.import_module(".datasets", __name__)
    raise AttributeError(f"module 'tailfuse' has no attribute {name!r}")
