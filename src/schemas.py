"""Everything conf/ needs registered before Hydra composes a config from it: each group's structured-config
schema (so a misspelt key fails at compose time) and the `if_null` resolver of conf/train.yaml. Import this
module for its side effect wherever configs are composed (`python -m src.train`, the sweep planner, tests).
"""

from omegaconf import OmegaConf

import src.data  # noqa: F401  (data/data_schema)
import src.eval.config  # noqa: F401  (eval/eval_schema)
import src.model  # noqa: F401  (model, model/pe/*, model/attention/* schemas)
import src.training.config  # noqa: F401  (trainer/trainer_schema, logger/logger_schema)

# `${if_null:${sweep_name},multirun-...}` in conf/train.yaml: a hand-made multirun (no sweep_name) gets its
# own timestamped directory instead of `<runs_dir>/None`.
OmegaConf.register_new_resolver("if_null", lambda value, fallback: fallback if value is None else value, replace=True)
