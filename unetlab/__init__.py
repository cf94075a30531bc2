"""unetlab: compare U-Net variants honestly.

Public API::

    import unetlab
    unetlab.list_components("fusion")                 # ['add', 'attention', 'concat', 'none']
    unetlab.create("fusion", "add", skip_channels=64, up_channels=32)
    exp = unetlab.load_experiment("experiments/concat_vs_add.yaml", overrides=["train.epochs=1"])
    model = unetlab.build_model(exp.runs[0].config["model"], in_channels=3, out_channels=1)

Plugins implement the hooks in ``unetlab.hookspecs`` with ``@unetlab.hookimpl``.
This module imports neither torch nor mlflow, so ``unetlab --help`` starts fast.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError, PluginError, UnetlabError
from .experiment import Experiment, Run, load_experiment
from .hookspecs import hookimpl
from .plugins import PluginHost, default_host
from .registry import KINDS, Component

__version__ = "0.1.0"

__all__ = [
    "__version__", "hookimpl", "create", "list_components", "get_component", "load_experiment",
    "build_model", "Experiment", "Run", "Component", "KINDS", "PluginHost", "default_host",
    "UnetlabError", "ConfigError", "PluginError",
]


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


def build_model(model_config: dict, in_channels: int, out_channels: int, registry=None):
    """Assemble a U-Net from a resolved ``model`` config section (see ``unetlab.model``)."""
    from .model import build_unet  # torch is imported only when a model is built

    return build_unet(model_config, in_channels, out_channels, registry or default_host().registry)
