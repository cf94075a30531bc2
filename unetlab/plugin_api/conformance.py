"""Conformance kit for plugin authors: does a component honour its kind's contract?

In a plugin's own tests::

    import pytest
    from unetlab.plugin_api.conformance import check_component, components_of

    @pytest.mark.parametrize("kind, name", components_of("unetlab_myplugin"))
    def test_conformance(kind, name):
        check_component(kind, name)

``check_component`` builds the component through the registry (as unetlab will), exercises it on
small tensors and raises ``ContractError`` (an ``AssertionError``) naming the component and the
contract it broke, e.g. ``fusion 'max' breaks the fusion contract [out_channels]: ...``.

Besides shapes and gradients it checks meaning where it can: a loss costs less for a perfect
prediction than for its inverse and for swapped foreground classes, and gives float32 for bf16
logits; a metric scores a perfect prediction better than its inverse in its declared direction,
names its keys ``<name>`` and ``<name>_c<k>``, and changes when a boolean parameter is flipped. Losses
and metrics are checked binary (one channel) and with 3 classes, unless registered ``binary_only``.

``components_of`` accepts a plugin's module, entry point or distribution name, or a local ``.py``
file (loaded into the default host, so ``check_component`` then finds its components).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unetlab.plugin_api.host import PluginHost, PluginInfo, default_host
from unetlab.plugin_api.params import Param
from unetlab.plugin_api.registry import KINDS, Component, Registry

__all__ = ["CHECKS", "ContractError", "check_component", "components_of", "load_plugin"]


class ContractError(AssertionError):
    """A component does not do what its kind promises."""


class _Checker:
    def __init__(self, component: Component) -> None:
        self.component = component

    def fail(self, contract: str, detail: str) -> None:
        c = self.component
        raise ContractError(f"{c.kind} '{c.name}' (plugin {c.plugin}) breaks the {c.kind} contract [{contract}]: "
                            f"{detail}")

    def expect(self, ok: bool, contract: str, detail: str) -> None:
        if not ok:
            self.fail(contract, detail)


def _grads_flow(check: _Checker, module: torch.nn.Module, output: Any) -> None:
    tensors = output if isinstance(output, (list, tuple)) else [output]
    total = sum(t.float().square().mean() for t in tensors)
    total.backward()
    for name, p in module.named_parameters():
        if p.requires_grad:
            check.expect(p.grad is not None and bool(torch.isfinite(p.grad).all()), "gradients flow",
                         f"parameter '{name}' gets no (finite) gradient")


def _declared(check: _Checker, params: tuple[Param, ...]) -> None:
    import inspect

    for p in params:
        check.expect(p.annotation is not inspect.Parameter.empty and p.type_name() != "any", "parameters declared",
                     f"parameter '{p.name}' has no type annotation, so experiment files cannot be checked")
    check.expect(bool(check.component.description), "parameters declared",
                 "no description (give the factory a docstring or pass description=)")


def check_encoder(check: _Checker, build: Callable[..., Any]) -> None:
    """An encoder, built for 1 and 3 input channels: ``out_channels`` and ``strides`` declared and consistent,
    'same' or 'valid' padding; for a square and a non-square input, one feature map per level from finest to
    coarsest at the declared channels and (for 'same' padding) sizes; gradients to every parameter."""
    for in_channels in (1, 3):
        enc = build(in_channels=in_channels)
        channels: Any = getattr(enc, "out_channels", None)
        check.expect(isinstance(channels, (list, tuple)) and len(channels) > 0 and
                     all(isinstance(c, int) and c > 0 for c in channels), "out_channels",
                     f"out_channels must be a non-empty list of positive ints, got {channels!r}")
        strides = list(getattr(enc, "strides", [2 ** i for i in range(len(channels))]))
        check.expect(len(strides) == len(channels) and strides[0] >= 1 and
                     all(b % a == 0 and b // a >= 2 for a, b in itertools.pairwise(strides)), "strides",
                     f"strides {strides} must match out_channels {list(channels)} and grow by integer factors >= 2")
        padding = getattr(enc, "padding", "same")
        check.expect(padding in ("same", "valid"), "padding", f"padding must be 'same' or 'valid', got {padding!r}")
        side = 16 * strides[-1] + (188 if padding == "valid" else 0)
        for h, w in ((side, side), (side + strides[-1], side)):
            x = torch.randn(2, in_channels, h, w, requires_grad=True)
            enc.train()
            features = enc(x)
            check.expect(isinstance(features, (list, tuple)) and len(features) == len(channels), "features",
                         f"forward must return {len(channels)} feature maps (finest to coarsest), "
                         f"got {type(features).__name__} of {len(features) if hasattr(features, '__len__') else '?'}")
            for i, (f, c, s) in enumerate(zip(features, channels, strides)):
                check.expect(f.shape[:2] == (2, c), "out_channels",
                             f"feature {i} has shape {tuple(f.shape)}, expected 2 x {c} x H x W")
                if padding == "same":
                    check.expect(abs(f.shape[-2] - h / s) <= 1 and abs(f.shape[-1] - w / s) <= 1, "strides",
                                 f"feature {i} is {f.shape[-2]}x{f.shape[-1]} for a {h}x{w} input; stride {s} "
                                 f"means about {h // s}x{w // s}")
            check.expect(all(a.shape[-1] >= b.shape[-1] for a, b in itertools.pairwise(features)), "features",
                         "feature maps must go from finest to coarsest")
        _grads_flow(check, enc, features)


def check_upsampler(check: _Checker, build: Callable[..., Any]) -> None:
    """An upsampler doubles the spatial size (odd and non-square inputs too), gives the asked channels, and
    passes gradients to every parameter."""
    up = build(in_channels=8, out_channels=4, scale=2)
    for h, w in ((5, 5), (6, 9)):
        y = up(torch.randn(2, 8, h, w, requires_grad=True))
        check.expect(tuple(y.shape) == (2, 4, 2 * h, 2 * w), "doubles the size",
                     f"for a 2x8x{h}x{w} input it returned {tuple(y.shape)}, expected (2, 4, {2 * h}, {2 * w})")
    _grads_flow(check, up, y)


def check_fusion(check: _Checker, build: Callable[..., Any]) -> None:
    """A fusion declares ``out_channels`` and returns that many channels at its inputs' size, for skips wider
    than and as wide as the upsampled path, with gradients to every parameter."""
    for skip_c, up_c in ((6, 4), (4, 4)):
        fusion = build(skip_channels=skip_c, up_channels=up_c)
        out_c = getattr(fusion, "out_channels", None)
        check.expect(isinstance(out_c, int) and out_c > 0, "out_channels",
                     f"must declare out_channels (a positive int), got {out_c!r}")
        y = fusion(torch.randn(2, skip_c, 8, 6, requires_grad=True), torch.randn(2, up_c, 8, 6, requires_grad=True))
        check.expect(tuple(y.shape) == (2, out_c, 8, 6), "out_channels",
                     f"fusing 2x{skip_c}x8x6 with 2x{up_c}x8x6 gave {tuple(y.shape)}, but out_channels is {out_c}")
        _grads_flow(check, fusion, y)


def check_block(check: _Checker, build: Callable[..., Any]) -> None:
    """A block gives ``out_channels`` at the input's size with ``padding='same'`` (gradients reaching every
    parameter), and ``out_channels`` at no larger a size with ``padding='valid'``."""
    block = build(in_channels=8, out_channels=4, padding="same")
    y = block(torch.randn(2, 8, 12, 10, requires_grad=True))
    check.expect(tuple(y.shape) == (2, 4, 12, 10), "same padding keeps the size",
                 f"a 2x8x12x10 input gave {tuple(y.shape)}, expected (2, 4, 12, 10)")
    _grads_flow(check, block, y)
    valid = build(in_channels=8, out_channels=4, padding="valid")
    y = valid(torch.randn(2, 8, 20, 20))
    check.expect(y.shape[1] == 4 and y.shape[-1] <= 20, "valid padding",
                 f"with padding='valid' a 2x8x20x20 input gave {tuple(y.shape)}")


def check_initializer(check: _Checker, build: Callable[..., Any]) -> None:
    """An initializer's factory returns a callable that re-initialises a model in place: same parameter
    shapes, finite values."""
    init = build()
    check.expect(callable(init), "callable", f"the factory must return a callable(model), got {type(init).__name__}")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ConvTranspose2d(4, 2, 2))
    shapes = [p.shape for p in model.parameters()]
    init(model)
    check.expect([p.shape for p in model.parameters()] == shapes, "in place", "it changed parameter shapes")
    check.expect(all(torch.isfinite(p).all() for p in model.parameters()), "finite", "it produced non-finite weights")


def _class_target(num_classes: int) -> torch.Tensor:
    """2 x 8 x 8 class indices with every class present as a block (background elsewhere)."""
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 1:5, 2:6] = 1
    if num_classes > 2:
        target[:, 5:8, 0:3] = 2
    return target


def _confident_logits(target: torch.Tensor, channels: int) -> torch.Tensor:
    """Logits that predict ``target`` confidently (one channel: +-6 around the threshold at 0)."""
    if channels == 1:
        return torch.where(target == 1, 6.0, -6.0)[:, None]
    return 12 * torch.nn.functional.one_hot(target, channels).permute(0, 3, 1, 2).float() - 6


def _cases(check: _Checker) -> list[tuple[int, int]]:
    """``(logit channels, num_classes)``: binary, and 3 classes unless the component is binary-only."""
    return [(1, 2)] if check.component.binary_only else [(1, 2), (3, 3)]


def check_loss(check: _Checker, build: Callable[..., Any]) -> None:
    """A loss, binary and (unless ``binary_only``) 3-class: a finite scalar with finite gradients that 30 Adam
    steps on free logits decrease; lower for a perfect prediction than for its inverse and (3 classes) for
    one with the foreground classes swapped; float32 for bf16 logits."""
    g = torch.Generator().manual_seed(0)
    for channels, num_classes in _cases(check):
        what = "binary (1-channel)" if channels == 1 else f"{num_classes}-class"
        fn = build(num_classes=num_classes)
        target = torch.randint(0, num_classes, (2, 8, 8), generator=g)
        logits = torch.zeros(2, channels, 8, 8).normal_(generator=g).requires_grad_()
        value = fn(logits, target)
        check.expect(isinstance(value, torch.Tensor) and value.dim() == 0 and bool(torch.isfinite(value)),
                     "scalar", f"with {channels} channel(s) it returned {value!r}, expected a finite scalar tensor")
        optimizer = torch.optim.Adam([logits], lr=0.1)
        first = value.item()
        for _ in range(30):
            optimizer.zero_grad()
            loss = fn(logits, target)
            loss.backward()
            check.expect(logits.grad is not None and bool(torch.isfinite(logits.grad).all()), "gradients flow",
                         "no finite gradient reaches the logits")
            optimizer.step()
        last = fn(logits, target).item()
        check.expect(last < first, "decreases", f"30 Adam steps on free logits took it from {first:.4f} to {last:.4f}")

        target = _class_target(num_classes)
        perfect = _confident_logits(target, channels)
        with torch.no_grad():
            good, bad = fn(perfect, target).item(), fn(-perfect, target).item()
        check.expect(good < bad, "perfect beats inverted",
                     f"{what} logits: a perfect prediction costs {good:.4f}, its inverse {bad:.4f}; a loss must be "
                     "lower for the perfect one (sign flipped?"
                     + (" one channel only? register it with binary_only=True)" if channels > 1 else ")"))
        if num_classes > 2:
            swapped = _confident_logits(torch.where(target == 1, 2, torch.where(target == 2, 1, target)), channels)
            with torch.no_grad():
                confused = fn(swapped, target).item()
            check.expect(good < confused, "foreground counts",
                         f"a prediction right on the background but with foreground classes 1 and 2 swapped costs "
                         f"{confused:.4f}, no more than a perfect one ({good:.4f}): "
                         "is it computed on the background only?")
        with torch.no_grad():
            low = fn(perfect.bfloat16(), target)
        check.expect(isinstance(low, torch.Tensor) and low.dtype == torch.float32, "float32 under bf16",
                     f"{what} bf16 logits gave a {getattr(low, 'dtype', type(low).__name__)} loss; compute in float32 "
                     "(logits.float()) so mixed precision stays stable")


def _score_keys(check: _Checker, values: dict[str, Any], num_classes: int) -> None:
    name = check.component.name
    allowed = {name} | {f"{name}_c{k}" for k in range(num_classes)}
    check.expect(isinstance(values, dict) and bool(values) and all(isinstance(v, float) for v in values.values()),
                 "compute", f"compute() must return a non-empty dict of floats, got {values!r}")
    wrong = sorted(set(values) - allowed)
    check.expect(not wrong and name in values, "key names",
                 f"compute() returned keys {sorted(values)} for {num_classes} classes; the keys must be '{name}' "
                 f"(the registered name) and optionally '{name}_c<k>' per class k in 0..{num_classes - 1}")


def _better_or_equal(a: float, b: float, direction: str) -> bool:
    return a >= b - 1e-9 if direction == "max" else a <= b + 1e-9


def check_metric(check: _Checker, build: Callable[..., Any]) -> None:
    """A metric, binary and (unless ``binary_only``) 3-class: a reset/update/compute accumulator whose result
    over two batches equals the one over the same pixels in one; keys ``<name>`` and ``<name>_c<k>``; a
    perfect prediction scoring strictly better than its inverse in the declared direction; and every
    boolean parameter, flipped, changing the result of an imperfect multi-class prediction."""
    direction = check.component.direction or "max"
    for channels, num_classes in _cases(check):
        what = "binary (1-channel)" if channels == 1 else f"{num_classes}-class"
        m = build(num_classes=num_classes)
        for attr in ("reset", "update", "compute"):
            check.expect(callable(getattr(m, attr, None)), "accumulator", f"it has no {attr}()")

        g = torch.Generator().manual_seed(0)
        target = torch.randint(0, num_classes, (4, 8, 8), generator=g)
        logits = torch.randn(4, channels, 8, 8, generator=g)
        m.reset()
        m.update(logits[:2], target[:2])
        m.update(logits[2:], target[2:])
        split = m.compute()
        _score_keys(check, split, num_classes)
        m.reset()
        m.update(logits, target)
        whole = m.compute()
        same = all(math.isclose(split[k], whole[k], rel_tol=1e-6, abs_tol=1e-9) or
                   (math.isnan(split[k]) and math.isnan(whole[k])) for k in whole)
        check.expect(set(split) == set(whole) and same, "accumulates over the whole set",
                     f"two batches gave {split}, the same pixels in one batch gave {whole}")

        truth = _class_target(num_classes)
        perfect = _confident_logits(truth, channels)
        scores = []
        for prediction in (perfect, -perfect):
            m.reset()
            m.update(prediction, truth)
            scores.append(m.compute())
        good, bad = scores
        _score_keys(check, good, num_classes)
        name = check.component.name
        worse = [k for k in good if k in bad and not (math.isnan(good[k]) or math.isnan(bad[k]))
                 and not _better_or_equal(good[k], bad[k], direction)]
        strictly = not math.isnan(good[name]) and not math.isnan(bad[name]) and good[name] != bad[name] and \
            _better_or_equal(good[name], bad[name], direction)
        check.expect(not worse and strictly, "perfect beats inverted",
                     f"{what} logits (one channel: class 1 where the logit > 0): a perfect prediction scored {good}, "
                     f"its inverse {bad}; with direction='{direction}' the perfect one must score better")

        if channels > 1:  # a boolean parameter must change the result of an imperfect multi-class prediction
            for param in check.component.params:
                if param.annotation is bool and not param.required:
                    flipped = build(num_classes=num_classes, **{param.name: not param.default})
                    flipped.reset()
                    flipped.update(logits, target)
                    other = flipped.compute()
                    m.reset()
                    m.update(logits, target)
                    base = m.compute()
                    changed = set(other) != set(base) or any(
                        not (math.isclose(other[k], base[k]) or (math.isnan(other[k]) and math.isnan(base[k])))
                        for k in base)
                    check.expect(changed, "parameters have an effect",
                                 f"{param.name}={not param.default} gave the same result as "
                                 f"{param.name}={param.default} on a {num_classes}-class prediction: {base}")


def check_dataset(check: _Checker, build: Callable[..., Any]) -> None:
    """A dataset source: ``in_channels``, ``num_classes`` (>= 2, background included) and a non-empty
    ``train`` split of float32 C x H x W images with int64 H x W masks of class indices, the same data
    when built twice."""
    source = build()
    for attr in ("in_channels", "num_classes", "split"):
        check.expect(hasattr(source, attr), "source", f"the source has no '{attr}'")
    check.expect(isinstance(source.num_classes, int) and source.num_classes >= 2, "num_classes",
                 f"num_classes counts the background too (2 for binary), got {source.num_classes!r}")
    train = source.split("train")
    check.expect(len(train) > 0, "splits", "split('train') is empty")
    image, mask = train[0]
    check.expect(image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == source.in_channels,
                 "items", f"images must be float32 C x H x W with C = in_channels ({source.in_channels}), "
                          f"got {image.dtype} {tuple(image.shape)}")
    check.expect(mask.dtype == torch.int64 and tuple(mask.shape) == tuple(image.shape[1:]), "items",
                 f"masks must be int64 H x W matching the image, got {mask.dtype} {tuple(mask.shape)}")
    check.expect(int(mask.min()) >= 0 and int(mask.max()) < source.num_classes, "items",
                 f"mask values must be class indices 0..{source.num_classes - 1}")
    again = build().split("train")[0]
    check.expect(torch.equal(again[0], image) and torch.equal(again[1], mask), "deterministic",
                 "building the dataset twice gave different data")


def check_augmentation(check: _Checker, build: Callable[..., Any]) -> None:
    """An augmentation returns ``(images, masks)`` of matching sizes, masks with no new values, the same
    result for the same generator seed, and (when it moves pixels) images still aligned with their masks."""
    masks = torch.zeros(4, 24, 24, dtype=torch.long)
    masks[:, 3:15, 5:9] = 1
    masks[:, 3:6, 5:18] = 1
    images = masks[:, None].float().repeat(1, 3, 1, 1)
    augment = build()
    out_a = augment(images.clone(), masks.clone(), torch.Generator().manual_seed(1))
    out_b = augment(images.clone(), masks.clone(), torch.Generator().manual_seed(1))
    check.expect(isinstance(out_a, tuple) and len(out_a) == 2, "returns (images, masks)",
                 f"got {type(out_a).__name__}")
    image, mask = out_a
    check.expect(mask.dtype == torch.long and image.shape[0] == 4 and image.shape[-2:] == mask.shape[-2:],
                 "shapes", f"images {tuple(image.shape)} and masks {tuple(mask.shape)} {mask.dtype} disagree")
    check.expect(set(mask.unique().tolist()) <= {0, 1}, "classes never blend", "masks gained new values")
    check.expect(torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1]), "seeded",
                 "the same generator seed gave different results (draw randomness only from the generator)")
    geometric = not torch.equal(mask, masks[..., :mask.shape[-2], :mask.shape[-1]])
    if geometric:
        agree = ((image.mean(1) > 0.5).long() == mask).float().mean().item()
        check.expect(agree > 0.97, "image and mask aligned",
                     f"after the transform only {agree:.1%} of pixels agree between image and mask")


def _checks_by_kind() -> dict[str, Callable[[_Checker, Callable[..., Any]], None]]:
    """``check_<kind>`` for every kind of ``registry.KINDS``: a kind without its check fails at import."""
    missing = [kind for kind in KINDS if f"check_{kind}" not in globals()]
    if missing:
        raise RuntimeError(f"unetlab.plugin_api.conformance has no conformance check for kind(s) {', '.join(missing)}")
    return {kind: globals()[f"check_{kind}"] for kind in KINDS}


CHECKS: dict[str, Callable[[_Checker, Callable[..., Any]], None]] = _checks_by_kind()


def check_component(kind: str, name: str, registry: Registry | None = None, **params: Any) -> None:
    """Build ``kind``/``name`` with ``params`` and check its contract; raise ``ContractError`` if broken.

    The component comes from the default plugin host (installed plugins, plus any local plugin
    loaded with ``load_plugin`` or ``components_of("path/to/plugin.py")``) unless ``registry`` is given.
    """
    registry = registry or default_host().registry
    component = registry.get(kind, name)
    check = _Checker(component)
    _declared(check, component.params)

    def build(**contract: Any) -> Any:
        return registry.create(kind, name, **{**params, **contract})

    torch.manual_seed(0)
    CHECKS[kind](check, build)


def load_plugin(spec: str | Path, host: PluginHost | None = None) -> PluginInfo:
    """Load a local plugin (a ``.py`` file or an importable module) into the default host, as an experiment would.

    Raises ``PluginError`` when it cannot be loaded or is broken (e.g. it defines an unknown hook).
    """
    return (host or default_host()).load_path_or_module(str(spec))


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_")


def components_of(plugin: str | Path, registry: Registry | None = None,
                  host: PluginHost | None = None) -> list[tuple[str, str]]:
    """``(kind, name)`` of every component a plugin registers, for ``pytest.mark.parametrize``.

    ``plugin`` is the plugin's module (``unetlab_myplugin``), its entry point name (``myplugin``), its
    distribution (``unetlab-myplugin``: all its entry points) or a local ``.py`` file (loaded first).
    A broken plugin raises ``LookupError`` with the reason, so a plugin's own tests fail on it.
    """
    host = host or default_host()
    spec = str(plugin)
    if spec.endswith(".py") or "/" in spec:
        info = host.load_local(spec)
        names = {info.name}
    else:
        names = {i.name for i in host.plugins.values()
                 if spec in (i.name, i.entry_point)
                 or (i.distribution and _normalise(i.distribution) == _normalise(spec))}
    if registry is None:
        registry = host.registry  # builds the registry, running the hooks (a hook may break a plugin)
    broken = [str(host.plugins[n].error) for n in sorted(names) if n in host.plugins and host.plugins[n].broken]
    if broken:
        raise LookupError(f"plugin '{spec}' is broken: {'; '.join(broken)}")
    found = [(c.kind, c.name) for c in registry if c.plugin in names or c.plugin == spec]
    if not found:
        plugins = sorted({c.plugin for c in registry})
        raise LookupError(f"plugin '{spec}' registers no components (plugins: {', '.join(plugins)})")
    return found
