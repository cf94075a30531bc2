"""Component parameters read from a factory's signature, and checking user values against them."""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union

__all__ = ["Param", "REQUIRED", "read_params", "check_value", "describe_type"]


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()
"""Sentinel default of a parameter that has no default value."""


@dataclass(frozen=True)
class Param:
    """One user-settable parameter of a component: its name, default and type annotation."""

    name: str
    default: Any
    annotation: Any

    @property
    def required(self) -> bool:
        """True when the parameter has no default."""
        return self.default is REQUIRED

    def type_name(self) -> str:
        """A short human-readable name of the parameter's type (``int``, ``'a'|'b'``, ``list[float]``)."""
        return describe_type(self.annotation)


def read_params(factory: Callable[..., Any], contract_args: tuple[str, ...]) -> tuple[Param, ...]:
    """Read the user-settable parameters of ``factory``: its keyword parameters minus ``contract_args``.

    String annotations (``from __future__ import annotations``) are resolved with
    ``typing.get_type_hints``; ``*args`` and ``**kwargs`` are ignored.
    """
    target = factory.__init__ if inspect.isclass(factory) else factory
    signature = inspect.signature(factory)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: fall back to untyped
        hints = {}
    params = []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in contract_args or p.name == "self":
            continue
        default = REQUIRED if p.default is inspect.Parameter.empty else p.default
        annotation = hints.get(p.name, Any if p.annotation is inspect.Parameter.empty else p.annotation)
        params.append(Param(p.name, default, annotation))
    return tuple(params)


def describe_type(annotation: Any) -> str:
    """Render a type annotation for error messages and ``unetlab plugins``."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "|".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return "|".join(describe_type(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        inner = describe_type(args[0]) if args else "any"
        return f"list[{inner}]"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


class _Mismatch(Exception):
    pass


def check_value(value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` (int -> float, list -> tuple) or raise ``TypeError``.

    Supported: bool, int, float, str, None, Literal, Optional/Union, list[...], tuple[...], dict and Any.
    An int is accepted for a float; a bool is never accepted for an int or a float.
    """
    try:
        return _check(value, annotation)
    except _Mismatch:
        raise TypeError(f"expected {describe_type(annotation)}, got {value!r}") from None


def _check(value: Any, annotation: Any) -> Any:
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _check(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if annotation is type(None) or annotation is None:
        if value is None:
            return None
        raise _Mismatch
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0]) for v in value)
        if origin is tuple and args:
            if len(args) != len(value):
                raise _Mismatch
            return tuple(_check(v, a) for v, a in zip(value, args))
        converted = [_check(v, args[0]) for v in value] if args else list(value)
        return tuple(converted) if (origin is tuple or annotation is tuple) else converted
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _Mismatch
    return value  # an annotation we do not understand: accept rather than block the user
