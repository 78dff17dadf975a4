"""NoPE: no positional information at all.

Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length Generalization in Transformers":
a causal decoder can infer position from the causal mask alone. It is the control every PE is compared with.
"""

from dataclasses import dataclass

from src.model.pe.base import PE_REGISTRY, PEConfig, PositionalEncoding


@dataclass
class NoPEConfig(PEConfig):
    pass


@PE_REGISTRY.register("nope", NoPEConfig)
class NoPE(PositionalEncoding):
    pass
