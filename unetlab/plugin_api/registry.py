"""The component registry: named factories of each kind, filled by plugins' ``register_*`` hooks.

``KINDS`` is the one definition of a component kind: its hook name, its contract arguments and what
it builds. ``unetlab.plugin_api.hookspecs`` declares one hook per kind (checked against ``KINDS`` when the
plugin manager starts), ``unetlab.plugin_api.conformance.CHECKS`` has one check per kind, and the experiment
schema's component fields name kinds from here; ``tests/test_docs.py`` checks that they all agree.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from unetlab.errors import ConfigError, PluginError, did_you_mean, exception_text, known_list
from unetlab.plugin_api.params import OutOfRange, Param, check_value, read_params

__all__ = [
    "DIRECTIONS",
    "KINDS",
    "Component",
    "DuplicateComponentError",
    "Kind",
    "PluginDeprecationWarning",
    "Registry",
    "check_registration",
    "component_params",
    "metric_directions",
    "metric_keys",
    "resolve_monitor_mode",
    "undirected_metric_warning",
]

DIRECTIONS = ("max", "min")


@dataclass(frozen=True)
class Kind:
    """A kind of component: its hook, the contract arguments unetlab passes, and what it builds."""

    name: str
    hook: str
    contract_args: tuple[str, ...]
    summary: str


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("encoder", "register_encoders", ("in_channels",),
             "nn.Module: image -> feature maps finest to coarsest; declares out_channels, strides, padding"),
        Kind("upsampler", "register_upsamplers", ("in_channels", "out_channels", "scale"),
             "nn.Module: doubles the spatial size and maps in_channels -> out_channels"),
        Kind("fusion", "register_fusions", ("skip_channels", "up_channels"),
             "nn.Module: (skip, up) of equal size -> fused map; declares out_channels"),
        Kind("block", "register_blocks", ("in_channels", "out_channels", "padding"),
             "nn.Module: the decoder block applied after fusion"),
        Kind("initializer", "register_initializers", (),
             "callable(model): initialises the model's weights in place"),
        Kind("loss", "register_losses", ("num_classes",),
             "callable(logits, target) -> scalar; target holds class indices"),
        Kind("metric", "register_metrics", ("num_classes",),
             "accumulator: reset(), update(logits, target), compute() -> dict of floats"),
        Kind("dataset", "register_datasets", (),
             "source with in_channels, num_classes, image_size and split('train'|'val'|'test') -> Dataset"),
        Kind("augmentation", "register_augmentations", (),
             "callable(images, masks, generator) -> (images, masks), applied to training batches"),
    )
}


def component_params(spec: Mapping[str, Any], *drop: str) -> dict[str, Any]:
    """A resolved component reference ``{name, **params}`` without its name (and any ``drop`` keys)."""
    return {k: v for k, v in spec.items() if k != "name" and k not in drop}


class DuplicateComponentError(PluginError):
    """Two plugins registered the same kind and name: neither can be chosen, so the command stops."""


class PluginDeprecationWarning(FutureWarning):
    """A plugin uses something the plugin API still accepts but will refuse in a later version.

    A ``FutureWarning`` so that Python shows it by default: its reader is the plugin's author.
    """


def undirected_metric_warning(plugin: str, name: str) -> str:
    """The deprecation message for a metric registered without ``direction=`` (plugin API 1 allowed it)."""
    return (f"plugin '{plugin}': metric '{name}' declares no direction; treated as higher-is-better. "
            f"Deprecated since plugin API 2 (unetlab 0.2): register('{name}', factory, direction='max') "
            f"or direction='min'")


def check_registration(kind: str, name: Any, direction: str | None, binary_only: Any) -> None:
    """Check the keywords of one ``register(...)`` call; a bad one is a ``PluginError`` naming the component.

    A metric should say which way is better (``direction="max"`` or ``"min"``); one that does not is
    accepted as higher-is-better with a deprecation warning (see ``undirected_metric_warning``). Any
    other kind may declare a direction too (a loss: ``"min"``). ``binary_only`` must be a bool.
    """
    if direction is not None and direction not in DIRECTIONS:
        raise PluginError(f"{kind} '{name}': direction must be 'max' or 'min', got {direction!r}"
                          f"{did_you_mean(str(direction), DIRECTIONS)}")
    if not isinstance(binary_only, bool):
        raise PluginError(f"{kind} '{name}': binary_only must be True or False, got {binary_only!r}")


@dataclass(frozen=True)
class Component:
    """A registered component: kind, name, factory, description, parameters and the plugin it came from.

    ``direction``: which way is better, ``"max"`` or ``"min"`` (always set for metrics, else optional).
    ``binary_only``: the component accepts only one-channel (binary) logits; the conformance kit then
    skips its multi-class checks and experiments should use it only for binary tasks.
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    description: str
    params: tuple[Param, ...]
    plugin: str
    direction: str | None = None
    binary_only: bool = False

    def param(self, name: str) -> Param | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)

    def check_params(self, values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """Validate user parameters and return them converted, defaults filled in.

        ``where`` is the dotted key path of the component in the config, used in error messages.
        Raises ``ConfigError`` naming the key path and the allowed parameters.
        """
        allowed = [p.name for p in self.params]
        allowed_text = ", ".join(f"{p.name}: {p.type_name()}" for p in self.params) or "none"

        def path(key: str) -> str:
            return f"{where}.{key}" if where else key

        resolved: dict[str, Any] = {}
        for key, value in values.items():
            param = self.param(key)
            if param is None:
                raise ConfigError(f"unknown parameter of {self.kind} '{self.name}'"
                                  f"{did_you_mean(key, allowed)} (allowed: {allowed_text})", path(key))
            try:
                resolved[key] = check_value(value, param.annotation)
            except OutOfRange as exc:  # the type is right: the range in the message is what is allowed
                raise ConfigError(f"{exc} for {self.kind} '{self.name}'", path(key)) from None
            except TypeError as exc:
                raise ConfigError(f"{exc} for {self.kind} '{self.name}' (allowed: {allowed_text})",
                                  path(key)) from None
        for p in self.params:
            if p.name not in resolved:
                if p.required:
                    raise ConfigError(f"required parameter of {self.kind} '{self.name}' is missing "
                                      f"(allowed: {allowed_text})", path(p.name))
                resolved[p.name] = p.default
        return resolved

    def defaults(self) -> dict[str, Any]:
        """The parameters that have defaults, with their default values."""
        return {p.name: p.default for p in self.params if not p.required}


@dataclass
class Registry:
    """All components by kind, built from the plugins' hooks by ``unetlab.plugin_api.host.PluginHost.registry``."""

    components: dict[str, dict[str, Component]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    broken_plugins: list[str] = field(default_factory=list)

    def add(self, kind: str, name: str, factory: Callable[..., Any], description: str | None,
            plugin: str, direction: str | None = None, binary_only: bool = False) -> Component:
        """Register ``factory`` under ``kind``/``name`` for ``plugin``; a duplicate name is a ``PluginError``."""
        if kind not in KINDS:
            raise PluginError(f"plugin '{plugin}': unknown component kind '{kind}'"
                              f"{did_you_mean(kind, KINDS)} (kinds: {known_list(KINDS)})")
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}': a {kind} was registered with an invalid name {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin '{plugin}': {kind} '{name}' has a factory that is not callable")
        existing = self.components[kind].get(name)
        if existing is not None:
            raise DuplicateComponentError(
                f"{kind} '{name}' is registered twice: by plugin '{existing.plugin}' and by plugin '{plugin}'"
            )
        if description is None:
            doc = (getattr(factory, "__doc__", None) or "").strip()
            description = doc.splitlines()[0] if doc else ""
        check_registration(kind, name, direction, binary_only)
        if direction is None and kind == "metric":
            warnings.warn(undirected_metric_warning(plugin, name), PluginDeprecationWarning, stacklevel=2)
            direction = "max"
        try:
            params = read_params(factory, KINDS[kind].contract_args)
        except (TypeError, ValueError) as exc:  # inspect.signature of a builtin or a broken __signature__
            raise PluginError(f"plugin '{plugin}': {kind} '{name}': its parameters cannot be read from the "
                              f"factory's signature ({exc})") from None
        component = Component(kind, name, factory, description, params, plugin, direction, binary_only)
        self.components[kind][name] = component
        return component

    def get(self, kind: str, name: str, where: str = "") -> Component:
        """The component ``kind``/``name``; an unknown one is a ``ConfigError`` listing the known names."""
        if kind not in KINDS:
            raise ConfigError(f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)} "
                              f"(kinds: {known_list(KINDS)})")
        known = self.components[kind]
        if name not in known:
            hint = (f"; note: plugin(s) failed to load: {', '.join(self.broken_plugins)}"
                    if self.broken_plugins else "")
            raise ConfigError(f"unknown {kind} '{name}'{did_you_mean(name, known)} "
                              f"(known: {known_list(known)}){hint}", where or None)
        return known[name]

    def list(self, kind: str, pattern: str = "*") -> list[str]:
        """Sorted names of ``kind`` matching the shell-style ``pattern`` (``'res*'``)."""
        if kind not in KINDS:
            raise ConfigError(f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)} "
                              f"(kinds: {known_list(KINDS)})")
        return sorted(n for n in self.components[kind] if fnmatch.fnmatchcase(n, pattern))

    def create(self, kind: str, name: str, /, **kwargs: Any) -> Any:
        """Build ``kind``/``name``: contract arguments are passed through, user parameters are checked."""
        component = self.get(kind, name)
        contract = {k: v for k, v in kwargs.items() if k in KINDS[kind].contract_args}
        user = {k: v for k, v in kwargs.items() if k not in KINDS[kind].contract_args}
        return component.factory(**contract, **component.check_params(user))

    def __iter__(self) -> Iterator[Component]:
        for kind in KINDS:
            yield from self.components[kind].values()


def _probe_batch(num_classes: int) -> tuple[Any, Any]:
    """Tiny logits and target holding every class, so per-class keys appear in ``compute()``."""
    import torch

    channels = 1 if num_classes == 2 else num_classes
    target = (torch.arange(16).reshape(1, 4, 4) % num_classes).long()
    if channels == 1:
        logits = torch.where(target == 1, 1.0, -1.0)[:, None]
    else:
        logits = torch.nn.functional.one_hot(target, channels).permute(0, 3, 1, 2).float()
    return logits, target


def metric_keys(spec: Mapping[str, Any], num_classes: int, registry: Registry) -> list[str]:
    """The keys metric ``spec`` (``{name, **params}``) returns from ``compute()``, found by building it and
    feeding it one tiny batch holding every class; a metric that fails on it is a one-line ``PluginError``."""
    component = registry.get("metric", spec["name"])
    metric = registry.create("metric", spec["name"], num_classes=num_classes, **component_params(spec))
    logits, target = _probe_batch(num_classes)
    try:
        metric.reset()
        if not (component.binary_only and num_classes > 2):
            metric.update(logits, target)
        return list(metric.compute())
    except Exception as exc:  # noqa: BLE001 - a plugin's bug: one line naming the metric, not a traceback
        raise PluginError(f"metric '{spec['name']}' (plugin {component.plugin}) failed on a tiny "
                          f"{num_classes}-class batch: {exception_text(exc)}") from None


def metric_directions(train_config: Mapping[str, Any], num_classes: int, registry: Registry) -> dict[str, str]:
    """Every key a run logs (``train_loss``, ``val_loss``, ``val_<metric key>``) -> ``"max"`` or ``"min"``.

    The metrics of ``train_config["metrics"]`` are built, fed one tiny batch holding every class and
    asked for ``compute()``: each key it returns gets the direction its metric registered with.
    """
    directions = {"train_loss": "min", "val_loss": "min"}
    for spec in train_config["metrics"]:
        component = registry.get("metric", spec["name"])
        for key in metric_keys(spec, num_classes, registry):
            directions[f"val_{key}"] = component.direction or "max"
    return directions


def resolve_monitor_mode(train_config: Mapping[str, Any], directions: Mapping[str, str]) -> str:
    """``train.monitor_mode`` with ``"auto"`` replaced by the monitored key's direction."""
    mode = str(train_config["monitor_mode"])
    if mode != "auto":
        return mode
    return directions.get(train_config["monitor"], "max")
