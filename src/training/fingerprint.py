"""The config fingerprint: a hash of what changes a run's results, stored in summary.json.

A sweep compares a finished run's fingerprint with the one its current config would get: equal means the
record answers the same question, different means the record is *stale* (another recipe, step count, PE
setting, ...). Where the record goes (`runs_dir`, `run_name`, `sweep_name`), how it is logged (`logger`,
`hydra`) and bookkeeping that leaves the numbers alone (progress bar, checkpoint cadence, resume policy,
data cache location) are left out, so moving or renaming a run does not make it stale.
"""

from __future__ import annotations

import copy
import hashlib
import json

from omegaconf import DictConfig, OmegaConf

FINGERPRINT_KEY = "config_fingerprint"

# dotted keys of the resolved train config that do not change the numbers a run produces
NOT_RESULTS = (
    "run_name", "sweep_name", "runs_dir", "logger", "hydra",
    "trainer.progress", "trainer.resume", "trainer.ckpt_every", "trainer.keep_last", "trainer.log_every",
    "data.cache_dir", "data.num_proc", "eval.hellaswag.cache_dir", "eval.hellaswag.path", "eval.hellaswag.url",
)


def results_config(cfg: DictConfig | dict) -> dict:
    """The resolved config without the keys in NOT_RESULTS."""
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(cfg)
    for dotted in NOT_RESULTS:
        *parents, leaf = dotted.split(".")
        node = resolved
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return resolved


def config_fingerprint(cfg: DictConfig | dict) -> str:
    """16 hex digits of the sha256 of the canonical JSON of `results_config(cfg)`."""
    canonical = json.dumps(results_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
