"""Command-line options generated from config dataclasses, and the dataclasses built back.

A field with `metadata["help"]` is an option `--field-name` (dest: the field's name; nested
configs add theirs) whose default is the field's, as `--help` shows. Metadata may also give
`flags`, `metavar`, `action`, `nargs`, `const` (argparse's), `group` (a title; a nested
config's fields inherit it), `unit` (shown in units of this many, stored as an int: MiB for
bytes), `min` / `max` for a number (for a tuple's items: `choices` / `min`). A bool False by
default is a flag, other bools take on|off (and auto for None), an enum its values, a tuple a
comma-separated list (unless its action appends). An option already added is shared
(build's `--seed`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING
from enum import Enum
from types import UnionType
from typing import Any, TypeVar

T = TypeVar("T")

_TOGGLES = {"auto": None, "on": True, "off": False}
_PASSED = ("metavar", "action", "nargs", "const")


def add_options(
    parser: argparse.ArgumentParser, cls: type, *, only: Collection[str] | None = None
) -> None:
    """Add the options of `cls`'s fields (or of those named in `only`) to `parser`."""
    _add(cls, only, None, {None: parser})


def from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """`cls` with its options' parsed values; `given` sets fields that are not options."""
    values = dict(given)
    for f, hint in _fields(cls):
        if f.name in given:
            continue
        if _is_config(hint):
            values[f.name] = from_args(hint, args)
        elif "help" in f.metadata:
            values[f.name] = _stored(getattr(args, f.name), f, hint)
    return cls(**values)


def _add(cls: type, only: Collection[str] | None, title: str | None, groups: dict) -> None:
    """`groups`: the parser (under None) and its argument groups, by title."""
    parser = groups[None]
    taken = {action.dest for action in parser._actions}  # argparse has no public list of them
    for f, hint in _fields(cls):
        if only is not None and f.name not in only:
            continue
        group = f.metadata.get("group", title)
        if _is_config(hint):
            _add(hint, None, group, groups)
        elif "help" in f.metadata and f.name not in taken:
            if group not in groups:
                groups[group] = parser.add_argument_group(group)
            flags, kwargs = _argument(f, hint)
            groups[group].add_argument(*flags, **kwargs)


def _argument(f: dataclasses.Field, hint: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The flags and add_argument keywords of field `f` of type `hint`."""
    meta = f.metadata
    flags = meta.get("flags", ("--" + f.name.replace("_", "-"),))
    base, optional = _unwrap(hint)
    kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
    default = f.default if f.default_factory is MISSING else f.default_factory()
    if default is MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    if base is bool and default is False:
        kwargs["action"] = "store_true"
    elif base is bool:
        kwargs["choices"] = [name for name, v in _TOGGLES.items() if optional or v is not None]
        kwargs["default"] = next(name for name, v in _TOGGLES.items() if v is default)
    elif typing.get_origin(base) is tuple and meta.get("action") == "append":
        # argparse appends to a copy of the default, which must be a list.
        listed = None if default is None else list(default)
        kwargs.update(type=typing.get_args(base)[0], default=listed)
    elif typing.get_origin(base) is tuple:
        kwargs["type"] = _comma_list(typing.get_args(base)[0], meta)
    elif "unit" in meta:
        kwargs.update(type=float, default=default / meta["unit"])
    elif "min" in meta or "max" in meta:
        kwargs["type"] = bounded(base, meta.get("min"), meta.get("max"))
    else:
        kwargs["type"] = base
        if isinstance(base, type) and issubclass(base, Enum):
            kwargs["choices"] = list(base)
    kwargs.update({key: meta[key] for key in _PASSED if key in meta})
    if "choices" not in kwargs and kwargs.get("action") != "store_true":
        kwargs.setdefault("metavar", flags[-1].lstrip("-").replace("-", "_").upper())
    return flags, kwargs


def _stored(value: Any, f: dataclasses.Field, hint: Any) -> Any:
    """A parsed option's value as the field stores it."""
    if _unwrap(hint)[0] is bool and isinstance(value, str):
        return _TOGGLES[value]
    if "unit" in f.metadata:
        return int(value * f.metadata["unit"])
    return tuple(value) if isinstance(value, list) else value


def bounded(number: type[T], low: T | None = None, high: T | None = None) -> Callable[[str], T]:
    """An argparse type: a `number` (int, float) within `[low, high]` (either may be None)."""
    limits = (("at least", low), ("at most", high))
    within = " and ".join(f"{word} {limit}" for word, limit in limits if limit is not None)

    def parse(text: str) -> T:
        try:
            value = number(text)
        except ValueError:
            wanted = f"expected a {number.__name__}, got {text!r}"
            raise argparse.ArgumentTypeError(wanted) from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {within}, got {text}")
        return value

    return parse


def _comma_list(item: type, meta: Mapping[str, Any]) -> Callable[[str], tuple]:
    """An argparse type: `"a,b"` -> `(item("a"), item("b"))`, not empty, each value among
    `meta["choices"]` and at least `meta["min"]` when given."""
    choices, low = meta.get("choices"), meta.get("min")
    wanted = f"values from ({', '.join(choices)})" if choices else f"{item.__name__} values"
    wanted += "" if low is None else f" >= {low}"

    def parse(text: str) -> tuple:
        try:
            values = tuple(item(v.strip()) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or any(
            (choices and v not in choices) or (low is not None and v < low) for v in values
        ):
            raise argparse.ArgumentTypeError(f"expected comma-separated {wanted}, got {text!r}")
        return values

    return parse


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _is_config(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """The type of `X | None` without None, and whether None was allowed."""
    if isinstance(hint, UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0], len(rest) < len(typing.get_args(hint))
    return hint, False
