"""Benchmark outputs: `bench.json` (everything), `bench.md` (the tables) and `bench.png` (the curves)."""

from __future__ import annotations

import json
from pathlib import Path

from src.benchmark.peer import PEER_NAME

REFERENCE = ("learned", "flash")  # the apples-to-apples pair with the peer, and the yardstick of the others


def label(row: dict) -> str:
    return PEER_NAME if row["model"] == PEER_NAME else f"{row['pe']}+{row['attention']}"


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def vs_reference(row: dict, rows: list[dict]) -> float | None:
    """Speed relative to learned+flash in the same cell (context, batch, compile).

    Through the peer when both have a `vs_peer`: each was timed next to the same peer, so the ratio of
    the two ratios cancels the load drift between combinations measured minutes apart, which a ratio of
    their absolute tokens/s does not.
    """
    same_cell = ("context", "batch", "compile")
    ref = next((r for r in rows if r["model"] != PEER_NAME and (r["pe"], r["attention"]) == REFERENCE
                and all(r[k] == row[k] for k in same_cell) and r["tokens_per_s"]), None)
    if ref is None or not row["tokens_per_s"] or row["model"] == PEER_NAME:
        return None
    if row["vs_peer"] and ref["vs_peer"]:
        return row["vs_peer"] / ref["vs_peer"]
    return row["tokens_per_s"] / ref["tokens_per_s"]


def components_text(components: dict | None) -> str:
    """meta["components"] in one line: the settings each PE / attention was built with beyond its defaults."""
    if not components:
        return "not recorded"
    parts = [f"{name} " + " ".join(f"{k}={v}" for k, v in values.items())
            for group in ("pe", "attention") for name, values in components[group].items() if values]
    return f"sized for block_size {components['block_size']}: " + ("; ".join(parts) or "schema defaults")


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["results"]
    lines = [
        "# pegrid training-step benchmark",
        "",
        f"- device: {meta['device']} ({meta['threads']} threads), torch {meta['torch']}, "
        f"transformers {meta['transformers']}, dtype {meta['dtype']}",
        f"- model: {meta['model']}",
        f"- PE / attention settings: {components_text(meta.get('components'))}",
        f"- step: {meta['step']}; {meta['warmup']} warm-up steps, then {meta['repeats']} rounds of "
        f"{meta['steps']} timed steps, ours and the peer interleaved; medians over rounds",
        f"- memory: {meta['memory_method']}; `state` = weights + AdamW moments",
        f"- load average (1 min) before/after: {meta['load_avg_before'][0]:.2f} / {meta['load_avg_after'][0]:.2f}",
        f"- command: `{meta['command']}`",
        "",
        "×peer: median over rounds of (our tokens/s ÷ the peer's tokens/s in the same round). "
        "×ref: ×peer ÷ learned+flash's ×peer in the same cell (speed relative to learned+flash).",
        "",
        "| compile | T | B | model | tokens/s | ×peer | ×ref | MFU | step MiB | state MiB | error |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'on' if r['compile'] else 'off'} | {r['context']} | {r['batch']} | {label(r)} | "
            f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['vs_peer'], '.3f')} | "
            f"{fmt(vs_reference(r, rows), '.3f')} | {fmt(r['mfu'], '.1%')} | "
            f"{fmt(r['step_mem_mib'], '.0f')} | {fmt(r['state_mem_mib'], '.0f')} | {r['error'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def figure(result: dict):
    """Tokens/s and step memory against context length, one line per model, a row of panels per compile mode
    (a pyplot Figure; None when no measurement succeeded).

    Colour and order per PE, line style and marker per attention come from analysis/style.py, as in every
    report figure; the peer is the grey baseline, drawn first.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.style import BASELINE_STYLE, attention_linestyle, attention_marker, order_key, pe_color

    rows = [r for r in result["results"] if r["tokens_per_s"]]
    if not rows:
        return None
    batch = min(r["batch"] for r in rows)  # one batch size keeps the curves comparable
    modes = sorted({r["compile"] for r in rows})
    fig, axes = plt.subplots(len(modes), 2, figsize=(13, 4.5 * len(modes)), squeeze=False)
    for (ax_tps, ax_mem), mode in zip(axes, modes):
        cell = [r for r in rows if r["compile"] == mode and r["batch"] == batch]
        ours = sorted({(r["pe"], r["attention"]) for r in cell if r["model"] != PEER_NAME},
                      key=lambda combo: order_key(*combo))
        lines = [(PEER_NAME, [r for r in cell if r["model"] == PEER_NAME], BASELINE_STYLE)]
        lines += [(f"{pe}+{attention}",
                   [r for r in cell if r["model"] != PEER_NAME and (r["pe"], r["attention"]) == (pe, attention)],
                   dict(color=pe_color(pe), linestyle=attention_linestyle(attention),
                        marker=attention_marker(attention)))
                  for pe, attention in ours]
        for name, line, style in lines:
            if not line:
                continue
            line = sorted(line, key=lambda r: r["context"])
            contexts = [r["context"] for r in line]
            ax_tps.plot(contexts, [r["tokens_per_s"] for r in line], label=name, **style)
            ax_mem.plot(contexts, [r["step_mem_mib"] for r in line], label=name, **style)
        measured = sorted({r["context"] for r in cell})
        for ax, ylabel in ((ax_tps, "tokens/s (fwd+bwd+AdamW)"), (ax_mem, "step memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(measured, [str(c) for c in measured])  # the lengths measured, not powers of 2
            ax.minorticks_off()
            ax.set_xlabel("context length")
            ax.set_ylabel(ylabel)
            ax.set_title(f"compile {'on' if mode else 'off'}, batch {batch}")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7, ncol=2, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot(result: dict, path: Path) -> None:
    """bench.png: the figure, or a line saying there is none where the plot is expected."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    if fig is None:  # every combination failed
        fig = plt.figure(figsize=(6, 2))
        fig.text(0.5, 0.5, "no successful measurement (see bench.md)", ha="center")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "plot": out_dir / "bench.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["plot"])
    return paths
