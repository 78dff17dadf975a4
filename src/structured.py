"""Config dataclasses as Hydra schemas: where they are stored (`store_schema`) and the one place that turns
Hydra nodes into validated objects (`to_dataclass`)."""

from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
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


def schema_name(group: str, option: str | None = None) -> str:
    """The name `store_schema` stores the schema of config group `group` (of its `option`, if the options have
    schemas of their own) under: `model/pe` + `fire` -> `model_pe_fire_schema`, `trainer` -> `trainer_schema`."""
    return "_".join([*group.split("/"), *([option] if option else []), "schema"])


def store_schema(group: str, node: Any, option: str | None = None) -> str:
    """Store the dataclass (or instance) `node` in Hydra's ConfigStore as the schema of `group` (or of its
    `option`) and return its name, `schema_name(group, option)`.

    The schema is stored at the root of the config tree, not in `group`: a config in a group is one of the
    group's options, listed by `--help` and by shell completion (`model/pe=<TAB>`), and a schema is not a choice.
    Each YAML option of the group starts from it, e.g. conf/model/pe/fire.yaml:
        defaults: [/model_pe_fire_schema@_here_, _self_]
    so its values merge onto the dataclass, with its defaults, and a misspelt key or a wrong type fails at
    compose time, naming the key. Import the module that calls this before composing (src/schemas.py).
    """
    name = schema_name(group, option)
    ConfigStore.instance().store(name=name, node=node)
    return name


def dotted_leaves(node: dict, prefix: str = "") -> dict:
    """Nested dicts as {dotted key: leaf value}: {"scaling": {"type": "yarn"}} -> {"scaling.type": "yarn"} (an
    empty dict is a leaf)."""
    leaves = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            leaves.update(dotted_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def nested_get(mapping: dict, dotted_key: str) -> Any:
    """`mapping["a"]["b"]` for "a.b", or a flat `mapping["a.b"]` (how some tools store W&B configs); None if absent."""
    if dotted_key in mapping:
        return mapping[dotted_key]
    node: Any = mapping
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
