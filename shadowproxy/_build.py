"""Which build of the hot path runs: compiled with mypyc, or the same modules as Python.

`setup.py` compiles `COMPILED_MODULES`; `choose_build()`, called once when the package is
imported, makes every one of them run from source when `SHADOWPROXY_PURE_PYTHON` is set or when a
source file changed after the build of an editable install.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

# The modules every proxied, mirrored or observed request runs through, compiled to C with mypyc
# by setup.py (which reads this tuple from this file's source, without importing the package).
# The control plane (startup, config, admin, report) and the stand-in models stay Python. The
# rules for code in these modules are in CONTRIBUTING.md.
COMPILED_MODULES = (
    "shadowproxy.http.writes",
    "shadowproxy.http.server",
    "shadowproxy.http.upstream",
    "shadowproxy.shadow.proxy",
    "shadowproxy.shadow.mirror",
    "shadowproxy.shadow.sampling",
    "shadowproxy.shadow.slices",
    "shadowproxy.shadow.hotmetrics",
    "shadowproxy.shadow.observers",
    "shadowproxy.shadow.llm",
    "shadowproxy.judging.stats",
    "shadowproxy.judging.slicestats",
    "shadowproxy.judging.compare",
    "shadowproxy.judging.presets",
    "shadowproxy.judging.sse",
    "shadowproxy.store.writer",
    "shadowproxy.store.records",
    "shadowproxy.store.database",
    "shadowproxy.drift.monitor",
)

_HERE = Path(__file__).resolve().parent  # the package directory


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


def choose_build() -> None:
    """Run the compiled modules from source when asked to or when their build is stale.

    All or none run from source: the compiled modules call each other natively, so a module from
    source among built ones would not be the class the others expect.
    """
    if os.environ.get("SHADOWPROXY_PURE_PYTHON", "") not in ("", "0"):
        sys.meta_path.insert(0, _FromSource())
    elif (stale := _stale_build()) is not None:
        print(f"shadowproxy: running the hot path as Python: {stale} changed since it was compiled "
              "(`pip install -e .` compiles it again)", file=sys.stderr)
        sys.meta_path.insert(0, _FromSource())


def compiled() -> bool:
    """Whether the hot path runs compiled (mypyc) in this process."""
    module = sys.modules.get("shadowproxy.shadow.proxy") or importlib.import_module("shadowproxy.shadow.proxy")
    return not str(module.__file__).endswith(".py")
