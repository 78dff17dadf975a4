"""Attention mechanisms: one module per file, each registered under its config name."""

from src.model.attention.base import ATTENTION_REGISTRY, AttentionConfig, AttentionMechanism, attention_backend
from src.model.attention.flex import flex_available

__all__ = ["ATTENTION_REGISTRY", "AttentionConfig", "AttentionMechanism", "attention_backend", "flex_available"]
