"""Hook specifications: what a unetlab plugin can implement.

A plugin is a module (or object) with functions decorated by ``@unetlab.hookimpl`` whose names are
the hooks below. Component hooks receive a ``register`` callback, in the style of llm's
``register_models(register)``::

    import unetlab

    @unetlab.hookimpl
    def register_fusions(register: Register) -> None:
        register("max", MaxFusion)            # description: first line of MaxFusion's docstring

``register(name, factory, description=None, direction=None, binary_only=False)``: ``factory`` is a
class or function; the parameters a user may set in an experiment file are read from its signature
(names, defaults, type hints), minus the *contract arguments* that unetlab itself passes for that kind
(see ``unetlab.plugin_api.registry.KINDS``, the one definition of each kind: one ``register_*`` hook per kind).
``direction`` (``"max"``/``"min"``) is required for metrics; ``binary_only=True`` marks a loss or
metric that only handles one-channel logits.

Lifecycle hooks are called during training with keyword arguments; an implementation may accept
any subset of them (only the ones it names are passed). An exception in one fails the run, naming
the plugin and the hook. A function named like a hook (``register_*``, ``on_*``) that is not one
below makes its plugin broken, with a did-you-mean.

Every hook here must be documented in ``docs/plugins.md`` with its exact signature: a test checks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

from unetlab.plugin_api.contracts import Tracker

#: what a ``register_*`` hook receives: ``register(name, factory, **declarations)``
Register = Callable[..., None]

hookspec = pluggy.HookspecMarker("unetlab")
hookimpl = pluggy.HookimplMarker("unetlab")

#: The version of the contract between unetlab and its plugins (hooks, ``register()`` keywords, component
#: contracts). It goes up when a plugin written for the previous version could break; every change is in
#: CHANGELOG.md. 1: unetlab 0.1. 2: unetlab 0.2 (metrics declare a direction; undeclared is deprecated).
#: A plugin module may state the versions it supports as a module attribute, a PEP 440 specifier:
#: ``UNETLAB_PLUGIN_API = ">=2,<3"``; a unetlab outside that range marks the plugin broken, naming both.
PLUGIN_API_VERSION = 2

#: The module attribute a plugin uses to state the plugin API versions it supports.
PLUGIN_API_ATTRIBUTE = "UNETLAB_PLUGIN_API"


# --- component hooks: one per kind --------------------------------------------------------------


@hookspec
def register_encoders(register: Register) -> None:
    """Register encoders: factory(in_channels, **params) -> nn.Module with ``out_channels`` per stage."""


@hookspec
def register_upsamplers(register: Register) -> None:
    """Register upsamplers: factory(in_channels, out_channels, scale, **params) -> nn.Module."""


@hookspec
def register_fusions(register: Register) -> None:
    """Register skip fusions: factory(skip_channels, up_channels, **params) -> nn.Module with ``out_channels``."""


@hookspec
def register_blocks(register: Register) -> None:
    """Register decoder blocks: factory(in_channels, out_channels, padding, **params) -> nn.Module."""


@hookspec
def register_initializers(register: Register) -> None:
    """Register weight initializers: factory(**params) -> callable(model) that initialises it in place."""


@hookspec
def register_losses(register: Register) -> None:
    """Register losses: factory(num_classes, **params) -> callable(logits, target) -> scalar tensor."""


@hookspec
def register_metrics(register: Register) -> None:
    """Register metrics: factory(num_classes, **params) -> object with reset(), update(logits, target), compute()."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: factory(**params) -> object with in_channels, num_classes, image_size, split(name)."""


@hookspec
def register_augmentations(register: Register) -> None:
    """Register augmentations: factory(**params) -> callable(images, masks, generator) -> (images, masks)."""


# --- lifecycle hooks: called by the trainer -------------------------------------------------------


@hookspec
def on_run_start(run_name: str, config: dict[str, Any], model: Any, tracker: Tracker) -> None:
    """Called once when a run starts, after the model is built and before the first epoch."""


@hookspec
def on_epoch_end(run_name: str, epoch: int, metrics: dict[str, float], model: Any, tracker: Tracker) -> None:
    """Called after each epoch with that epoch's metrics dict (train and, when validated, val)."""


@hookspec
def on_run_end(run_name: str, status: str, metrics: dict[str, float], model: Any, tracker: Tracker) -> None:
    """Called once when a run ends with its final status (FINISHED, FAILED or KILLED) and last metrics."""
