"""Plugin discovery and the plugin manager.

Order of discovery: entry points in the group ``unetlab`` (the first-party plugins of the ``unetlab``
distribution and any installed third-party plugin, found the same way), then plugin files or modules
named in an experiment file's ``plugins:`` list. ``UNETLAB_DISABLE_PLUGIN_AUTOLOAD=1`` keeps only the
entry points of the ``unetlab`` distribution itself.

A plugin that fails to import, implements a function named like a hook that is not one
(``register_fusion``, ``on_epoch_ended``: refused the way pytest refuses unknown hooks, with the
closest real hook), or raises in a component hook is recorded as broken (``PluginInfo.error``), and
the others go on: unlike llm, one broken plugin does not break every command. A plugin named in an
experiment file that is broken is an error of that file.

Hook candidates of a plugin: functions marked with ``@unetlab.hookimpl``, and plain functions of the
plugin's own module whose name starts with ``register_`` or ``on_`` (the decorator is optional, as
for pytest's ``pytest_*`` functions).

An exception in a lifecycle hook (``on_run_start``, ``on_epoch_end``, ``on_run_end``) is a
``PluginError`` naming the plugin and the hook: the run it happened in fails (FAILED, with that
message), as any other error during training.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from unetlab.errors import PluginError, did_you_mean, exception_text, known_list
from unetlab.plugin_api import hookspecs
from unetlab.plugin_api.registry import (
    KINDS,
    DuplicateComponentError,
    Registry,
    check_registration,
    undirected_metric_warning,
)

__all__ = ["ENTRY_POINT_GROUP", "FIRST_PARTY_DISTRIBUTION", "PluginHost", "PluginInfo", "default_host"]

ENTRY_POINT_GROUP = "unetlab"
FIRST_PARTY_DISTRIBUTION = "unetlab"
DISABLE_AUTOLOAD_ENV = "UNETLAB_DISABLE_PLUGIN_AUTOLOAD"
HOOK_PREFIXES = ("register_", "on_")
_PLAIN_IMPL_OPTS = {"wrapper": False, "hookwrapper": False, "optionalhook": False, "tryfirst": False,
                    "trylast": False, "specname": None}


def _spec_names() -> list[str]:
    return sorted(name for name, fn in vars(hookspecs).items() if hasattr(fn, "unetlab_spec"))


def _check_kinds_match_hookspecs() -> None:
    """Each kind in ``registry.KINDS`` has its hook in ``hookspecs`` and vice versa (one definition)."""
    component_hooks = {name for name in _spec_names() if name.startswith("register_")}
    kind_hooks = {kind.hook for kind in KINDS.values()}
    if component_hooks != kind_hooks:
        raise RuntimeError(f"registry.KINDS and hookspecs disagree: hooks without a kind "
                           f"{sorted(component_hooks - kind_hooks)}, "
                           f"kinds without a hook {sorted(kind_hooks - component_hooks)}")


_check_kinds_match_hookspecs()


class _PluginManager(pluggy.PluginManager):
    """pluggy's manager, also taking unmarked ``register_*``/``on_*`` functions of a plugin module as hooks."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None or not name.startswith(HOOK_PREFIXES):
            return opts
        function = getattr(plugin, name, None)
        own_module = getattr(plugin, "__name__", None) if isinstance(plugin, types.ModuleType) else None
        if isinstance(function, types.FunctionType) and own_module and function.__module__ == own_module:
            return dict(_PLAIN_IMPL_OPTS)
        return None


@dataclass
class PluginInfo:
    """What ``unetlab plugins`` shows of one plugin."""

    name: str
    source: str
    distribution: str | None = None
    version: str | None = None
    first_party: bool = False
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    entry_point: str | None = None
    #: components refused alone (a bad ``register()`` call, an unreadable factory), one line each
    refused: list[str] = field(default_factory=list)
    #: deprecation warnings: what still works but will be refused by a later plugin API
    warnings: list[str] = field(default_factory=list)

    @property
    def broken(self) -> bool:
        """True when the plugin failed to import or raised in a hook."""
        return self.error is not None


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


class PluginHost:
    """A pluggy plugin manager plus the plugins' metadata and the registry built from their hooks."""

    def __init__(self, autoload: bool = True) -> None:
        self.pm = _PluginManager("unetlab")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._registry: Registry | None = None
        if autoload:
            self.load_entry_points()

    # --- discovery -------------------------------------------------------------------------------

    def load_entry_points(self) -> None:
        """Load every entry point of the ``unetlab`` group (only first-party ones when autoload is off)."""
        only_first_party = _autoload_disabled()
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.value):
            dist = ep.dist
            dist_name = dist.metadata["Name"] if dist is not None else None
            first_party = dist_name is not None and dist_name.lower() == FIRST_PARTY_DISTRIBUTION
            if only_first_party and not first_party:
                continue
            name = ep.value.split(":")[0]
            if name in self.plugins:
                continue
            info = PluginInfo(name=name, source=f"entry point '{ep.name} = {ep.value}'",
                              distribution=dist_name, version=dist.version if dist else None,
                              first_party=first_party, entry_point=ep.name)
            self.plugins[name] = info
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import-time failure of a third-party module
                info.error = (f"entry point '{ep.name} = {ep.value}' of distribution "
                              f"'{dist_name} {info.version}' failed to import: {exception_text(exc)}")
                continue
            self._register(plugin, info)

    def load_local(self, spec: str, base_dir: Path | None = None) -> PluginInfo:
        """Load a plugin named in an experiment file: a ``.py`` path (relative to ``base_dir``) or a module.

        A plugin that cannot be found, imported or registered is recorded as broken (its ``error``
        says why) rather than raised, so ``unetlab plugins --file`` can list it.
        """
        if spec.endswith(".py") or "/" in spec or os.sep in spec:
            path = Path(spec) if Path(spec).is_absolute() else (base_dir or Path.cwd()) / spec
            path = path.resolve()
            name = f"file:{path}"
            if name in self.plugins:
                return self.plugins[name]
            info = self.plugins[name] = PluginInfo(name=name, source=str(path))
            if not path.is_file():
                info.error = f"plugin file '{spec}' not found (looked at {path})"
                return info
            module_name = f"unetlab_local_plugins.{path.stem}_{abs(hash(str(path))) % 10**8}"
            try:
                module_spec = importlib.util.spec_from_file_location(module_name, path)
                assert module_spec is not None and module_spec.loader is not None
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[module_name] = module
                module_spec.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001 - a plugin file may fail in any way: it is marked broken
                sys.modules.pop(module_name, None)
                info.error = f"plugin file '{spec}' failed to load: {exception_text(exc)}"
                return info
        else:
            name = spec
            if name in self.plugins:
                return self.plugins[name]
            info = self.plugins[name] = PluginInfo(name=name, source=f"module {spec}")
            try:
                module = importlib.import_module(spec)
            except Exception as exc:  # noqa: BLE001 - as for a plugin file
                info.error = f"plugin module '{spec}' failed to import: {exception_text(exc)}"
                return info
        self._register(module, info)
        _ = self.registry  # run its hooks now, so a failure is reported against the experiment file
        return info

    def load_path_or_module(self, spec: str, base_dir: Path | None = None) -> PluginInfo:
        """Load a plugin named in an experiment file (see ``load_local``); raise ``PluginError`` if it is broken."""
        info = self.load_local(spec, base_dir)
        if info.error:
            raise PluginError(info.error)
        return info

    def register(self, plugin: Any, name: str | None = None) -> PluginInfo:
        """Register an in-process plugin object or module (handy in tests and notebooks)."""
        name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin)}"
        info = PluginInfo(name=name, source="registered in process")
        self.plugins[name] = info
        self._register(plugin, info)
        return info

    def _register(self, plugin: Any, info: PluginInfo) -> None:
        info.error = plugin_api_mismatch(plugin, info.name)
        if info.error:
            return
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as exc:  # noqa: BLE001 - pluggy rejects an implementation with arguments its spec lacks
            info.error = f"plugin '{info.name}' has an invalid hook: {exception_text(exc)}"
            return
        callers = self.pm.get_hookcallers(plugin) or []
        info.hooks = sorted(caller.name for caller in callers)
        # pluggy accepts an implementation without a spec (it reports it only in check_pending(), which
        # would blame every plugin at once): refuse it here, naming this plugin and the closest hook.
        unknown = sorted(caller.name for caller in callers if caller.spec is None)
        if unknown:
            hooks = _spec_names()
            info.error = "; ".join(
                f"plugin '{info.name}'{_origin(info)} defines '{fn}', which is not a unetlab hook"
                f"{did_you_mean(fn, hooks) or ' (hooks: ' + known_list(hooks) + ')'}" for fn in unknown)
            self.pm.unregister(name=info.name)
        self._registry = None

    # --- the registry ----------------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        """The registry built from every working plugin's component hooks (built once, then cached)."""
        if self._registry is None:
            self._registry = self._build_registry()
        return self._registry

    def _build_registry(self) -> Registry:
        # Collect every plugin's registrations first and commit only those of plugins that did not
        # raise in any hook, so a half-registered broken plugin leaves nothing behind.
        pending: list[tuple[Any, ...]] = []  # plugin, kind, name, factory, description, direction, binary_only
        for known in self.plugins.values():  # every build runs every hook again: its findings replace the last
            known.refused.clear()
            known.warnings.clear()
        for kind in KINDS.values():
            caller = getattr(self.pm.hook, kind.hook)
            # pluggy lists later-registered impls first; go in registration order so that the
            # "registered twice" message names the earlier plugin first.
            for impl in reversed(caller.get_hookimpls()):
                info = self.plugins.get(impl.plugin_name)
                if info is None or info.broken:
                    continue

                def register(name: str, factory: Any, description: str | None = None, direction: str | None = None,
                             binary_only: bool = False, _info: PluginInfo = info, _kind: str = kind.name) -> None:
                    # A component that breaks its contract is refused alone: the plugin's others still load.
                    try:
                        check_registration(_kind, name, direction, binary_only)
                    except PluginError as exc:
                        _info.refused.append(f"plugin '{_info.name}': {exception_text(exc)}")
                        return
                    if direction is None and _kind == "metric":
                        _info.warnings.append(undirected_metric_warning(_info.name, name))
                        direction = "max"
                    pending.append((_info.name, _kind, name, factory, description, direction, binary_only))

                try:
                    impl.function(**{arg: register for arg in impl.argnames})
                except Exception as exc:  # noqa: BLE001 - a plugin's hook may raise anything: it is marked broken
                    info.error = f"plugin '{info.name}'{_origin(info)} raised in {kind.hook}: {exception_text(exc)}"
                    self.pm.unregister(name=info.name)  # a broken plugin gets no lifecycle calls either
        registry = Registry()
        for plugin, kind_name, name, factory, description, direction, binary_only in pending:
            info = self.plugins[plugin]
            if info.broken:
                continue
            try:
                registry.add(kind_name, name, factory, description, plugin, direction, binary_only)
            except DuplicateComponentError:
                raise  # two plugins claim one name: no choice is right, so the command stops and names both
            except PluginError as exc:
                info.refused.append(exception_text(exc))
        registry.broken_plugins = [i.name for i in self.plugins.values() if i.broken]
        return registry

    def problem_lines(self) -> list[str]:
        """One warning line per broken plugin, refused component and deprecation (builds the registry first).

        The one text every command prints before its work, so that a plugin problem reads the same everywhere.
        """
        _ = self.registry
        lines = []
        for info in self.plugins.values():
            if info.broken:
                lines.append(f"{info.error} (skipped; see 'unetlab plugins')")
            lines += [f"{text} (refused; the plugin's other components load)" for text in info.refused]
            lines += info.warnings
        return lines

    def warn_problems(self) -> None:
        """Print ``problem_lines`` to stderr, each as ``unetlab: warning: ...``: every command warns through this."""
        for line in self.problem_lines():
            print(f"unetlab: warning: {line}", file=sys.stderr)

    def broken(self) -> list[PluginInfo]:
        """Plugins that failed to import or raised in a hook (builds the registry first)."""
        _ = self.registry
        return [i for i in self.plugins.values() if i.broken]

    def call_lifecycle(self, hook: str, **kwargs: Any) -> None:
        """Call a lifecycle hook (``on_run_start``...) on every working plugin, in registration order.

        An exception in an implementation is a ``PluginError`` naming the plugin and the hook (the
        run fails with it); the implementations after it are not called.
        """
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as exc:
                info = self.plugins.get(impl.plugin_name)
                origin = _origin(info) if info else ""
                raise PluginError(f"plugin '{impl.plugin_name}'{origin} raised in {hook}: "
                                  f"{exception_text(exc)}") from exc


def plugin_api_mismatch(plugin: Any, name: str) -> str | None:
    """Why ``plugin`` cannot load with this plugin API version (``None`` when it can or states no range).

    The range is the plugin's ``UNETLAB_PLUGIN_API`` attribute, a PEP 440 specifier such as ``">=2,<3"``.
    """
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    stated = getattr(plugin, hookspecs.PLUGIN_API_ATTRIBUTE, None)
    if stated is None:
        return None
    try:
        supported = SpecifierSet(str(stated))
    except InvalidSpecifier:
        return (f"plugin '{name}': {hookspecs.PLUGIN_API_ATTRIBUTE} = {stated!r} is not a version specifier "
                f"(e.g. '>=2,<3')")
    if str(hookspecs.PLUGIN_API_VERSION) in supported:
        return None
    from unetlab import __version__

    return (f"plugin '{name}' supports unetlab plugin API {stated}, but this unetlab ({__version__}) has plugin "
            f"API {hookspecs.PLUGIN_API_VERSION}: install a version of the plugin made for it")


def _origin(info: PluginInfo) -> str:
    return f" (distribution '{info.distribution} {info.version}')" if info.distribution else ""


_default: PluginHost | None = None


def default_host() -> PluginHost:
    """The process-wide plugin host, created on first use (loads entry points once)."""
    global _default
    if _default is None:
        _default = PluginHost()
    return _default


def module_from_functions(name: str, **functions: Any) -> types.ModuleType:
    """Build a module-like plugin from hook functions (for tests and quick experiments)."""
    module = types.ModuleType(name)
    for fname, fn in functions.items():
        setattr(module, fname, hookspecs.hookimpl(fn))
    return module
