"""shadowproxy: a shadow-mode reverse proxy for ML model endpoints."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

__version__ = "0.1.0"

# numpy's OpenBLAS starts a thread per core that spins after use; the proxy does no linear
# algebra (drift bins with searchsorted/bincount), and on a 2-core box that thread took CPU from
# the event loop. Set before anything imports numpy; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The modules setup.py compiles with mypyc (keep the two lists equal; a test checks).
COMPILED_MODULES = (
    "shadowproxy.http.writes",
    "shadowproxy.http.server",
    "shadowproxy.http.upstream",
    "shadowproxy.proxy",
    "shadowproxy.mirror",
    "shadowproxy.stats",
    "shadowproxy.sampling",
    "shadowproxy.hotmetrics",
    "shadowproxy.observers",
    "shadowproxy.store",
    "shadowproxy.audit",
    "shadowproxy.compare",
    "shadowproxy.presets",
    "shadowproxy.drift",
    "shadowproxy.storedb",
)

_HERE = Path(__file__).resolve().parent


def _source(name: str) -> Path:
    return _HERE.joinpath(*name.split(".")[1:]).with_suffix(".py")


def _built(name: str) -> Path | None:
    source = _source(name)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        built = source.with_suffix(suffix)
        if built.exists():
            return built
    return None


class _FromSource(importlib.abc.MetaPathFinder):
    """Imports the compiled modules from their .py files even where a build sits beside them."""

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, _source(fullname))


def _pure_python_reason() -> str | None:
    """Why this process runs the compiled modules as Python even though they were built (None:
    it does not). All or none: the compiled modules call each other natively, so a module from
    source among built ones would not be the class the others expect."""
    if os.environ.get("SHADOWPROXY_PURE_PYTHON", "") not in ("", "0"):
        return "SHADOWPROXY_PURE_PYTHON is set"
    if not (_HERE.parent / "pyproject.toml").exists():
        return None  # an installed package: its files are as built, whatever their times say
    # A source checkout installed with `pip install -e .`: a module edited since the build would
    # otherwise be ignored in favour of the stale build.
    for name in COMPILED_MODULES:
        built = _built(name)
        if built is not None and _source(name).stat().st_mtime > built.stat().st_mtime:
            return f"{_source(name).relative_to(_HERE.parent)} changed since it was compiled"
    return None


_reason = _pure_python_reason()
if _reason is not None:
    if any(_built(name) is not None for name in COMPILED_MODULES) and "SHADOWPROXY_PURE_PYTHON" not in _reason:
        print(f"shadowproxy: running the hot path as Python: {_reason} (`pip install -e .` compiles it "
              "again)", file=sys.stderr)
    sys.meta_path.insert(0, _FromSource())


def compiled() -> bool:
    """Whether the hot path runs compiled (mypyc) in this process."""
    module = sys.modules.get("shadowproxy.proxy") or importlib.import_module("shadowproxy.proxy")
    return not str(module.__file__).endswith(".py")
