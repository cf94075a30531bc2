"""Component parameters read from a factory's signature, and checking user values against them.

A factory declares the range of a numeric parameter with ``typing.Annotated``::

    def encoder(in_channels: int, depth: Annotated[int, Range(1, 8)] = 5): ...

``check_value`` enforces it (``must be >= 1, got 0``) and ``describe_type`` shows it (``int in [1, 8]``).
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

__all__ = ["Param", "REQUIRED", "Range", "OutOfRange", "FilePath", "is_file_path", "read_params", "check_value",
           "describe_type"]


class OutOfRange(TypeError):
    """A value of the right type outside its declared ``Range``.

    A ``TypeError`` because a range is part of the declared type: every caller that reports a type
    mismatch as a one-line config error reports this the same way.
    """


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


@dataclass(frozen=True)
class Range:
    """The allowed interval of a number: ``Range(1)`` is >= 1, ``Range(0, 1, min_exclusive=True)`` is (0, 1].

    Used as ``Annotated[int, Range(1, 8)]`` in a factory signature or as ``Field(..., bounds=Range(1))``
    in the schema. A bounded value must also be finite (no ``.nan``, ``.inf``).
    """

    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    def check(self, value: Any, shown: Any = None) -> None:
        """Raise ``OutOfRange`` when ``value`` (a number; other values pass) lies outside the range.

        ``shown`` is the value as the user wrote it (``-1`` rather than the converted ``-1.0``).
        """
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        got = _short_repr(value if shown is None else shown)
        both = self.minimum is not None and self.maximum is not None
        allowed = f" (allowed: {self.describe()})" if both else ""
        if isinstance(value, float) and not math.isfinite(value):
            raise OutOfRange(f"must be a finite number, got {got}{allowed}")
        lo, hi = self.minimum, self.maximum
        if lo is not None and (value <= lo if self.min_exclusive else value < lo):
            raise OutOfRange(f"must be {'>' if self.min_exclusive else '>='} {_number(lo)}, got {got}{allowed}")
        if hi is not None and (value >= hi if self.max_exclusive else value > hi):
            raise OutOfRange(f"must be {'<' if self.max_exclusive else '<='} {_number(hi)}, got {got}{allowed}")

    def describe(self) -> str:
        """Interval notation: ``[1, 8]``, ``(0, 10]``, ``>= 0``, ``> 0``."""
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return (f"{'(' if self.min_exclusive else '['}{_number(lo)}, {_number(hi)}"
                    f"{')' if self.max_exclusive else ']'}")
        if lo is not None:
            return f"{'>' if self.min_exclusive else '>='} {_number(lo)}"
        if hi is not None:
            return f"{'<' if self.max_exclusive else '<='} {_number(hi)}"
        return "any"


class FilePath:
    """Marks a ``str`` parameter as a file system path: ``Annotated[str, FilePath()]``.

    The experiment loader expands ``~`` and makes a relative path relative to the experiment file
    (to the working directory when it comes from ``--set``), so the resolved config says what was read.
    """


def is_file_path(annotation: Any) -> bool:
    """True for ``Annotated[str, FilePath()]`` (also inside ``Optional[...]``)."""
    if typing.get_origin(annotation) is Annotated:
        return any(isinstance(e, FilePath) for e in typing.get_args(annotation)[1:])
    return any(is_file_path(a) for a in typing.get_args(annotation)) if typing.get_origin(annotation) in (
        Union, types.UnionType) else False


def _split_annotated(annotation: Any) -> tuple[Any, tuple[Range, ...]]:
    """``Annotated[int, Range(1, 8)]`` -> ``(int, (Range(1, 8),))``; other annotations pass through."""
    if typing.get_origin(annotation) is Annotated:
        base, *extras = typing.get_args(annotation)
        return base, tuple(e for e in extras if isinstance(e, Range))
    return annotation, ()


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
        hints = typing.get_type_hints(target, include_extras=True)  # keep Annotated[..., Range]
    except Exception:  # noqa: BLE001 -- any unresolvable annotation (NameError, TypeError...): untyped
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
    base, ranges = _split_annotated(annotation)
    if ranges:
        shown = [r.describe() for r in ranges]
        return " ".join([describe_type(base)] + [f"in {d}" if d[0] in "[(" else d for d in shown])
    annotation = base
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

    Supported: bool, int, float, str, None, Literal, Optional/Union, list[...], tuple[...], dict, Any
    and ``Annotated[T, Range(...)]`` (a value of type T outside the range raises ``OutOfRange``, a
    ``TypeError``). An int is accepted for a float; a bool is never accepted for an int or a float.
    """
    try:
        return _check(value, annotation)
    except _Mismatch:
        raise TypeError(f"expected {describe_type(annotation)}, got {_short_repr(value)}") from None


def _short_repr(value: Any, limit: int = 80) -> str:
    # a user's value can be huge (a 10,000-item list): an error line stays readable
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check(value: Any, annotation: Any) -> Any:
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    annotation, ranges = _split_annotated(annotation)
    if ranges:
        converted = _check(value, annotation)
        for bounds in ranges:
            bounds.check(converted, shown=value)
        return converted
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        out_of_range: OutOfRange | None = None
        for option in args:
            try:
                return _check(value, option)
            except _Mismatch:
                continue
            except OutOfRange as exc:  # the right type, a bad value: report that unless another option fits
                out_of_range = out_of_range or exc
        if out_of_range is not None:
            raise out_of_range
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
            try:
                return float(value)
            except OverflowError:  # an int beyond float's range (10**400)
                raise OutOfRange(f"must be a finite number, got {_short_repr(value)}") from None
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
