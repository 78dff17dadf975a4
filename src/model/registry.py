"""Name -> (config schema, module) registries for positional encodings and attention mechanisms.

A PE or attention module registers itself with a decorator; the registry also stores its config dataclass
in Hydra's ConfigStore as `<group>_<name>_schema` (`model_pe_fire_schema`; at the root, so that it is not one of
the group's choices: src/structured.py), so `conf/model/pe/<name>.yaml` can start from that schema and a typo or
wrong type fails at compose time, naming the key. Nothing else in the code base knows the list of names: adding
a PE is one Python file and one YAML file (the tests, the benchmark and the analysis take the names from here).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from src.structured import store_schema, to_dataclass

T = TypeVar("T")


@dataclass
class ComponentConfig:
    """Base of every PE / attention schema: `name` selects the registered implementation."""

    name: str = "???"

    @classmethod
    def for_context(cls, block_size: int) -> dict[str, Any]:
        """The config values that size this component for a training context of `block_size` tokens, as
        overrides of the schema's defaults (the benchmark and the tests build every component through this).
        Default: none; a component whose good settings depend on the context (Linformer's chunks) overrides it."""
        return {}


class Registry(Generic[T]):
    def __init__(self, kind: str, config_group: str, package: str):
        self.kind, self.config_group, self.package = kind, config_group, package
        self._entries: dict[str, tuple[type[ComponentConfig], type[T]]] = {}

    def register(self, name: str, config_cls: type[ComponentConfig]) -> Callable[[type[T]], type[T]]:
        def decorator(module_cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = (config_cls, module_cls)
            store_schema(self.config_group, config_cls(name=name), option=name)
            return module_cls

        return decorator

    def load_all(self) -> None:
        """Import every module of the package so each registers itself."""
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self.load_all()
        return sorted(self._entries)

    def entry(self, name: str) -> tuple[type[ComponentConfig], type[T]]:
        """The config dataclass and module class registered under `name`."""
        self.load_all()
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def for_context(self, name: str, block_size: int) -> dict[str, Any]:
        """The config node of `name` sized for a training context of `block_size` tokens: `{"name": name}` plus
        its schema's `for_context` overrides, e.g. {"name": "linformer", "chunk_size": 64, "k": 16} at 256."""
        config_cls, _ = self.entry(name)
        return {"name": name, **config_cls.for_context(block_size)}

    def resolve(self, cfg: Any) -> tuple[Any, type[T]]:
        """Validate `cfg` (dict, DictConfig or dataclass) against the schema of `cfg.name`.

        Returns the typed config object and the module class. Unknown keys or wrong types raise with the key.
        """
        name = cfg.name if not isinstance(cfg, dict) else cfg.get("name")
        config_cls, module_cls = self.entry(name)
        return to_dataclass(config_cls, cfg), module_cls
