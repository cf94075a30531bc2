"""The flat import paths of unetlab 0.2.0 (``unetlab.params``, ``unetlab.testing``...), kept for one minor version.

0.2.0 was 55 modules directly under ``unetlab``; they now live in layered subpackages. A plugin written against
the 0.2.0 docs imports ``from unetlab.params import Range``: that keeps working until 0.3, with one
``PluginDeprecationWarning`` naming the new home. Two old modules share their name with a new package
(``unetlab.model``, ``unetlab.data``): there the package's ``__getattr__`` serves the old names the same way.
``OLD_MODULES`` is the one list of what moved where; ``install()`` runs when ``unetlab`` is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

REMOVED_IN = "0.3"

OLD_MODULES: dict[str, str] = {
    "hookspecs": "plugin_api.hookspecs", "params": "plugin_api.params", "registry": "plugin_api.registry",
    "plugins": "plugin_api.host", "metric_ranges": "plugin_api.metric_ranges", "testing": "plugin_api.conformance",
    "experiment": "config.experiment", "schema": "config.schema", "yamlio": "config.yaml_loader",
    "data": "data.sources", "data_options": "data.options", "normalization": "data.normalization",
    "splits": "data.splits", "folder_cache": "data.decode_cache", "patches": "data.patches",
    "model": "model.unet", "deep_supervision": "model.deep_supervision", "inference": "model.sliding_window",
    "meta_build": "model.meta_build",
    "preflight": "training.preflight", "trainer": "training.trainer",
    "validation": "training.whole_image_validation", "schedule": "training.lr_schedule",
    "determinism": "training.determinism", "distributed": "training.distributed", "host_sync": "training.host_sync",
    "system_metrics": "training.system_metrics", "model_store": "training.model_store",
    "dataset_identity": "training.dataset_identity",
    "tracking": "tracking.run_tracker", "store_client": "tracking.store_client",
    "run_ownership": "tracking.run_ownership", "per_image": "tracking.per_image",
    "compare": "analysis.compare", "compare_inputs": "analysis.compare_inputs",
    "paired_stats": "analysis.paired_stats", "figures": "analysis.figures", "dashboard": "analysis.dashboard",
    "runner": "runs.runner", "execution": "runs.execution", "ray_runs": "runs.ray_runs",
    "run_outputs": "runs.run_outputs", "resume_checks": "runs.resume_checks", "report": "runs.progress",
    "predict": "deploy.predict", "export": "deploy.export",
    "cli": "cli.main", "datacheck": "cli.data_check", "summary": "cli.model_summary", "scaffold": "cli.new_plugin",
}
# old modules whose name is now a package: the package itself is imported, its __getattr__ serves the old names
SHADOWED_BY_PACKAGE = {name for name, new in OLD_MODULES.items() if new.split(".")[0] == name}


def _warn(old: str, new: str, stacklevel: int) -> None:
    from unetlab.plugin_api.registry import PluginDeprecationWarning

    warnings.warn(f"{old} moved to {new} in unetlab 0.2.1; the old path is removed in {REMOVED_IN}",
                  PluginDeprecationWarning, stacklevel=stacklevel + 1)


class _OldModuleLoader(importlib.abc.Loader):
    """Hands out the module at its new home under the old name, after one warning."""

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(self.old, self.new, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new home is already executed."""


class OldPathFinder(importlib.abc.MetaPathFinder):
    """Finds ``unetlab.<old flat module>`` for every module listed in ``OLD_MODULES``."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.partition(".")
        if prefix != "unetlab" or name not in OLD_MODULES or name in SHADOWED_BY_PACKAGE:
            return None
        return importlib.machinery.ModuleSpec(fullname, _OldModuleLoader(fullname, f"unetlab.{OLD_MODULES[name]}"))


def old_attribute(package: str, name: str) -> Any:
    """``unetlab.model.X`` / ``unetlab.data.X`` for a name of the old flat module: warn, then return it."""
    old = package.rpartition(".")[2]
    new = f"unetlab.{OLD_MODULES[old]}"
    module = importlib.import_module(new)
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    import unetlab

    value = getattr(module, name)
    _warn(f"{package}.{name}", f"unetlab.{name}" if name in unetlab.__all__ else f"{new}.{name}", stacklevel=3)
    setattr(sys.modules[package], name, value)  # warned once: `from ... import` looks a name up twice
    return value


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (``unetlab/__init__.py`` calls this)."""
    if not any(isinstance(finder, OldPathFinder) for finder in sys.meta_path):
        sys.meta_path.append(OldPathFinder())
