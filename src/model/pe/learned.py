"""Learned absolute position embeddings (GPT-2; Radford et al. 2019, as in GPT-1 §3.1).

A trainable table `wpe` of `block_size` vectors added to the token embeddings. It cannot represent a
position it has no row for, so longer inputs raise a clear error instead of indexing out of range.
"""

from dataclasses import dataclass

from torch import Tensor, nn

from src.errors import ConfigError
from src.model.pe.base import PE_REGISTRY, PEConfig, PositionalEncoding


@dataclass
class LearnedConfig(PEConfig):
    init_std: float = 0.02  # GPT-2's initializer_range

    def __post_init__(self) -> None:
        if not self.init_std >= 0:
            raise ConfigError(f"model.pe.init_std must be >= 0, got {self.init_std}")


@PE_REGISTRY.register("learned", LearnedConfig)
class LearnedPE(PositionalEncoding):
    def __init__(self, cfg: LearnedConfig, model_cfg) -> None:
        super().__init__(cfg, model_cfg)
        self.max_positions = model_cfg.block_size
        self.wpe = nn.Embedding(model_cfg.block_size, model_cfg.n_embd)
        nn.init.normal_(self.wpe.weight, std=cfg.init_std)

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x + self.wpe(pos)
