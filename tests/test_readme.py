"""The README stays true: its settings table, its two commands and CI's entry point."""

from __future__ import annotations

import re
from pathlib import Path

from lookalike.cli.main import build_parser
from lookalike.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def settings_table() -> set[str]:
    section = README.split("## Settings", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.MULTILINE))


def test_settings_table_lists_exactly_the_settings_the_code_reads() -> None:
    assert settings_table() == set(Settings.env_names().values())


def test_the_two_commands_exist_and_ci_runs_the_test_command() -> None:
    commands = re.search(r"## Two commands on a fresh machine\n+```bash\n(.*?)```", README, re.S)
    assert commands, "the README lost its two-commands section"
    lines = [line.split("#")[0].strip() for line in commands.group(1).strip().splitlines()]
    assert lines == ["bash scripts/run.sh", "bash scripts/test.sh"]
    for line in lines:
        assert (ROOT / line.split()[1]).is_file()
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_cli_command_the_readme_shows_exists() -> None:
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    shown = set(re.findall(r"^\s*lookalike ([a-z][a-z-]*)", README, flags=re.MULTILINE))
    assert shown and shown <= subcommands, shown - subcommands


def test_the_merge_guide_shows_plugin_configs_own_controls_verbatim() -> None:
    """The snippet users paste into their own config is exactly what plugin_config.xml holds."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Adding Find similar to your own labeling config", 1)[1]
    snippet = section.split("```xml\n", 1)[1].split("```", 1)[0]
    config = " ".join((ROOT / "plugin_config.xml").read_text().split())
    for line in snippet.strip().split("/>"):
        if line.strip():
            assert " ".join(line.split()) in config, line
    steps = readme.split("### Find similar, for annotators", 1)[1].split("\n### ", 1)[0]
    for word in ("Auto-Annotation", "**M**", "double-click", "Find similar by text"):
        assert word in steps  # what tests/test_e2e_editor.py does, in the same words
    assert "Lookalike says" in config and "Find similar by text" in config
