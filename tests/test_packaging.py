"""The Dockerfile's command and health check, exercised outside Docker (no engine runs in CI)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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
