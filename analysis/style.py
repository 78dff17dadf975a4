"""The one fixed mapping from PE to colour and from attention to line style / hatch, so every figure (and
every paper figure made from them) draws a given combination the same way.

A PE added later gets a spare colour picked from its name, so it too is drawn the same way every time.
"""

from __future__ import annotations

PE_ORDER = ["learned", "sinusoidal", "rope", "alibi", "kerple", "fire", "nope"]
ATTENTION_ORDER = ["regular", "flash", "linformer"]

# Okabe-Ito (colour-blind safe) plus black for the NoPE control.
PE_COLORS = {
    "learned": "#0072B2",
    "sinusoidal": "#E69F00",
    "rope": "#009E73",
    "alibi": "#D55E00",
    "kerple": "#CC79A7",
    "fire": "#56B4E9",
    "nope": "#000000",
}
SPARE_COLORS = ["#999999", "#F0E442", "#882255", "#44AA99", "#117733", "#332288"]
ATTENTION_LINESTYLES = {"regular": "-", "flash": "--", "linformer": ":"}
ATTENTION_HATCHES = {"regular": "", "flash": "//", "linformer": ".."}
ATTENTION_MARKERS = {"regular": "o", "flash": "s", "linformer": "^"}

STATUS_MARKERS = {"failed": "X", "running": ">", "unknown": "?"}  # drawn at the end of an unfinished curve


def ordered(names, order: list[str]) -> list[str]:
    """`names` (unique) in the canonical order, unknown ones after, alphabetically."""
    unique = set(names)
    return [n for n in order if n in unique] + sorted(unique - set(order))


def pe_color(pe: str) -> str:
    if pe in PE_COLORS:
        return PE_COLORS[pe]
    return SPARE_COLORS[sum(map(ord, pe)) % len(SPARE_COLORS)]


def attention_linestyle(attention: str) -> str:
    return ATTENTION_LINESTYLES.get(attention, "-.")


def attention_hatch(attention: str) -> str:
    return ATTENTION_HATCHES.get(attention, "xx")


def attention_marker(attention: str) -> str:
    return ATTENTION_MARKERS.get(attention, "D")
