"""The README stays true to the code: every key of the embedded default
configuration has a row in its configuration reference (with the default as
the code has it), no row names a key that does not exist, and the command
table lists exactly the commands `cr-proxy` has."""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cr_proxy import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
# Keys whose value is a mapping of the operator's own entries (host -> URL,
# registry -> credentials), not further settings.
ENTRY_MAPS = {"registry_hosts", "endpoints", "registries"}


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


def table_rows(text: str) -> dict[str, str]:
    """First cell (in backquotes) -> second cell, for each row of the tables."""
    return dict(re.findall(r"^\| `([^`]+)` \| ([^|]*) \|", text, re.MULTILINE))


def settings(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ENTRY_MAPS:
            yield from settings(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def default_settings() -> dict[str, Any]:
    text = resources.files("cr_proxy").joinpath("default.yml").read_text()
    return dict(settings(yaml.safe_load(text)))


def test_every_setting_has_a_row_and_every_row_a_setting() -> None:
    rows = table_rows(section("Configuration reference"))
    assert set(rows) == set(default_settings())


def test_the_reference_shows_each_plain_default_as_the_code_has_it() -> None:
    rows = table_rows(section("Configuration reference"))
    for key, value in default_settings().items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue  # lists and maps are described in words
        shown = '""' if value == "" else str(value)
        assert rows[key].strip() == f"`{shown}`", key


def test_the_command_table_lists_every_command() -> None:
    rows = table_rows(section("Commands"))
    assert {cell.split()[1] for cell in rows} == set(cli.COMMANDS)


def test_the_client_matrix_names_only_tests_that_exist() -> None:
    """docs/clients.md is the matrix as the tests produce it: each row's
    test is one of the bed's tests, and every matrix test has a row."""
    root = Path(__file__).resolve().parent
    doc = (root.parent / "docs" / "clients.md").read_text()
    named = {name.split("[")[0] for name in re.findall(r"`(test_[a-z_]+(?:\[\w+\])?)`", doc)}
    defined = {name for module in ("test_e2e_matrix.py", "test_e2e_realnames.py")
               for name in re.findall(r"^def (test_\w+)", (root / module).read_text(), re.M)}
    matrix = set(re.findall(r"^def (test_\w+)", (root / "test_e2e_matrix.py").read_text(), re.M))
    assert named <= defined, named - defined
    assert matrix <= named, matrix - named
