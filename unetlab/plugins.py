"""Plugin discovery and the plugin manager.

Order of discovery: entry points in the group ``unetlab`` (the first-party plugins of the ``unetlab``
distribution and any installed third-party plugin, found the same way), then plugin files or modules
named in an experiment file's ``plugins:`` list. ``UNETLAB_DISABLE_PLUGIN_AUTOLOAD=1`` keeps only the
entry points of the ``unetlab`` distribution itself.

A plugin that fails to import, or raises in a hook, is recorded as broken (``PluginInfo.error``) and
the others go on: unlike llm, one broken plugin does not break every command.
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

from . import hookspecs
from .errors import PluginError, exception_text
from .registry import KINDS, Registry

__all__ = ["ENTRY_POINT_GROUP", "FIRST_PARTY_DISTRIBUTION", "PluginInfo", "PluginHost", "default_host"]

ENTRY_POINT_GROUP = "unetlab"
FIRST_PARTY_DISTRIBUTION = "unetlab"
DISABLE_AUTOLOAD_ENV = "UNETLAB_DISABLE_PLUGIN_AUTOLOAD"


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

    @property
    def broken(self) -> bool:
        """True when the plugin failed to import or raised in a hook."""
        return self.error is not None


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


class PluginHost:
    """A pluggy plugin manager plus the plugins' metadata and the registry built from their hooks."""

    def __init__(self, autoload: bool = True) -> None:
        self.pm = pluggy.PluginManager("unetlab")
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
                              first_party=first_party)
            self.plugins[name] = info
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time failure of a third-party module
                info.error = (f"entry point '{ep.name} = {ep.value}' of distribution "
                              f"'{dist_name} {info.version}' failed to import: {exception_text(exc)}")
                continue
            self._register(plugin, info)

    def load_path_or_module(self, spec: str, base_dir: Path | None = None) -> PluginInfo:
        """Load a plugin named in an experiment file: a ``.py`` path (relative to ``base_dir``) or a module.

        Raises ``PluginError`` naming the plugin and the exception when it cannot be loaded.
        """
        if spec.endswith(".py") or "/" in spec or os.sep in spec:
            path = Path(spec) if Path(spec).is_absolute() else (base_dir or Path.cwd()) / spec
            path = path.resolve()
            name = f"file:{path}"
            if name in self.plugins:
                return self.plugins[name]
            if not path.is_file():
                raise PluginError(f"plugin file '{spec}' not found (looked at {path})")
            module_name = f"unetlab_local_plugins.{path.stem}_{abs(hash(str(path))) % 10**8}"
            try:
                module_spec = importlib.util.spec_from_file_location(module_name, path)
                assert module_spec is not None and module_spec.loader is not None
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[module_name] = module
                module_spec.loader.exec_module(module)
            except Exception as exc:
                sys.modules.pop(module_name, None)
                raise PluginError(f"plugin file '{spec}' failed to load: {exception_text(exc)}") from None
            info = PluginInfo(name=name, source=str(path))
        else:
            name = spec
            if name in self.plugins:
                return self.plugins[name]
            try:
                module = importlib.import_module(spec)
            except Exception as exc:
                raise PluginError(f"plugin module '{spec}' failed to import: {exception_text(exc)}") from None
            info = PluginInfo(name=name, source=f"module {spec}")
        self.plugins[name] = info
        self._register(module, info)
        _ = self.registry  # run its hooks now, so a failure is reported against the experiment file
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
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as exc:  # pluggy rejects impls with no matching spec or a wrong signature
            info.error = f"plugin '{info.name}' has an invalid hook: {exception_text(exc)}"
            return
        info.hooks = sorted(caller.name for caller in (self.pm.get_hookcallers(plugin) or []))
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
        pending: list[tuple[str, str, str, Any, str | None]] = []  # plugin, kind, name, factory, description
        for kind in KINDS.values():
            caller = getattr(self.pm.hook, kind.hook)
            # pluggy lists later-registered impls first; go in registration order so that the
            # "registered twice" message names the earlier plugin first.
            for impl in reversed(caller.get_hookimpls()):
                info = self.plugins.get(impl.plugin_name)
                if info is None or info.broken:
                    continue

                def register(name: str, factory: Any, description: str | None = None,
                             _plugin: str = info.name, _kind: str = kind.name) -> None:
                    pending.append((_plugin, _kind, name, factory, description))

                try:
                    impl.function(**{arg: register for arg in impl.argnames})
                except Exception as exc:
                    origin = f" (distribution '{info.distribution} {info.version}')" if info.distribution else ""
                    info.error = f"plugin '{info.name}'{origin} raised in {kind.hook}: {exception_text(exc)}"
                    self.pm.unregister(name=info.name)  # a broken plugin gets no lifecycle calls either
        registry = Registry()
        for plugin, kind_name, name, factory, description in pending:
            if not self.plugins[plugin].broken:
                registry.add(kind_name, name, factory, description, plugin)
        registry.broken_plugins = [i.name for i in self.plugins.values() if i.broken]
        return registry

    def broken(self) -> list[PluginInfo]:
        """Plugins that failed to import or raised in a hook (builds the registry first)."""
        _ = self.registry
        return [i for i in self.plugins.values() if i.broken]

    def call_lifecycle(self, hook: str, **kwargs: Any) -> None:
        """Call a lifecycle hook (``on_run_start``...) on every working plugin."""
        getattr(self.pm.hook, hook)(**kwargs)


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
