"""Compare the runs of a pegrid sweep: tables, figures and report.md from local run records and/or W&B.

    python -m analysis.compare [--runs DIR ...] [--wandb ENTITY/PROJECT [--group SWEEP]] [--out DIR]
                               [--cache DIR] [--refresh]

Run it from the repository root, as `make report ARGS="--runs outputs"` does.

With neither --runs nor --wandb it reads the run records under ./outputs. W&B histories are cached as
Parquet under --cache, so a second run is offline; --refresh downloads them again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.report import write_report
from analysis.sources import WandbUnavailable, combine, load_local, load_wandb
from analysis.tables import n_runs

DEFAULT_RUNS = "outputs"
DEFAULT_OUT = "outputs/report"  # under outputs/: git-ignored, and holds no run record to pick up
DEFAULT_CACHE = ".cache/pegrid-wandb"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", metavar="DIR",
                        help=f"directories searched recursively for run records (default: {DEFAULT_RUNS} "
                             "when --wandb is not given)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs of this W&B project")
    parser.add_argument("--group", metavar="SWEEP",
                        help="only this sweep (the W&B group; local runs are filtered by their sweep too)")
    parser.add_argument("--out", default=DEFAULT_OUT, type=Path, help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--cache", default=DEFAULT_CACHE, type=Path,
                        help=f"where W&B runs are cached as Parquet (default: {DEFAULT_CACHE})")
    parser.add_argument("--refresh", action="store_true", help="download W&B runs again instead of the cache")
    args = parser.parse_args(argv)
    if args.wandb and "/" not in args.wandb:
        parser.error("--wandb takes ENTITY/PROJECT, e.g. --wandb my-team/pegrid")
    if not args.runs and not args.wandb:
        args.runs = [DEFAULT_RUNS]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded, sources = [], []
    if args.runs:
        missing = [d for d in args.runs if not Path(d).is_dir()]
        if missing:
            print(f"error: --runs {' '.join(missing)}: no such directory", file=sys.stderr)
            return 2
        loaded.append(load_local(args.runs))  # one call: overlapping directories load each run once
        sources.append("local " + ", ".join(f"`{d}`" for d in args.runs))
    if args.wandb:
        try:
            loaded.append(load_wandb(args.wandb, args.group, args.cache, args.refresh))
        except WandbUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        sources.append(f"W&B `{args.wandb}`" + (f" group `{args.group}`" if args.group else ""))
    tables = combine(loaded, sweep=args.group)
    if tables.runs.empty:
        print(f"error: no runs found in {', '.join(sources)}" + (f" for sweep {args.group!r}" if args.group else ""),
              file=sys.stderr)
        return 1
    report = write_report(tables, args.out, sources)
    print(f"{n_runs(len(tables.runs))} -> {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
