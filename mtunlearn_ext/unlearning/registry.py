"""Registry of unlearning methods: name -> :class:`~mtunlearn_ext.unlearning.base.Unlearner`.

Methods register themselves with :func:`register_unlearner` when their module is imported;
``mtunlearn_ext.unlearning`` imports the baselines (and any other method module it lists), so the
registry is complete once the package is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from mtunlearn_ext._definitions import same_definition
from mtunlearn_ext._errors import UnknownNameError
from mtunlearn_ext.unlearning.base import Unlearner, UnlearnerConfig, config_from_mapping

__all__ = ["UNLEARNERS", "available_unlearners", "get_unlearner", "register_unlearner"]

_unlearners: dict[str, type[Unlearner]] = {}

#: Method name -> class, a read-only view: methods are added by :func:`register_unlearner`,
#: whose checks a write would skip.
UNLEARNERS: Mapping[str, type[Unlearner]] = MappingProxyType(_unlearners)

U = TypeVar("U", bound=type[Unlearner])


def _declares_fields(config_class: type) -> bool:
    """Whether ``config_class`` itself annotates a field or sets a class attribute named like a
    field of its dataclass parents (a new default)."""
    own = config_class.__dict__
    inherited = getattr(config_class, "__dataclass_fields__", {})
    return bool(own.get("__annotations__")) or any(name in own for name in inherited)


def register_unlearner(cls: U) -> U:
    """Class decorator: add ``cls`` to :data:`UNLEARNERS` under ``cls.name``.

    ``cls`` must subclass :class:`Unlearner` and set ``name`` (identifier-like: it names
    files, settings and command lines), and its ``config_class`` must be
    a dataclass of its own (decorated with ``@dataclass``) subclassing
    :class:`UnlearnerConfig`. A name taken by another class is refused; the same definition
    run again (equal module and qualified name: a reloaded module) replaces its entry.
    """
    if not isinstance(cls, type) or not issubclass(cls, Unlearner):
        raise TypeError(f"register_unlearner: expected a subclass of Unlearner, got {cls!r}")
    name = cls.name
    if not name or not isinstance(name, str):
        raise ValueError(f"register_unlearner: {cls.__qualname__} has no `name` (a non-empty "
                         f"str), got {name!r}")
    if not name.isidentifier():
        # The name goes into file names (`unlearn`'s default `<input>.<name>.pt`: a '/' made
        # that a path elsewhere, or a traceback), command lines, JSON keys and terminal lines
        # (an ESC in it recoloured them), as register_benchmark's names do.
        raise ValueError(f"register_unlearner: {cls.__qualname__}.name must be an "
                         f"identifier-like string (letters, digits, '_'; not starting with a "
                         f"digit), as a benchmark's, got {name!r}")
    existing = UNLEARNERS.get(name)
    if existing is not None and not same_definition(existing, cls):
        raise ValueError(f"register_unlearner: the name {name!r} of "
                         f"{cls.__module__}.{cls.__qualname__} is taken by "
                         f"{existing.__module__}.{existing.__qualname__}; choose another name")
    config_class = cls.config_class
    if not isinstance(config_class, type) or not issubclass(config_class, UnlearnerConfig):
        raise TypeError(f"register_unlearner: {cls.__qualname__}.config_class must subclass "
                        f"UnlearnerConfig, got {config_class!r}")
    if "__dataclass_fields__" not in config_class.__dict__ and _declares_fields(config_class):
        # Without its own @dataclass a subclass keeps its parent's fields and __init__: its
        # declared defaults are ignored and its new fields refused as unknown settings. (One
        # that declares none, e.g. only a stricter validate(), is fine as it is.)
        parent = next(c for c in config_class.__mro__[1:] if "__dataclass_fields__" in c.__dict__)
        raise TypeError(f"register_unlearner: {cls.__qualname__}.config_class "
                        f"{config_class.__qualname__} is not a dataclass itself, so it has the "
                        f"fields and defaults of {parent.__qualname__} and not its own; add "
                        f"@dataclass above `class {config_class.__name__}`")
    _unlearners[name] = cls
    return cls


def method_source(name: str) -> dict[str, str | None] | None:
    """Where the registered method ``name`` comes from, when it is not one of the library's
    own (``None`` for those: the code version names them; and for a name not registered):
    ``{"class": module.qualname,
    "file": its source file (absolute; None without one), "sha256": that file's}``. Method
    names are per process, so a record or a kept run file names the code, and a changed
    plugin file tells a kept result from a fresh one."""
    import inspect
    from pathlib import Path

    from mtunlearn_ext._io import sha256_of_file

    cls = _unlearners.get(name)
    if cls is None or cls.__module__.startswith("mtunlearn_ext."):
        return None
    try:
        found = inspect.getsourcefile(cls)
    except (TypeError, OSError):  # a class of an interactive session: no file
        found = None
    file = Path(found).resolve() if found else None
    digest = sha256_of_file(file) if file is not None and file.is_file() else None
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "file": None if file is None else str(file), "sha256": digest}


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
        raise UnknownNameError(f"unknown unlearning method {name!r}; registered: "
                               f"{available_unlearners()}")
    cls = UNLEARNERS[name]
    if config is None or isinstance(config, Mapping):
        values = dict(config or {})
        values.update(overrides)
        return cls(config_from_mapping(cls.config_class, values))
    if not isinstance(config, cls.config_class):
        raise TypeError(f"{name}: `config` must be a mapping of settings or a config object "
                        f"({cls.config_class.__name__}), got {type(config).__name__}")
    return cls(config, **overrides)
