"""The Makefile as a user meets it: a bare `make` only lists the targets, and lint covers every Python dir."""

import re
import subprocess

from tests.conftest import ROOT


def make(*args: str) -> str:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def test_a_bare_make_prints_the_help_and_installs_nothing():
    planned = make("-n")  # what a bare `make` would run
    assert "pip" not in planned and "pytest" not in planned
    listed = set(re.findall(r"^  make (\S+)", make(), re.M))
    documented = set(re.findall(r"^([a-z][a-z-]*):.*## ", (ROOT / "Makefile").read_text(), re.M))
    assert listed == documented and {"install", "test", "study", "sweep"} <= listed


def test_lint_covers_every_python_directory_of_the_project():
    linted = make("-n", "lint").split()
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    top_levels = {path.split("/")[0] for path in tracked}  # a directory, or a file such as app.py
    assert top_levels and top_levels <= set(linted)
