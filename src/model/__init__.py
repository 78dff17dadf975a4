"""pegrid's GPT-2 core. Public API (a contract: see README "Model API"):

    build_model(cfg.model) -> nn.Module;  model(idx) -> logits;  model(idx, targets) -> (logits, loss)
    from_hf_gpt2(GPT2LMHeadModel or its state dict) -> learned-PE model with HF's logits
"""

from src.model.attention import ATTENTION_REGISTRY
from src.model.build import build_model, model_config
from src.model.config import ModelConfig
from src.model.gpt import GPT
from src.model.hf import from_hf_gpt2
from src.model.pe import PE_REGISTRY

# Import every PE and attention module so their config schemas are in Hydra's ConfigStore.
PE_REGISTRY.load_all()
ATTENTION_REGISTRY.load_all()

__all__ = ["GPT", "ModelConfig", "build_model", "from_hf_gpt2", "model_config", "PE_REGISTRY", "ATTENTION_REGISTRY"]
