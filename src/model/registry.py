"""Name -> (config schema, module) registries for positional encodings and attention mechanisms.

A PE or attention module registers itself with a decorator; the registry also stores its config dataclass
in Hydra's ConfigStore as `<name>_schema` in the module's config group, so `conf/model/pe/<name>.yaml` can
start from that schema and a typo or wrong type fails at compose time, naming the key. Nothing else in the
code base knows the list of names: adding a PE is one Python file here, one YAML file and a test parameter.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hydra.core.config_store import ConfigStore

from src.structured import to_dataclass

T = TypeVar("T")


@dataclass
class ComponentConfig:
    """Base of every PE / attention schema: `name` selects the registered implementation."""

    name: str = "???"


class Registry(Generic[T]):
    def __init__(self, kind: str, config_group: str, package: str):
        self.kind, self.config_group, self.package = kind, config_group, package
        self._entries: dict[str, tuple[type[ComponentConfig], type[T]]] = {}

    def register(self, name: str, config_cls: type[ComponentConfig]) -> Callable[[type[T]], type[T]]:
        def decorator(module_cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = (config_cls, module_cls)
            ConfigStore.instance().store(group=self.config_group, name=f"{name}_schema", node=config_cls(name=name))
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

    def resolve(self, cfg: Any) -> tuple[Any, type[T]]:
        """Validate `cfg` (dict, DictConfig or dataclass) against the schema of `cfg.name`.

        Returns the typed config object and the module class. Unknown keys or wrong types raise with the key.
        """
        self.load_all()
        name = cfg.name if not isinstance(cfg, dict) else cfg.get("name")
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        config_cls, module_cls = self._entries[name]
        return to_dataclass(config_cls, cfg), module_cls
