"""Validate a config node against its dataclass schema: the one place that turns Hydra nodes into objects."""

from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")


def to_dataclass(schema: type[T], node: Any) -> T:
    """`node` (a `schema` instance, DictConfig or dict) as a `schema` instance.

    Interpolations are resolved first (e.g. logger.group=${sweep_name} points outside the node); unknown keys
    and wrong types raise naming the key, and the schema's __post_init__ checks run.
    """
    if isinstance(node, schema):
        return node
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    elif is_dataclass(node):
        node = OmegaConf.structured(node)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
