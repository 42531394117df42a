"""One generic registry; every pluggable kind (losses, adapters, models, ...) is an instance.

    LOSSES = Registry("loss")

    @LOSSES.register("kd")
    class KDLoss(nn.Module): ...

    LOSSES.build("kd", temperature=2)   # arguments checked against the constructor

Third-party code registers the same way: import the module that holds the decorators (the
config's `plugins:` list does that), or expose it as a package entry point in the group
`featkd.plugins`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from typing import Any, Generic, TypeVar

import pydantic

from featkd.errors import ConfigError, RegistryError, did_you_mean

T = TypeVar("T")

ENTRY_POINT_GROUP = "featkd.plugins"
_plugins_loaded = False


def load_entry_point_plugins() -> None:
    """Import every module advertised under the `featkd.plugins` entry-point group, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def import_plugins(modules: list[str]) -> None:
    """Import user modules that register losses, models, ... (the config's `plugins:`)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"plugins: cannot import module {name!r} ({exc}). Put it on PYTHONPATH or "
                "install the package that provides it."
            ) from exc


def first_line(obj: object) -> str:
    """The first paragraph of an object's docstring, as one line."""
    doc = (inspect.getdoc(obj) or "").strip()
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""


class Registry(Generic[T]):
    """Name -> object (usually a class or factory function), with helpful errors."""

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or kind + "s"
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: register the object under `name` (default: its `__name__`)."""

        def decorate(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise RegistryError(f"cannot register {obj!r} as a {self.kind}: give it a name")
            if key in self._entries and self._entries[key] is not obj:
                raise RegistryError(
                    f"{self.kind} {key!r} is already registered (by "
                    f"{_where(self._entries[key])}); choose another name."
                )
            self._entries[key] = obj
            return obj

        return decorate

    def add(self, name: str, obj: T) -> T:
        """Register without a decorator."""
        return self.register(name)(obj)

    def remove(self, name: str) -> None:
        """Forget a name (tests and interactive sessions)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._entries:
            load_entry_point_plugins()
        if name not in self._entries:
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)} "
                f"Known {self.plural}: {', '.join(sorted(self._entries)) or '(none)'}. "
                f"Run `featkd list {self.plural}` to see them with descriptions."
            )
        return self._entries[name]

    def name_of(self, obj: object) -> str | None:
        """The name `obj` is registered under (None if it is not)."""
        return next((name for name, entry in self._entries.items() if entry is obj), None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        load_entry_point_plugins()
        return sorted(self._entries)

    def describe(self, name: str) -> str:
        """One line: the first line of the registered object's docstring."""
        return first_line(self.get(name))

    def check_arguments(self, name: str, arguments: Mapping[str, Any], where: str = "",
                        injected: Iterable[str] = ()) -> dict:
        """Validate keyword arguments for `name`'s constructor; return them converted.

        `injected` names arguments featkd itself supplies (e.g. `params` of an optimizer).
        """
        return check_arguments(self.get(name), arguments, where or f"{self.kind} {name!r}", injected)

    def build(self, name: str, /, **arguments: Any) -> Any:
        """Construct `name` with arguments checked against its signature."""
        factory = self.get(name)
        return factory(**check_arguments(factory, arguments, f"{self.kind} {name!r}"))  # type: ignore[operator]


def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def parameters_of(factory: Callable) -> dict[str, inspect.Parameter]:
    """Keyword parameters a factory (class or function) accepts, without self/*args."""
    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    params = inspect.signature(target).parameters
    return {
        k: p
        for k, p in params.items()
        if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)
    }


@functools.lru_cache(maxsize=512)
def _adapter(hint: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(hint, config=pydantic.ConfigDict(arbitrary_types_allowed=True))


def check_arguments(factory: Callable, arguments: Mapping[str, Any], where: str,
                    injected: Iterable[str] = ()) -> dict:
    """Check names and types of `arguments` against `factory`'s annotated signature.

    Returns the arguments converted by pydantic (e.g. a list becomes a tuple where the
    annotation says tuple). Raises ConfigError naming the argument and what is allowed.
    `injected` arguments are supplied by featkd, so the user may not set them.
    """
    injected = set(injected)
    params = parameters_of(factory)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    named = {k: p for k, p in params.items() if p.kind != p.VAR_KEYWORD}
    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    converted: dict[str, Any] = {}
    for key, value in arguments.items():
        if key in injected:
            raise ConfigError(f"{where}: {key!r} is set by featkd; remove it from the config.")
        if key not in named:
            if takes_any:
                converted[key] = value
                continue
            allowed = ", ".join(k for k in named if k not in injected) or "(none)"
            raise ConfigError(
                f"{where}: unknown argument {key!r}.{did_you_mean(key, named)} Allowed: {allowed}."
            )
        hint = hints.get(key)
        if hint is None:
            converted[key] = value
            continue
        try:
            converted[key] = _adapter(hint).validate_python(value)
        except pydantic.ValidationError as exc:
            expected = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            reason = exc.errors()[0]["msg"]
            raise ConfigError(
                f"{where}: argument {key!r} got {value!r}: {reason} (expected {expected})."
            ) from None
    missing = [
        k
        for k, p in named.items()
        if p.default is p.empty and k not in arguments and k not in injected
    ]
    if missing:
        raise ConfigError(f"{where}: missing required argument(s): {', '.join(missing)}.")
    return converted
