"""shadowproxy: a shadow-mode reverse proxy for ML model endpoints."""

from __future__ import annotations

import os

__version__ = "0.1.0"

# numpy's OpenBLAS starts a thread per core that spins after use; the proxy does no linear
# algebra (drift bins with searchsorted/bincount), and that thread would take CPU from the event
# loop. Set before anything imports numpy; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from shadowproxy._build import COMPILED_MODULES, choose_build, compiled  # noqa: E402

choose_build()

__all__ = ["COMPILED_MODULES", "__version__", "compiled"]
