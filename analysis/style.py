"""The one fixed mapping from PE to colour and order and from attention to line style / hatch / marker, so
every figure (the report's, the benchmark's bench.png, and every paper figure made from them) draws a given
combination the same way and lists it in the same place.

The names come from the model registries: a PE or attention registered later is ordered after the known
ones (alphabetically) and gets a spare colour / style by that position, so it too is drawn the same way
every time. A name no registry knows (an old W&B run) still gets a style, never a KeyError.
"""

from __future__ import annotations

from src.model import ATTENTION_REGISTRY, PE_REGISTRY

# The papers' order: absolute PEs, then rotary, then the relative biases, NoPE (the control) last.
KNOWN_PE_ORDER = ["learned", "sinusoidal", "rope", "alibi", "kerple", "fire", "nope"]
KNOWN_ATTENTION_ORDER = ["regular", "flash", "linformer"]
PE_ORDER = KNOWN_PE_ORDER + [n for n in PE_REGISTRY.names() if n not in KNOWN_PE_ORDER]
ATTENTION_ORDER = KNOWN_ATTENTION_ORDER + [n for n in ATTENTION_REGISTRY.names() if n not in KNOWN_ATTENTION_ORDER]

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
SPARE_COLORS = ["#882255", "#44AA99", "#117733", "#332288", "#F0E442", "#AA4499"]
ATTENTION_LINESTYLES = {"regular": "-", "flash": "--", "linformer": ":"}
ATTENTION_HATCHES = {"regular": "", "flash": "//", "linformer": ".."}
ATTENTION_MARKERS = {"regular": "o", "flash": "s", "linformer": "^"}
SPARE_LINESTYLES, SPARE_HATCHES, SPARE_MARKERS = ["-.", (0, (5, 1, 1, 1, 1, 1))], ["xx", "\\\\"], ["D", "v"]

# An outside reference model (the benchmark's Hugging Face GPT-2): grey and thick, unlike any PE.
BASELINE_STYLE = {"color": "#777777", "linestyle": "-", "linewidth": 3.0, "alpha": 0.6}

STATUS_MARKERS = {"failed": "X", "running": ">", "interrupted": "|", "unknown": "?"}  # at an unfinished curve's end


def ordered(names, order: list[str]) -> list[str]:
    """`names` (unique) in the canonical order, unknown ones after, alphabetically."""
    unique = set(names)
    return [n for n in order if n in unique] + sorted(unique - set(order))


def order_key(pe: str, attention: str) -> tuple:
    """Sort key for (PE, attention) pairs: PE_ORDER, then ATTENTION_ORDER, unknown names last."""
    def rank(name, order):
        return (order.index(name), "") if name in order else (len(order), name)

    return rank(pe, PE_ORDER), rank(attention, ATTENTION_ORDER)


def _spare(name: str, order: list[str], known: list[str], spares: list):
    """A registered newcomer: by its place after the known names; an unregistered name: by its letters."""
    index = order.index(name) - len(known) if name in order else sum(map(ord, name))
    return spares[index % len(spares)]


def pe_color(pe: str) -> str:
    return PE_COLORS.get(pe) or _spare(pe, PE_ORDER, KNOWN_PE_ORDER, SPARE_COLORS)


def attention_linestyle(attention: str):
    return ATTENTION_LINESTYLES.get(attention) or _spare(attention, ATTENTION_ORDER, KNOWN_ATTENTION_ORDER,
                                                         SPARE_LINESTYLES)


def attention_hatch(attention: str) -> str:
    if attention in ATTENTION_HATCHES:
        return ATTENTION_HATCHES[attention]
    return _spare(attention, ATTENTION_ORDER, KNOWN_ATTENTION_ORDER, SPARE_HATCHES)


def attention_marker(attention: str) -> str:
    return ATTENTION_MARKERS.get(attention) or _spare(attention, ATTENTION_ORDER, KNOWN_ATTENTION_ORDER,
                                                      SPARE_MARKERS)
