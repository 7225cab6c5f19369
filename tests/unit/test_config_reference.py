"""docs/configuration.md and config/shadowproxy.toml stay complete against the config's own
definitions: every key of every section, with its default."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from typing import Any

import pytest

from shadowproxy import config as config_module
from tests.helpers import ROOT

SECTIONS: dict[str, type[Any]] = config_module._SECTIONS
REFERENCE = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "config" / "shadowproxy.toml"
REQUIRED = object()


def defaults(cls: type[Any]) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = REQUIRED
    return out


def as_toml(value: object) -> object:
    if isinstance(value, config_module.Secret):
        return value.value  # the default is a secret written out, not `env:` or `file:`
    return list(value) if isinstance(value, tuple) else value


def documented_rows() -> dict[str, dict[str, str]]:
    """`## [section]` -> {key: default cell} from the first table under each heading."""
    rows: dict[str, dict[str, str]] = {}
    section = None
    for line in REFERENCE.read_text().splitlines():
        heading = re.match(r"^## \[(\w+)\]\s*$", line)
        if heading:
            section = heading.group(1)
            rows[section] = {}
        elif line.startswith("## "):
            section = None
        elif section is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key = re.fullmatch(r"`(\w+)`", cells[0]) if len(cells) >= 2 else None
            if key:
                rows[section].setdefault(key.group(1), cells[1])
    return rows


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_reference_lists_every_key_with_its_default(section: str) -> None:
    rows = documented_rows()
    assert section in rows, f"docs/configuration.md has no '## [{section}]' table"
    for key, default in defaults(SECTIONS[section]).items():
        assert key in rows[section], f"docs/configuration.md: [{section}] {key} is not documented"
        cell = rows[section][key].strip("`")
        if default is REQUIRED:
            assert cell == "required", f"[{section}] {key}: documented as {cell!r}"
        elif default is None:
            assert cell == "unset", f"[{section}] {key}: documented as {cell!r}"
        else:
            documented = tomllib.loads(f"v = {cell}")["v"]
            assert documented == as_toml(default), f"[{section}] {key}: documented {cell}, code {default!r}"


def test_reference_documents_no_key_the_config_does_not_have() -> None:
    for section, keys in documented_rows().items():
        assert section in SECTIONS, f"docs/configuration.md documents an unknown section [{section}]"
        unknown = set(keys) - set(defaults(SECTIONS[section]))
        assert not unknown, f"docs/configuration.md: [{section}] documents unknown keys {sorted(unknown)}"


def test_example_config_lists_every_key_with_its_default() -> None:
    # Optional tables and unset keys are shown commented out; read them as if they were not.
    text = re.sub(r"(?m)^# ?(\[\w+\]|\w+ = )", r"\1", EXAMPLE.read_text())
    example = tomllib.loads(text)
    for section, cls in SECTIONS.items():
        assert section in example, f"config/shadowproxy.toml has no [{section}] table"
        for key, default in defaults(cls).items():
            assert key in example[section], f"config/shadowproxy.toml: [{section}] {key} is missing"
            if default is not REQUIRED and default is not None:
                assert example[section][key] == as_toml(default), (
                    f"config/shadowproxy.toml: [{section}] {key} = {example[section][key]!r}, default {default!r}"
                )


ARRAYS: dict[str, type[Any]] = config_module._ARRAY_SECTIONS


def array_rows(name: str) -> dict[str, str]:
    """`## [[name]]` -> {key: default cell} from the first table under the heading."""
    rows: dict[str, str] = {}
    inside = False
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip() == f"## [[{name}]]"
        elif inside:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key = re.fullmatch(r"`(\w+)`", cells[0]) if len(cells) >= 2 else None
            if key:
                rows.setdefault(key.group(1), cells[1])
    return rows


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_reference_documents_the_keys_of_each_array_of_tables(name: str) -> None:
    rows = array_rows(name)
    assert rows, f"docs/configuration.md has no '## [[{name}]]' table"
    own = defaults(ARRAYS[name])
    if name == "candidates":  # the [candidate] keys are documented there; only the new ones here
        own = {k: v for k, v in own.items() if k not in defaults(SECTIONS["candidate"])}
    assert set(rows) == set(own), name
    for key, default in own.items():
        cell = rows[key].strip("`")
        field_spec = next(f for f in dataclasses.fields(ARRAYS[name]) if f.name == key)
        if field_spec.metadata.get("required") or default is REQUIRED:
            assert cell == "required", f"[[{name}]] {key}: documented as {cell!r}"
        elif default is None:
            assert cell == "unset", f"[[{name}]] {key}: documented as {cell!r}"
        else:
            assert tomllib.loads(f"v = {cell}")["v"] == as_toml(default), f"[[{name}]] {key}"


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_example_config_shows_each_array_of_tables_and_its_own_keys(name: str) -> None:
    text = EXAMPLE.read_text()
    assert f"#   [[{name}]]" in text, f"config/shadowproxy.toml does not show [[{name}]]"
    own = defaults(ARRAYS[name])
    if name == "candidates":
        own = {k: v for k, v in own.items() if k not in defaults(SECTIONS["candidate"])}
    for key in own:
        assert re.search(rf"(?m)^#   {key} = ", text), f"config/shadowproxy.toml: [[{name}]] {key} is missing"
