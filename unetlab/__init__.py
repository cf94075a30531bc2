"""unetlab: compare U-Net variants honestly.

Public API::

    import unetlab
    unetlab.list_components("fusion")                 # ['add', 'attention', 'concat', 'none']
    unetlab.create("fusion", "add", skip_channels=64, up_channels=32)
    exp = unetlab.load_experiment("experiments/concat_vs_add.yaml", overrides=["train.epochs=1"])
    model = unetlab.build_model(exp.runs[0].config["model"], in_channels=3, out_channels=1)
    model = unetlab.build_model({"encoder": {"depth": 3}, "fusion": "add"}, in_channels=1, out_channels=1)

Plugins implement the hooks in ``unetlab.plugin_api.hookspecs`` with ``@unetlab.hookimpl``.
This module imports neither torch nor mlflow, so ``unetlab --help`` starts fast.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from typing import Any

from unetlab import _legacy
from unetlab.config.experiment import Experiment, Run, load_experiment
from unetlab.errors import ConfigError, PluginError, UnetlabError, did_you_mean
from unetlab.plugin_api.contracts import DatasetSource, Loss, Metric, Tracker
from unetlab.plugin_api.hookspecs import PLUGIN_API_VERSION, hookimpl
from unetlab.plugin_api.host import PluginHost, default_host  # noqa: F401  (internal; not in __all__)
from unetlab.plugin_api.params import FilePath, Range
from unetlab.plugin_api.registry import KINDS, Component, PluginDeprecationWarning, Registry

try:  # one home for the version: pyproject.toml, read back from the installed distribution's metadata
    __version__ = importlib.metadata.version("unetlab")
except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

_legacy.install()

# What a plugin author needs beyond the names above, imported on first use: each pulls in torch, and
# ``import unetlab`` (hence ``unetlab --help``) stays free of torch and mlflow.
_LAZY = {
    "logits_to_classes": "unetlab.model.unet",
    "pretrained_mode": "unetlab.model.unet",
    "record_host_syncs": "unetlab.training.host_sync",
    "check_component": "unetlab.plugin_api.conformance",
    "components_of": "unetlab.plugin_api.conformance",
}

__all__ = [
    "KINDS",
    "PLUGIN_API_VERSION",
    "Component",
    "ConfigError",
    "DatasetSource",
    "Experiment",
    "FilePath",
    "Loss",
    "Metric",
    "PluginDeprecationWarning",
    "PluginError",
    "Range",
    "Run",
    "Tracker",
    "UnetlabError",
    "__version__",
    "build_model",
    "check_component",
    "components_of",
    "create",
    "did_you_mean",
    "get_component",
    "hookimpl",
    "list_components",
    "load_experiment",
    "logits_to_classes",
    "pretrained_mode",
    "record_host_syncs",
]


def __getattr__(name: str) -> Any:
    """The lazily imported part of the plugin API (``_LAZY``); the 0.2.0 flat modules are ``_legacy``'s."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unetlab' has no attribute {name!r}")


def list_components(kind: str, pattern: str = "*") -> list[str]:
    """Names of the registered components of ``kind`` that match the shell-style ``pattern``."""
    return default_host().registry.list(kind, pattern)


def get_component(kind: str, name: str) -> Component:
    """The registered component ``kind``/``name`` (its factory, description and parameters)."""
    return default_host().registry.get(kind, name)


def create(kind: str, name: str, /, **kwargs: Any) -> Any:
    """Build a component: contract arguments (``in_channels``...) and parameters as keywords.

    Parameters are checked against the component's declared parameters (unknown names and wrong
    types raise ``ConfigError`` listing the allowed ones).
    """
    return default_host().registry.create(kind, name, **kwargs)


def build_model(model_config: Mapping[str, Any] | None, in_channels: int, out_channels: int,
                registry: Registry | None = None) -> Any:
    """Assemble a U-Net (a ``torch.nn.Module`` returning logits) from a ``model`` section.

    ``model_config`` takes the forms of an experiment file's ``model:`` section: each component a bare
    name or a mapping with ``name`` and parameters (a mapping without ``name`` sets parameters of the
    default component); missing keys get the schema's defaults. ``None`` or ``{}`` is the default U-Net::

        unetlab.build_model({"encoder": {"name": "classic", "depth": 3}, "fusion": "add"}, 3, 1)

    ``out_channels`` is 1 for binary (one sigmoid logit; class 1 where the logit > 0) or the number
    of classes. An unknown name or parameter raises ``ConfigError`` with the key path and a did-you-mean.
    """
    from unetlab.model.unet import (  # torch is imported only when a model is built
        build_unet,
        resolve_model_config,
    )

    registry = registry or default_host().registry
    return build_unet(resolve_model_config(model_config, registry), in_channels, out_channels, registry)
