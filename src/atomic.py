"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: a diverged value reads as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` survive a power loss (the file's own fsync does not)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file in `folder` (not recursive), then the folder itself: its contents are on disk."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def atomic_write(path: Path, data) -> None:
    """Write bytes (or a contiguous array) to a temp file beside `path`, fsync, rename over `path`, fsync the
    directory (so the rename itself is durable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: dict) -> None:
    text = json.dumps({k: json_safe(v) for k, v in data.items()}, indent=2, sort_keys=True)
    atomic_write(path, text.encode())
