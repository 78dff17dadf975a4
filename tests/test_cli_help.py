"""What `python -m src.train --help` and Hydra's tab completion offer: the config files, never the schemas."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def train_cli(*args: str, env: dict | None = None) -> str:
    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True, env={**os.environ, **(env or {})}, timeout=120).stdout


def test_help_lists_no_schema_as_a_choice():
    help_text = train_cli("--help")
    pe_files = sorted(p.stem for p in (ROOT / "conf" / "model" / "pe").glob("*.yaml"))
    assert f"model/pe: {', '.join(pe_files)}\n" in help_text
    assert "_schema" not in help_text


@pytest.mark.parametrize("group", ["model/pe", "model/attention", "trainer", "eval", "data"])
def test_completion_offers_exactly_the_yaml_files_of_a_group(group):
    offered = train_cli("-sc", "query=bash", env={"COMP_LINE": f"train {group}="}).split()
    assert sorted(offered) == sorted(f"{group}={p.stem}" for p in (ROOT / "conf" / group).glob("*.yaml"))
