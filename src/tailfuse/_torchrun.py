"""`python -m tailfuse._torchrun ...`: torch.distributed.run for `tailfuse --processes N`, which ends with status 130
and no traceback when a stop signal reaches it (it has then stopped its workers, and they said what they kept)."""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException:
        sys.exit(130)
