"""Build: the hot path's modules compiled to C with mypyc; everything else stays Python.

The project's metadata lives in pyproject.toml; this file only adds the compiled modules, which
setuptools cannot declare there. mypyc turns the type-annotated classes of the request path into
native classes (attributes in C structs, direct calls between methods); docs/performance.md's
row "Python per request, production only" shows what that is worth.

    SHADOWPROXY_PURE_PYTHON=1 pip install -e .   # build nothing: every module runs as Python

Without a C compiler the build falls back to pure Python with a warning. The same modules run
either way and the test suite runs in both modes (.ci/run). The list is `COMPILED_MODULES` in
shadowproxy/_build.py, read here from that file's source; `shadowproxy.compiled()` tells which mode
a process runs in.
"""

from __future__ import annotations

import ast
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from setuptools import setup


def compiled_sources() -> list[str]:
    """`COMPILED_MODULES` from shadowproxy/_build.py, as source paths (the package is not importable
    while it is being built)."""
    tree = ast.parse(Path(__file__).with_name("shadowproxy").joinpath("_build.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "COMPILED_MODULES" for t in node.targets):
            names = ast.literal_eval(node.value)
            return [name.replace(".", "/") + ".py" for name in names]
    raise RuntimeError("shadowproxy/_build.py defines no COMPILED_MODULES")


def can_compile() -> str | None:
    """None when a C compiler builds against this Python's headers, else why not. Checked first
    because a half-built group (the shims without their shared library) would not import."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler, get_python_inc

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write("#include <Python.h>\nint probe(void) { return Py_IsInitialized(); }\n")
        compiler = new_compiler()
        customize_compiler(compiler)
        try:
            compiler.compile([source], output_dir=tmp, include_dirs=[get_python_inc()])
        except Exception as exc:
            return f"no working C compiler with Python headers: {exc}"
    return None


def ext_modules() -> list[Any]:
    if os.environ.get("SHADOWPROXY_PURE_PYTHON", "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        why: str | None = f"mypyc missing: {exc}"
    else:
        why = can_compile()
    if why is not None:  # a pure-Python install still works, only slower
        print(f"shadowproxy: not compiling the hot path ({why}); running as pure Python", file=sys.stderr)
        return []
    return list(mypycify(compiled_sources(), opt_level="3", group_name="shadowproxy"))


setup(ext_modules=ext_modules())
