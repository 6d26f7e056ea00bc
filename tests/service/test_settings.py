"""The settings are written once (``Settings``); the README's table and docker/example.env must
agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memcast.cli import main
from service.settings import Settings, settings_table

ROOT = Path(__file__).resolve().parents[2]
# example.env values chosen for the compose topology, not the defaults
COMPOSE_VALUES = {"REDIS_URL", "CHECKPOINT_DIR", "DEFAULT_MODEL", "API_KEYS"}


def test_readme_settings_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- settings:begin[^\n]*-->\n(.*?)<!-- settings:end -->", readme, re.S)
    assert block is not None, "README.md lost its settings block markers"
    assert block.group(1) == settings_table(), "README settings table is stale: paste `memcast settings`"


def test_settings_table_lists_every_field_with_its_default() -> None:
    table = settings_table()
    for name, info in Settings.model_fields.items():
        row = next(line for line in table.splitlines() if f"`MEMCAST_{name.upper()}`" in line)
        assert ("unset" if info.default is None else f"`{info.default}`") in row
        assert info.description, f"Settings.{name} has no description"


def test_example_env_names_real_settings_with_their_defaults() -> None:
    lines = re.findall(r"^# MEMCAST_([A-Z_]+)=(.*)$", (ROOT / "docker/example.env").read_text(), re.M)
    assert lines
    fields = Settings.model_fields
    for name, value in lines:
        assert name.lower() in fields, f"docker/example.env names MEMCAST_{name}, which is no setting"
        if name not in COMPOSE_VALUES and fields[name.lower()].default is not None:  # unset: any example
            assert value == str(fields[name.lower()].default), f"MEMCAST_{name}: example.env says {value}"


def test_settings_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["settings"]) == 0
    assert capsys.readouterr().out == settings_table()
