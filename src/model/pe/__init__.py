"""Positional encodings: one module per file, each registered under its config name."""

from src.model.pe.base import PE_REGISTRY, PEConfig, PositionalEncoding

__all__ = ["PE_REGISTRY", "PEConfig", "PositionalEncoding"]
