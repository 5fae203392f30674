"""tailfuse: synthetic images for the rare classes of long-tailed image datasets.

Stages (see the README): encode -> train -> fuse -> decode -> evaluate, all reading and writing one run folder.
"""

__version__ = "0.1.0"

from .errors import TailfuseError

__all__ = ["TailfuseError", "__version__"]
