"""The Dockerfile's command and health check, exercised outside Docker (no engine runs in CI)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _exec_form(instruction: str) -> list[str]:
    match = re.search(rf"^{instruction}\s+(\[.*\])\s*$", DOCKERFILE, re.MULTILINE)
    assert match, f"{instruction} in exec form"
    return list(json.loads(match.group(1)))


def test_dockerfile_runs_serve_on_the_copied_example_config() -> None:
    assert _exec_form("ENTRYPOINT") == ["shadowproxy"]
    assert _exec_form("CMD") == ["serve", "--config", "/etc/shadowproxy/shadowproxy.toml"]
    assert "COPY config/shadowproxy.toml /etc/shadowproxy/shadowproxy.toml" in DOCKERFILE
    result = subprocess.run(
        [sys.executable, "-m", "shadowproxy", "check-config", str(ROOT / "config" / "shadowproxy.toml")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_runs_as_non_root_and_exposes_both_ports() -> None:
    assert re.search(r"^USER\s+(?!root|0\b)\S+", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^EXPOSE\s+8080\s+9090\s*$", DOCKERFILE, re.MULTILINE)


def test_healthcheck_command_is_valid_python_probing_healthz() -> None:
    match = re.search(r'CMD \["python", "-c", "(.*)"\]\s*$', DOCKERFILE, re.MULTILINE)
    assert match, "HEALTHCHECK CMD in exec form"
    code = match.group(1)
    assert "/healthz" in code
    compile(code, "<healthcheck>", "exec")


# -- the compiled hot path (setup.py) ----------------------------------------------------------

PROBE = "import shadowproxy, sys; sys.stdout.write(str(shadowproxy.compiled()))"


def test_setup_compiles_the_modules_the_package_lists() -> None:
    import shadowproxy

    spec = importlib.util.spec_from_file_location("shadowproxy_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    source = (ROOT / "setup.py").read_text().replace("setup(ext_modules=ext_modules())", "")
    namespace: dict[str, object] = {"__file__": str(ROOT / "setup.py"), "__name__": "shadowproxy_setup"}
    exec(compile(source, str(ROOT / "setup.py"), "exec"), namespace)
    paths = namespace["compiled_sources"]()  # type: ignore[operator]
    assert [p.removesuffix(".py").replace("/", ".") for p in paths] == list(shadowproxy.COMPILED_MODULES)
    assert all((ROOT / p).is_file() for p in paths)


def _built() -> bool:
    import shadowproxy
    from shadowproxy._build import _built as built

    return all(built(name) is not None for name in shadowproxy.COMPILED_MODULES)


def _probe(pythonpath: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SHADOWPROXY_PURE_PYTHON"}
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          cwd=pythonpath, env={**environ, "PYTHONPATH": str(pythonpath), **env})


@pytest.mark.skipif(not _built(), reason="hot path not compiled in this checkout (no C compiler, or pure install)")
def test_built_modules_run_compiled_unless_asked_or_stale(tmp_path: Path) -> None:
    # A copy of the checkout (package, its builds, the shared library, pyproject.toml): editing a
    # source there must not touch the tree the other tests import.
    shutil.copytree(ROOT / "shadowproxy", tmp_path / "shadowproxy", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for lib in ROOT.glob("shadowproxy__mypyc*"):
        shutil.copy(lib, tmp_path)
    fresh = _probe(tmp_path)
    assert (fresh.stdout, fresh.stderr) == ("True", "")
    asked = _probe(tmp_path, SHADOWPROXY_PURE_PYTHON="1")
    assert (asked.stdout, asked.stderr) == ("False", "")
    source = tmp_path / "shadowproxy" / "shadow" / "proxy.py"
    builds = [*source.parent.glob("proxy.*.so"), *tmp_path.glob("shadowproxy__mypyc*")]
    later = max(lib.stat().st_mtime for lib in builds) + 10
    os.utime(source, (later, later))
    stale = _probe(tmp_path)
    assert stale.stdout == "False"
    assert "shadowproxy/shadow/proxy.py changed since it was compiled" in stale.stderr


def test_the_build_sees_the_runtime_dependencies_mypyc_type_checks_against() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = pyproject["build-system"]["requires"]
    assert any(req.startswith("mypy") for req in build)
    assert set(pyproject["project"]["dependencies"]) <= set(build)


def test_version_says_how_the_hot_path_runs() -> None:
    environ = {k: v for k, v in os.environ.items() if k != "SHADOWPROXY_PURE_PYTHON"}
    run = [sys.executable, "-m", "shadowproxy", "--version"]
    plain = subprocess.run(run, capture_output=True, text=True, check=True, env=environ)
    mode = "compiled" if _built() else "pure Python"
    assert plain.stdout == f"shadowproxy 0.1.0 (hot path: {mode})\n"
    asked = subprocess.run(run, capture_output=True, text=True, check=True,
                           env={**environ, "SHADOWPROXY_PURE_PYTHON": "1"})
    assert asked.stdout == "shadowproxy 0.1.0 (hot path: pure Python)\n"


# -- the live page's files ship in the wheel ------------------------------------------------------

def test_the_wheel_ships_the_live_page_and_serves_it(tmp_path: Path) -> None:
    import urllib.request
    import zipfile

    from tests.helpers import free_port, write_config

    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, check=False, env={**environ, "SHADOWPROXY_PURE_PYTHON": "1"},
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("shadowproxy-*.whl")
    page = ROOT / "shadowproxy" / "control" / "page"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {f"shadowproxy/control/page/{p.name}" for p in page.iterdir()} <= names
        archive.extractall(tmp_path / "site")  # a pure wheel installs as its files on the path
    listen, admin = free_port(), free_port()
    config = write_config(tmp_path / "c.toml", "http://127.0.0.1:9", listen_port=listen, admin_port=admin)
    proc = subprocess.Popen(
        [sys.executable, "-m", "shadowproxy", "serve", "--config", str(config)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**environ, "PYTHONPATH": str(tmp_path / "site"), "SHADOWPROXY_PURE_PYTHON": "1"},
    )
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline()
        base = f"http://127.0.0.1:{admin}"
        for path, name in (("/", "index.html"), ("/page/page.js", "page.js"), ("/page/page.css", "page.css")):
            with urllib.request.urlopen(base + path, timeout=5) as answer:
                assert answer.read() == (page / name).read_bytes(), path
                assert "script-src 'self'" in answer.headers["Content-Security-Policy"]
        version = subprocess.run(
            [sys.executable, "-c", "import shadowproxy; print(shadowproxy.__file__)"], capture_output=True,
            text=True, check=True, cwd=tmp_path, env={**environ, "PYTHONPATH": str(tmp_path / "site")},
        )
        assert version.stdout.startswith(str(tmp_path / "site"))
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
