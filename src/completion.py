"""Bash tab completion for `python -m src.train ...`: `eval "$(python -m src.train -sc install=bash)"`.

Hydra's own hook (`-sc install=bash`) completes only `python <file>.py` and `<app>`: for `python -m src.train` it
takes `-m` for a file, finds none and offers nothing. Its query side (`-sc query=bash`, left to Hydra) would fail
anyway on that line: it strips `python` plus a path made of word characters, `/` and `.` only, so `-m` stays and
reads as `--multirun`, and `src.train` as a malformed override. So src/train.py prints this hook instead, which
finds the app itself and hands Hydra's query a line it parses: `python app.py <the overrides>`.
"""

from __future__ import annotations

FUNCTION = "pegrid_bash_completion"

# Bash, not zsh: `read -a`, BASH_REMATCH and COMP_WORDBREAKS are bash's.
HOOK = r"""_PEGRID_OLD_COMP=${_PEGRID_OLD_COMP-$(complete -p python python3 2>/dev/null)}  # for uninstall=bash
pegrid_bash_completion() {
    local IFS=$' \t\n' line=${COMP_LINE:0:COMP_POINT} cur="" file
    local -a words app args choices
    read -ra words <<< "$line"
    [[ $line =~ [^[:space:]]+$ ]] && cur=${BASH_REMATCH[0]}  # the word at the cursor, "" after a blank
    [[ ${words[0]##*/} =~ ^python(3(\.[0-9]+)?)?$ ]] || return
    if [[ ${words[1]} == -m ]]; then  # python -m src.train: the module's file, relative to the current dir
        app=("${words[@]:0:3}") file=${words[2]//.//}.py
        [[ -f $file ]] || file=${words[2]//.//}/__main__.py
    else
        app=("${words[@]:0:2}") file=${words[1]}
    fi
    # Only a finished app name, and only a Hydra app: Tab must never run some other module or script.
    (( ${#words[@]} - (${#cur} > 0) >= ${#app[@]} )) || return  # words before the one at the cursor
    [[ -f $file ]] && grep -q "@hydra.main" "$file" || return
    args=("${words[@]:${#app[@]}}")
    [[ -n $cur ]] || args+=("")  # a trailing blank: Hydra then completes a new word
    # Hydra's query ignores the script name and COMP_POINT: pass a plain name and only the text before the cursor.
    read -ra choices <<< "$(COMP_LINE="python app.py ${args[*]}" "${app[@]}" -sc query=bash 2>/dev/null)"
    # Readline replaces only the text after the last COMP_WORDBREAKS character (`=`, `:`, ...): drop what precedes.
    local i prefix="" choice
    for (( i = ${#cur} - 1; i >= 0; i-- )); do
        if [[ $COMP_WORDBREAKS == *"${cur:i:1}"* ]]; then prefix=${cur:0:i+1}; break; fi
    done
    COMPREPLY=()
    for choice in "${choices[@]}"; do
        [[ $choice == "$cur"* ]] && COMPREPLY+=("${choice#"$prefix"}")
    done
}
complete -o nospace -o default -F pegrid_bash_completion python python3"""

UNHOOK = r"""complete -r python python3 2>/dev/null
eval "${_PEGRID_OLD_COMP-}"  # what python and python3 completed with before install=bash
unset -v _PEGRID_OLD_COMP
unset -f pegrid_bash_completion"""


def print_hook(argv: list[str]) -> bool:
    """For `-sc install=bash` / `-sc uninstall=bash` print our hook and return True; otherwise return False, and
    Hydra handles argv (`-sc query=bash` included)."""
    if "-sc" not in argv and "--shell-completion" not in argv:
        return False
    if "install=bash" in argv:
        print(HOOK)
    elif "uninstall=bash" in argv:
        print(UNHOOK)
    else:
        return False
    return True
