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


def _stale_build() -> str | None:
    """In a source checkout installed with `pip install -e .`, the first compiled module whose
    source changed since the build (an edit would otherwise be ignored in favour of the build)."""
    if not (_HERE.parent / "pyproject.toml").exists():
        return None  # an installed package: its files are as built, whatever their times say
    # The code is in the group library beside the package; a module's own .so is a shim that an
    # incremental build (`python setup.py build_ext --inplace`) leaves alone when it is unchanged.
    group = max((p.stat().st_mtime for p in _HERE.parent.glob("shadowproxy__mypyc*")), default=0.0)
    for name in COMPILED_MODULES:
        built = _built(name)
        if built is not None and _source(name).stat().st_mtime > max(built.stat().st_mtime, group):
            return str(_source(name).relative_to(_HERE.parent))
    return None


# All or none run from source: the compiled modules call each other natively, so a module from
# source among built ones would not be the class the others expect.
if os.environ.get("SHADOWPROXY_PURE_PYTHON", "") not in ("", "0"):
    sys.meta_path.insert(0, _FromSource())
elif (_stale := _stale_build()) is not None:
    print(f"shadowproxy: running the hot path as Python: {_stale} changed since it was compiled "
          "(`pip install -e .` compiles it again)", file=sys.stderr)
    sys.meta_path.insert(0, _FromSource())


def compiled() -> bool:
    """Whether the hot path runs compiled (mypyc) in this process."""
    module = sys.modules.get("shadowproxy.proxy") or importlib.import_module("shadowproxy.proxy")
    return not str(module.__file__).endswith(".py")
