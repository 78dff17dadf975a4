"""Attention mechanisms: one module per file, each registered under its config name."""

from src.model.attention.base import ATTENTION_REGISTRY, AttentionConfig, AttentionMechanism

__all__ = ["ATTENTION_REGISTRY", "AttentionConfig", "AttentionMechanism"]
