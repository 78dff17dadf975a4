"""The performance targets of the benchmark issue, checked against `bench.json` files.

    python -m src.benchmark.targets outputs/bench-h100-t1024/bench.json outputs/bench-h100-t8192/bench.json

Each target is defined on a kind of cell (device, model size, context, dtype, compile); every matching
cell of the given files is checked, and a target that no file covers is reported as not measured (the
GPU targets on a CPU run). Ratios between our combinations are taken within one cell through the common
peer (`report.vs_reference`), as in bench.md's ×ref. Prints a Markdown table, writes it to --out if given;
exit status 1 when a measured target fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from src.benchmark.peer import PEER_NAME
from src.benchmark.report import REFERENCE, vs_reference

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768)


@dataclass
class Target:
    name: str
    threshold: float
    at_most: bool  # True: the measured value must not exceed the threshold
    cell: Callable[[dict, dict], bool]  # (meta, row) -> is this a cell the target is defined on
    measure: Callable[[dict, list[dict]], float | None]  # (row of learned+flash, rows of its cell) -> value


def _gpu_124m(context: int) -> Callable[[dict, dict], bool]:
    def matches(meta: dict, row: dict) -> bool:
        return (meta.get("device_type") == "cuda" and all(meta.get(k) == v for k, v in GPT2_124M.items())
                and row["context"] == context and row["dtype"] == "bfloat16" and row["compile"])
    return matches


def _on_cpu(meta: dict, row: dict) -> bool:
    return meta.get("device_type") == "cpu"


def _ours(rows: list[dict], pe: str, attention: str) -> dict | None:
    return next((r for r in rows if r["model"] != PEER_NAME and (r["pe"], r["attention"]) == (pe, attention)), None)


def _speed_vs_reference(pe: str, attention: str):
    def measure(ref: dict, rows: list[dict]) -> float | None:
        row = _ours(rows, pe, attention)
        return vs_reference(row, rows) if row else None
    return measure


def _memory_vs_reference(pe: str, attention: str):
    def measure(ref: dict, rows: list[dict]) -> float | None:
        row = _ours(rows, pe, attention)
        if row is None or row["step_mem_mib"] is None or ref["step_mem_mib"] is None:
            return None
        return (row["step_mem_mib"] + row["state_mem_mib"]) / (ref["step_mem_mib"] + ref["state_mem_mib"])
    return measure


TARGETS = [
    Target("learned+flash tokens/s ÷ peer (GPU, 124M, T=1024, bf16, compiled)", 1.0, False, _gpu_124m(1024),
           lambda ref, rows: ref["vs_peer"]),
    Target("learned+flash MFU (same cell)", 0.5, False, _gpu_124m(1024), lambda ref, rows: ref["mfu"]),
    *(Target(f"{pe}+flash tokens/s ÷ learned+flash (same cell)", 0.8, False, _gpu_124m(1024),
             _speed_vs_reference(pe, "flash")) for pe in ("alibi", "kerple", "fire")),
    Target("fire+flash peak memory ÷ learned+flash (same cell)", 1.25, True, _gpu_124m(1024),
           _memory_vs_reference("fire", "flash")),
    Target("learned+linformer tokens/s ÷ learned+flash (GPU, 124M, T=8192, bf16, compiled)", 1.5, False,
           _gpu_124m(8192), _speed_vs_reference("learned", "linformer")),
    # "our step time ≤ 1.1× the peer's" is tokens/s ÷ peer ≥ 1/1.1.
    Target("learned+flash tokens/s ÷ peer on CPU (any cell)", 1 / 1.1, False, _on_cpu,
           lambda ref, rows: ref["vs_peer"]),
]


def cells(results: list[dict]) -> Iterator[tuple[dict, dict, list[dict]]]:
    """(meta, learned+flash row, all rows of its cell) for every cell of every file that has learned+flash."""
    for result in results:
        rows = result["results"]
        for ref in rows:
            if ref["model"] != PEER_NAME and (ref["pe"], ref["attention"]) == REFERENCE:
                same = [r for r in rows if all(r[k] == ref[k] for k in ("context", "batch", "compile", "dtype"))]
                yield result["meta"], ref, same


def check(results: list[dict]) -> list[dict]:
    lines = []
    for target in TARGETS:
        matched = [(meta, ref, rows) for meta, ref, rows in cells(results) if target.cell(meta, ref)]
        for meta, ref, rows in matched:
            value = target.measure(ref, rows)
            if value is None:
                passed = None
            else:
                passed = value <= target.threshold if target.at_most else value >= target.threshold
            lines.append(dict(target=target.name, value=value, threshold=target.threshold, at_most=target.at_most,
                              cell=f"{meta.get('device', '?')} T={ref['context']} B={ref['batch']}", passed=passed))
        if not matched:
            lines.append(dict(target=target.name, cell="no such cell in these files", value=None,
                              threshold=target.threshold, at_most=target.at_most, passed=None))
    return lines


def markdown(lines: list[dict]) -> str:
    out = ["| target | cell | measured | needed | status |", "|---|---|---:|---:|---|"]
    for line in lines:
        status = "not measured" if line["passed"] is None else "PASS" if line["passed"] else "FAIL"
        value = "–" if line["value"] is None else f"{line['value']:.3f}"
        needed = f"{'≤' if line['at_most'] else '≥'} {line['threshold']:.3f}"
        out.append(f"| {line['target']} | {line['cell']} | {value} | {needed} | {status} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.benchmark.targets", description=__doc__.split("\n\n")[0])
    p.add_argument("bench_json", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    args = p.parse_args(argv)
    missing = [str(path) for path in args.bench_json if not path.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)} "
              "(run python -m src.benchmark --out DIR first)", file=sys.stderr)
        return 2
    lines = check([json.loads(path.read_text()) for path in args.bench_json])
    table = markdown(lines)
    print(table, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 1 if any(line["passed"] is False for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
