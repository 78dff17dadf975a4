"""What produced a run, for its summary and the report's set-up section: the code's commit and the torch build."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's short commit, `+dirty` when tracked files differ from it; None outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def provenance() -> dict[str, str | None]:
    return {"git_commit": git_commit(), "torch_version": torch.__version__}
