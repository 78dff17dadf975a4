"""`make wandb-sync`: upload the offline W&B runs of the run records under a directory, the ones not synced yet.

    python scripts/wandb_sync.py                    # every run record under outputs/
    python scripts/wandb_sync.py --runs DIR         # under DIR
    python scripts/wandb_sync.py --dry-run          # list what would be synced, upload nothing

A run trained with `logger=wandb logger.mode=offline` keeps its W&B data in `<run dir>/wandb/offline-run-*/`
(one folder per attempt: a resumed run adds one). A folder is synced once its `.wandb` transaction log has the
`.wandb.synced` marker beside it, which `wandb sync` writes after an upload (wandb/cli/beta_sync.py
`_is_synced`); folders with it, online runs' folders (`run-*`, uploaded live) and records under hidden
directories (`.superseded/`, `.preflight/`: not part of the sweep) are left out.

Before anything is uploaded, W&B must be usable: credentials configured (`wandb login` or WANDB_API_KEY) and
the W&B host reachable. Otherwise it says so in one line and exits 2 without touching the offline data (a
`wandb sync` without network would retry for minutes and leave `.syncstate` files). Then `wandb sync <folders>`
(the wandb CLI of this Python) uploads them: exit status 0 if it succeeded, 1 if not (its output says why).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

DEFAULT_RUNS = "outputs"
CONNECT_TIMEOUT_S = 5.0


def offline_run_dirs(root: Path) -> list[Path]:
    """Every `<run dir>/wandb/offline-run-*/` under root holding a .wandb file, hidden directories left out."""
    found = set()
    for log in root.rglob("wandb/offline-run-*/*.wandb"):
        if not any(part.startswith(".") for part in log.relative_to(root).parts[:-1]):
            found.add(log.parent)
    return sorted(found)


def is_synced(run_dir: Path) -> bool:
    """Whether every .wandb file of the folder has its `.wandb.synced` marker (the wandb CLI's rule)."""
    return all(log.with_suffix(".wandb.synced").exists() for log in run_dir.glob("*.wandb"))


def wandb_host() -> str:
    """The W&B API URL this Python's wandb talks to (WANDB_BASE_URL, `wandb login --host`, or its default)."""
    from wandb.sdk import wandb_setup

    return str(wandb_setup.singleton().settings.base_url)


def credentials_problem(host: str) -> str | None:
    """None when credentials for `host` are configured (nothing is prompted or verified online)."""
    from wandb.sdk.lib import wbauth

    try:
        auth = wbauth.authenticate_session(host=host, source="make wandb-sync", prompt=False, update_session=False)
    except Exception as err:  # a malformed key
        return f"the W&B credentials for {host} are unusable ({type(err).__name__}: {err}); run `wandb login`"
    return None if auth else f"no W&B API key configured for {host}; run `wandb login` (or set WANDB_API_KEY)"


def network_problem(host: str) -> str | None:
    """None when a TCP connection to the host (or the HTTPS proxy, if one is set) opens within a few seconds."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlsplit(proxy if proxy else host)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    try:
        socket.create_connection(address, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        via = f" through the proxy {proxy}" if proxy else ""
        return (f"cannot reach {host}{via} ({type(err).__name__}: {err}); connect this machine to the network "
                "(or run this where there is one, after copying the run dirs)")
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python scripts/wandb_sync.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS, type=Path, metavar="DIR",
                        help=f"directory searched recursively for offline W&B runs (default: {DEFAULT_RUNS})")
    parser.add_argument("--dry-run", action="store_true", help="list the folders that would be synced, and stop")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.runs.is_dir():
        print(f"wandb-sync: --runs {args.runs}: no such directory", file=sys.stderr)
        return 2
    found = offline_run_dirs(args.runs)
    todo = [d for d in found if not is_synced(d)]
    print(f"wandb-sync: {len(found)} offline W&B run folder(s) under {args.runs}, {len(found) - len(todo)} already "
          f"synced, {len(todo)} to sync" + (":" if todo else ""))
    for run_dir in todo:
        print(f"  {run_dir}")
    if not todo or args.dry_run:
        return 0
    host = wandb_host()
    problem = credentials_problem(host) or network_problem(host)
    if problem:
        print(f"wandb-sync: {problem}. Nothing was synced; the offline runs are kept as they are.", file=sys.stderr)
        return 2
    result = subprocess.run([sys.executable, "-m", "wandb", "sync", *map(str, todo)], stdin=subprocess.DEVNULL)
    if result.returncode:
        print(f"wandb-sync: `wandb sync` exited with status {result.returncode} (its output above says why)",
              file=sys.stderr)
        return 1
    print(f"wandb-sync: {len(todo)} folder(s) synced")
    return 0

if __name__ == "__main__":
    sys.exit(main())
