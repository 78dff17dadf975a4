"""The one fixed mapping from PE to colour and order and from attention to line style / hatch / marker, so
every figure (the report's, the benchmark's bench.png, and every paper figure made from them) draws a given
combination the same way and lists it in the same place.

The names come from the model registries: a PE or attention that has no entry here (a new file in
src/model/pe/ or src/model/attention/, style.py untouched) is ordered after the known ones (alphabetically)
and gets, by that position, a spare colour / line style / hatch / marker, then generated ones once the spares
run out, so any number of newcomers are told apart and each is drawn the same way every time. A name no
registry knows (an old W&B run) still gets a fixed style, never a KeyError.

An inference-time variant of a trained PE (`rope+yarn×4`, src/metrics.py `variant_pe_name`) is ordered right
after its base PE (the variants of one base in natural order: yarn×4 before yarn×16) and drawn in a shade of
the base's colour (`variant_color`), a pure function of the name: the same in every figure.
"""

from __future__ import annotations

import colorsys
import math
import re
import zlib

import matplotlib.colors

from src.metrics import base_pe_name
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
SPARE_COLORS = ["#882255", "#44AA99", "#117733", "#332288", "#F0E442", "#AA4499"]  # Tol: then generated
ATTENTION_LINESTYLES = {"regular": "-", "flash": "--", "linformer": ":"}
ATTENTION_HATCHES = {"regular": "", "flash": "//", "linformer": ".."}
ATTENTION_MARKERS = {"regular": "o", "flash": "s", "linformer": "^"}
SPARE_LINESTYLES = ["-.", (0, (5, 1, 1, 1, 1, 1))]  # then generated dash patterns
SPARE_HATCHES = ["xx", "\\\\", "++", "oo", "||", "--", "**", "OO"]  # then denser and denser "x"
# Then regular polygons / stars; none of STATUS_MARKERS ("X", ">", "|", "?"), which mark unfinished curves.
SPARE_MARKERS = ["D", "v", "P", "*", "h", "p", "<", "d", "8", "H"]

# An outside reference model (the benchmark's Hugging Face GPT-2): grey and thick, unlike any PE.
BASELINE_STYLE = {"color": "#777777", "linestyle": "-", "linewidth": 3.0, "alpha": 0.6}

STATUS_MARKERS = {"failed": "X", "running": ">", "interrupted": "|", "unknown": "?"}  # at an unfinished curve's end


def _natural(text: str) -> tuple:
    """Sort key reading digit runs as numbers: "yarn×4" before "yarn×16"."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def _rank(name: str, order: list[str]) -> tuple:
    """A name's place: its base's place in `order` (unknown bases after, alphabetically), then its variant
    ("" for the base itself, so a variant comes right after its base)."""
    base, _, variant = name.partition("+")
    place = (order.index(base), "") if base in order else (len(order), base)
    return (*place, bool(variant), _natural(variant))


def ordered(names, order: list[str]) -> list[str]:
    """`names` (unique) in the canonical order, unknown ones after, alphabetically; a variant `base+v` right
    after its base."""
    return sorted(set(names), key=lambda name: _rank(name, order))


def order_key(pe: str, attention: str) -> tuple:
    """Sort key for (PE, attention) pairs: PE_ORDER (variants after their base), then ATTENTION_ORDER, unknown
    names last."""
    return _rank(pe, PE_ORDER), _rank(attention, ATTENTION_ORDER)


def _generated_color(i: int) -> str:
    """Colours past SPARE_COLORS: hues a golden angle apart, mid saturation and value (never grey or black)."""
    return matplotlib.colors.to_hex(colorsys.hsv_to_rgb((0.07 + 0.618034 * i) % 1.0, 0.75, 0.7))


def _style(name: str, table: dict, order: list[str], known: list[str], spares: list, generate):
    """`table[name]`; else, for a registered newcomer, the spare at its place after the known names (generated
    past the spares: n newcomers, n different styles); else (a name no registry knows) a spare by its letters."""
    if name in table:
        return table[name]
    if name in order:
        i = order.index(name) - len(known)
        return spares[i] if i < len(spares) else generate(i - len(spares))
    return spares[sum(map(ord, name)) % len(spares)]


# How the variants of a PE are told apart from it and from each other: their kind (the variant name up to "×";
# src/model/pe/rope.py's scaling types in this order, others by a checksum) picks what the base colour is mixed
# toward (black, white, mid grey), their factor (the number after "×") how far: ×2, ×4, ×8, ×16 four steps.
KNOWN_VARIANT_KINDS = ["yarn", "ntk", "linear"]
VARIANT_TARGETS = ["#000000", "#ffffff", "#808080"]  # mixing toward these keeps the base's hue
VARIANT_MIX = [0.28, 0.42, 0.56, 0.70]  # fraction mixed in; the smallest still far from the base


def variant_shade(variant: str) -> tuple[str, float]:
    """(colour mixed toward, fraction mixed) of a variant name such as "yarn×4"."""
    kind, _, factor = variant.partition("×")
    kind = kind.strip().lower()
    k = KNOWN_VARIANT_KINDS.index(kind) if kind in KNOWN_VARIANT_KINDS else zlib.crc32(kind.encode())
    try:
        step = max(0, round(math.log2(float(factor))) - 1)  # ×2 -> 0, ×4 -> 1, ...
    except (ValueError, OverflowError):  # no factor ("base=500000"): by its letters
        step = zlib.crc32(variant.encode())
    return VARIANT_TARGETS[k % len(VARIANT_TARGETS)], VARIANT_MIX[step % len(VARIANT_MIX)]


def variant_color(base_color: str, variant: str) -> str:
    """`base_color` mixed toward black or white as `variant_shade` says."""
    toward, mix = variant_shade(variant)
    base, target = matplotlib.colors.to_rgb(base_color), matplotlib.colors.to_rgb(toward)
    return matplotlib.colors.to_hex([(1 - mix) * b + mix * t for b, t in zip(base, target)])


def pe_color(pe: str) -> str:
    """The PE's colour; a variant `base+v` gets a shade of its base's colour."""
    base = base_pe_name(pe)
    color = _style(base, PE_COLORS, PE_ORDER, KNOWN_PE_ORDER, SPARE_COLORS, _generated_color)
    if base != pe:
        # NoPE's black cannot get darker: its variants go toward white
        variant = pe[len(base) + 1:]
        if matplotlib.colors.to_hex(color) == "#000000":
            return matplotlib.colors.to_hex([variant_shade(variant)[1]] * 3)
        return variant_color(color, variant)
    return color


def attention_linestyle(attention: str):
    return _style(attention, ATTENTION_LINESTYLES, ATTENTION_ORDER, KNOWN_ATTENTION_ORDER, SPARE_LINESTYLES,
                  lambda i: (0, (2 + i, 2, 1, 2)))  # a dash 2 + i long, a gap, a dot, a gap


def attention_hatch(attention: str) -> str:
    return _style(attention, ATTENTION_HATCHES, ATTENTION_ORDER, KNOWN_ATTENTION_ORDER, SPARE_HATCHES,
                  lambda i: "x" * (3 + i))  # denser and denser crosses


def attention_marker(attention: str):
    return _style(attention, ATTENTION_MARKERS, ATTENTION_ORDER, KNOWN_ATTENTION_ORDER, SPARE_MARKERS,
                  lambda i: (5 + i, 1, 0))  # a star with 5 + i points
