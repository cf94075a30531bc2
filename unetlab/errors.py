"""Errors that unetlab reports to users as one line (exit code 2), and the did-you-mean helper."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["UnetlabError", "ConfigError", "PluginError", "did_you_mean", "known_list", "exception_text"]


class UnetlabError(Exception):
    """A problem the user can fix: the CLI prints its message on one line and exits with code 2."""


class ConfigError(UnetlabError):
    """An experiment file, a ``--set`` override or a component's parameters are invalid.

    ``path`` is the dotted key path the problem is at (``model.encoder.depth``) and ``detail`` the
    message without it; the experiment loader uses them to prefix the file and line.
    """

    def __init__(self, detail: str, path: str | None = None) -> None:
        self.detail = detail
        self.path = path
        super().__init__(f"{path}: {detail}" if path else detail)


class PluginError(UnetlabError):
    """A plugin could not be loaded, or two plugins claim the same component name."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice to ``word``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def known_list(choices: Iterable[str]) -> str:
    """Format names as ``a, b, c`` (sorted), or ``(none)`` when there are none."""
    names = sorted(str(c) for c in choices)
    return ", ".join(names) if names else "(none)"


def exception_text(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (just ``TypeName`` when the message is empty), for one-line errors.

    A ``UnetlabError`` is already worded for the user ("no space left on device writing PATH"): its first
    line alone, without the class name.
    """
    lines = str(exc).strip().splitlines()
    if isinstance(exc, UnetlabError) and lines:
        return lines[0]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
