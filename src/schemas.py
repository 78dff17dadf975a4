"""Everything conf/ needs registered before Hydra composes a config from it: every group's structured-config
schema (so a misspelt key fails at compose time), the `padded_vocab` resolver of conf/model/gpt2.yaml and the
`if_null` resolver of conf/train.yaml. Import this module for its side effect wherever conf/train.yaml is
composed: `python -m src.train`, sweeps/run_sweep.py, tests/train_helpers.py.

A schema is stored (`store_schema`, src/structured.py: at the root, hidden from `--help` and completion) by the
module that defines its dataclass, so a config that uses one group only needs that module imported:
`python -m src.eval` (conf/evaluate.yaml: `eval`) has it through src.eval, `python -m src.data.prepare`
(conf/prepare.yaml: `data`) through src.data.
"""

from omegaconf import OmegaConf

import src.data  # noqa: F401  (data_schema, the padded_vocab resolver)
import src.eval.config  # noqa: F401  (eval_schema)
import src.model  # noqa: F401  (model_schema, model_pe_*_schema, model_attention_*_schema)
import src.training.config  # noqa: F401  (trainer_schema, logger_schema)

# `${if_null:${sweep_name},multirun-...}` in conf/train.yaml: a hand-made multirun (no sweep_name) gets its
# own timestamped directory instead of `<runs_dir>/None`.
OmegaConf.register_new_resolver("if_null", lambda value, fallback: fallback if value is None else value, replace=True)
