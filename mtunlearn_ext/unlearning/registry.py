"""Registry of unlearning methods: name -> :class:`~mtunlearn_ext.unlearning.base.Unlearner`.

Methods register themselves with :func:`register_unlearner` when their module is imported;
``mtunlearn_ext.unlearning`` imports the baselines (and any other method module it lists), so the
registry is complete once the package is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from mtunlearn_ext.unlearning.base import Unlearner, UnlearnerConfig, config_from_mapping

__all__ = ["UNLEARNERS", "available_unlearners", "get_unlearner", "register_unlearner"]

UNLEARNERS: dict[str, type[Unlearner]] = {}

U = TypeVar("U", bound=type[Unlearner])


def register_unlearner(cls: U) -> U:
    """Class decorator: add ``cls`` to :data:`UNLEARNERS` under ``cls.name``."""
    name = cls.name
    if not name:
        raise ValueError(f"register_unlearner: {cls.__name__} has no `name`")
    existing = UNLEARNERS.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"register_unlearner: the name {name!r} is taken by "
                         f"{existing.__module__}.{existing.__qualname__}")
    if not issubclass(cls.config_class, UnlearnerConfig):
        raise TypeError(f"register_unlearner: {cls.__name__}.config_class must subclass "
                        f"UnlearnerConfig")
    UNLEARNERS[name] = cls
    return cls


def available_unlearners() -> list[str]:
    """Registered method names, sorted."""
    return sorted(UNLEARNERS)


def get_unlearner(name: str, config: Mapping[str, Any] | UnlearnerConfig | None = None,
                  **overrides: Any) -> Unlearner:
    """An instance of the method ``name`` with its default configuration, updated by ``config``
    (a mapping or a config object) and then by keyword ``overrides``.

    Raises ``KeyError`` naming the registered methods for an unknown name and ``TypeError``
    naming the known settings for an unknown setting.
    """
    if name not in UNLEARNERS:
        raise KeyError(f"unknown unlearning method {name!r}; registered: {available_unlearners()}")
    cls = UNLEARNERS[name]
    if config is None or isinstance(config, Mapping):
        values = dict(config or {})
        values.update(overrides)
        return cls(config_from_mapping(cls.config_class, values))
    if not isinstance(config, cls.config_class):
        raise TypeError(f"{name}: `config` must be a mapping of settings or a config object "
                        f"({cls.config_class.__name__}), got {type(config).__name__}")
    return cls(config, **overrides)
