"""Batches of (x, y) token windows from the memory-mapped shards written by prepare().

A split's shards are read as one long token array. Window i is tokens[i*T : i*T + T + 1] (T =
block_size): non-overlapping inputs, y is x shifted by one. Training walks an endless stream of
windows, each epoch a fresh permutation seeded by (seed, epoch); global batch s is stream items
[s*B*W, (s+1)*B*W) and rank r takes the r-th block of B. So W ranks with batch B see together
exactly what one process with batch B*W sees, and never the same window within a step.
"""

import bisect
from pathlib import Path

import numpy as np
import torch

from src.data.prepare import load_meta


class TokenWindows:
    """Random access to the fixed-length windows of one split."""

    def __init__(self, shard_dir: str | Path, split: str, block_size: int):
        info = load_meta(shard_dir)["splits"][split]
        self.shards = [np.memmap(Path(shard_dir) / s["file"], dtype=np.uint16, mode="r") for s in info["shards"]]
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards]).tolist()
        self.num_tokens = self.starts[-1]
        self.block_size = block_size
        self.num_windows = max(0, (self.num_tokens - 1) // block_size)
        if self.num_windows == 0:
            raise ValueError(f"the {split} split of {shard_dir} has {self.num_tokens} tokens, but "
                             f"block_size={block_size} needs at least {block_size + 1}")

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors [len(window_ids), block_size]."""
        rows = np.stack([self._read(int(i) * self.block_size, self.block_size + 1) for i in window_ids])
        rows = rows.astype(np.int64)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def _read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start+length] of the concatenated shards; a window may span two shards."""
        pieces = []
        shard = bisect.bisect_right(self.starts, start) - 1
        while length > 0:
            offset = start - self.starts[shard]
            piece = self.shards[shard][offset : offset + length]
            pieces.append(piece)
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return np.concatenate(pieces)


class TokenLoader:
    """Endless, seeded, resumable training batches for one rank of `world_size`."""

    def __init__(self, shard_dir: str | Path, split: str, batch_size: int, block_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        assert 0 <= rank < world_size, f"rank {rank} outside world_size {world_size}"
        self.windows = TokenWindows(shard_dir, split, block_size)
        self.num_tokens = self.windows.num_tokens
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0  # next stream item: permutation(epoch)[position]
        self._order_epoch, self._order = None, None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) of the next global batch, int64 CPU tensors [batch_size, block_size]."""
        self._take(self.rank * self.batch_size)
        window_ids = self._take(self.batch_size)
        self._take((self.world_size - 1 - self.rank) * self.batch_size)
        return self.windows.batch(window_ids)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _take(self, count: int) -> np.ndarray:
        """The next `count` window ids of the stream, moving on to a new epoch as often as needed."""
        taken = []
        while count > 0:
            order = self._epoch_order()
            chunk = order[self.position : self.position + count]
            taken.append(chunk)
            count -= len(chunk)
            self.position += len(chunk)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(taken) if taken else np.empty(0, dtype=np.int64)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order, self._order_epoch = rng.permutation(self.windows.num_windows), self.epoch
        return self._order


def split_tokens(shard_dir: str | Path, split: str) -> int:
    """How many tokens a prepared split holds."""
    return load_meta(shard_dir)["splits"][split]["tokens"]
