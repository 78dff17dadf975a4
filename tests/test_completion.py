"""Bash tab completion of `python -m src.train` (src/completion.py), run in a real bash with the hook eval'ed."""

import os
import subprocess
import sys

import pytest

from src.completion import FUNCTION, print_hook
from tests.conftest import ROOT

PES = sorted(p.stem for p in (ROOT / "conf" / "model" / "pe").glob("*.yaml"))
R_PES = [pe for pe in PES if pe.startswith("r")]

# Sets what bash sets before calling a -F function, for the line in $LINE with the cursor at its end; COMP_WORDS
# split at blanks, as with Hydra's hook installed (it takes `=` out of COMP_WORDBREAKS).
COMPLETE = """eval "$HOOK" || exit 1
while IFS= read -r COMP_LINE; do
    COMP_POINT=${#COMP_LINE}
    read -ra COMP_WORDS <<< "$COMP_LINE"
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
    [[ $COMP_LINE == *" " ]] && COMP_WORDS+=("") && (( COMP_CWORD++ ))
    COMPREPLY=()
    "$FUNCTION"
    printf '%s\\n' "${COMPREPLY[*]}"
done <<< "$LINES"
"""


def complete(hook: str, function: str, lines: list[str], wordbreaks: str | None = None) -> list[list[str]]:
    """COMPREPLY for each line, from `function` of `hook` in one bash process run from the repo root."""
    script = COMPLETE if wordbreaks is None else f"COMP_WORDBREAKS=$WORDBREAKS\n{COMPLETE}"
    env = {**os.environ, "HOOK": hook, "FUNCTION": function, "LINES": "\n".join(lines), "WORDBREAKS": wordbreaks or ""}
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [line.split() for line in out.splitlines()]


@pytest.fixture(scope="module")
def hook() -> str:
    return subprocess.run([sys.executable, "-m", "src.train", "-sc", "install=bash"], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=60).stdout


@pytest.mark.slow
def test_completes_python_dash_m_src_train(hook):
    assert complete(hook, FUNCTION, [
        "python -m src.train model/pe=",
        "python -m src.train model/pe=r",
        "python -m src.train trainer.max_st",
        "python3 src/train.py model/pe=r",
    ]) == [PES, R_PES, ["trainer.max_steps="], R_PES]  # readline keeps what precedes the `=` of COMP_WORDBREAKS
    # With `=` out of COMP_WORDBREAKS (as Hydra's hook leaves it) the whole override is the word replaced.
    no_eq = bash_wordbreaks().replace("=", "")
    assert complete(hook, FUNCTION, ["python -m src.train model/pe=r"], no_eq) == [[f"model/pe={pe}" for pe in R_PES]]


@pytest.mark.slow
def test_hydras_own_hook_misses_python_dash_m(monkeypatch, capsys):
    bash_completion = pytest.importorskip("hydra._internal.core_plugins.bash_completion")
    monkeypatch.setattr(sys, "argv", ["src/train.py"])  # what it prints depends on how the app was started
    bash_completion.BashCompletion(config_loader=None).install()
    stock = capsys.readouterr().out
    lines = ["python -m src.train model/pe=", "python src/train.py model/pe="]
    assert complete(stock, "hydra_bash_completion", lines) == [[], [f"model/pe={pe}" for pe in PES]]  # harness works


def test_uninstall_restores_what_python_completed_with(capsys):
    hooks = []
    for command in ("install=bash", "uninstall=bash"):
        assert print_hook(["-sc", command])
        hooks.append(capsys.readouterr().out)
    script = f"""complete -F _old python
eval "$INSTALL"; complete -p python3
eval "$UNINSTALL"; complete -p python; complete -p python3 || echo none; declare -F {FUNCTION} || echo gone"""
    out = subprocess.run(["bash", "-c", script], env={**os.environ, "INSTALL": hooks[0], "UNINSTALL": hooks[1]},
                         capture_output=True, text=True, timeout=30).stdout
    assert out.splitlines() == [f"complete -o default -o nospace -F {FUNCTION} python3", "complete -F _old python",
                                "none", "gone"]


def test_other_shell_completion_commands_are_left_to_hydra(capsys):
    assert not print_hook(["-sc", "query=bash"]) and not print_hook(["install=bash"])
    assert capsys.readouterr().out == ""


def bash_wordbreaks() -> str:
    return subprocess.run(["bash", "-c", 'printf %s "$COMP_WORDBREAKS"'], capture_output=True, text=True,
                          check=True).stdout
