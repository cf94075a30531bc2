"""Experiment files: load, apply variants x matrix x seeds and ``--set`` overrides, validate.

A run's config is built in layers, each recorded with where it came from so that an error can name
the file, the line and the key path that set the bad value:

    schema defaults < base config < variant < matrix cell < --set overrides < the run's seed
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unetlab.config.schema import (
    MAX_RUN_NAME,
    MAX_SEEDS,
    MAX_VARIANT_NAME,
    RUN_KEYS,
    SCHEMA,
    SEED_RANGE,
    TOP_LEVEL_KEYS,
    Field,
    defaults,
    iter_fields,
    lookup_field,
    normalise_component,
    validate_config,
)
from unetlab.config.settings import RunSettings
from unetlab.config.tune import TuneSpec, parse_tune
from unetlab.config.yaml_loader import KeyPath, load_yaml_file, parse_scalar
from unetlab.errors import ConfigError, UnetlabError, did_you_mean, known_list
from unetlab.plugin_api.host import PluginHost, default_host
from unetlab.plugin_api.params import OutOfRange, is_file_path

__all__ = ["Run", "Experiment", "derive_run", "load_experiment", "parse_set", "flatten"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
_MINIMAL_FILE = "a minimal file sets at least one key, e.g. 'train: {epochs: 10}'"


def _clip(text: str, limit: int = 60) -> str:
    """A user's text shortened for an error line (a 300-character name, a 5,000-deep --set value)."""
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


@dataclass
class Run:
    """One resolved run: a variant x matrix cell x seed with its complete, validated config."""

    name: str
    variant: str
    seed: int
    config: dict
    matrix: dict[str, Any] = field(default_factory=dict)
    role: str = "final"      # "trial" (a study's) or "final" (a variant's result): the unetlab.role tag
    tags: dict[str, str] = field(default_factory=dict)  # more tags for its MLflow run (trial number, tuned_from)

    @property
    def settings(self) -> RunSettings:
        """The run's config as typed sections (``run.settings.train.lr``)."""
        return RunSettings.from_config(self.config)

    def flat(self) -> dict[str, Any]:
        """The config flattened to dotted keys (``model.fusion.name``), as logged to MLflow."""
        return flatten(self.config)


@dataclass
class Experiment:
    """A loaded experiment file: its name, source path, plugin specs and resolved runs."""

    name: str
    path: Path | None
    runs: list[Run]
    plugins: list[str]
    description: str = ""
    compare_margin: float | None = None   # compare.margin: the equivalence margin of `unetlab compare`
    compute_ratio: float | None = None    # compare.compute_ratio: the contract's compute warning threshold
    tune: TuneSpec | None = None          # the tune: section; runs are then the final runs (trials come at run time)

    def run(self, name: str) -> Run:
        """The run called ``name``; an unknown name lists the known ones."""
        for r in self.runs:
            if r.name == name:
                return r
        names = [r.name for r in self.runs]
        raise ConfigError(f"no run named '{name}'{did_you_mean(name, names)} (runs: {', '.join(names)})")


@dataclass(frozen=True)
class _Origin:
    where: str        # "file.yaml:12" or "--set"
    key: str          # the key path as written there

    def prefix(self, suffix: str) -> str:
        key = self.key + suffix
        return f"{self.where}: {key}"


class _Layers:
    """A config under construction plus, for each dotted path set, where its value came from."""

    def __init__(self) -> None:
        self.config = defaults()
        self.origins: dict[str, _Origin] = {}

    def copy(self) -> _Layers:
        other = _Layers.__new__(_Layers)
        other.config = copy.deepcopy(self.config)
        other.origins = dict(self.origins)
        return other

    def origin_of(self, path: str) -> tuple[_Origin | None, str]:
        """The origin of ``path`` or of its nearest ancestor, and the rest of the path below it."""
        probe = path
        while True:
            if probe in self.origins:
                return self.origins[probe], path[len(probe):]
            cut = max(probe.rfind("."), probe.rfind("["))
            if cut <= 0:
                return None, path
            probe = probe[:cut]

    def set(self, dotted: str, value: Any, origin: _Origin) -> None:
        """Set ``dotted`` to ``value``: sections merge, a component named anew is replaced whole."""
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"'{dotted}' is not a dotted key path", origin.key)
        spec, used = lookup_field(parts)
        if spec is None:
            section = _section_at(parts[:used])
            raise ConfigError(
                f"unknown key{did_you_mean(parts[used], section)} (allowed: {known_list(section)})",
                origin.key)
        if isinstance(spec, dict):  # a whole section: merge key by key
            if not isinstance(value, dict):
                raise ConfigError(f"expected a mapping with keys {known_list(spec)}, got {value!r}", origin.key)
            for key, sub in value.items():
                self.set(f"{dotted}.{key}", sub, _Origin(origin.where, f"{origin.key}.{key}"))
            return
        field_path = ".".join(parts[:used])
        rest = parts[used:]
        if not rest:
            if spec.kind:
                value = self._merge_component(field_path, spec, value, origin)
            self._drop_origins_below(field_path)
            _put(self.config, parts, value)
            self.origins[field_path] = origin
            return
        # A path inside a field: a component's parameter (model.encoder.depth) or list item (train.loss.0.weight)
        if not spec.kind:
            raise ConfigError(f"'{field_path}' is a plain value and has no key '{rest[0]}'", origin.key)
        target: Any = _get(self.config, parts[:used])
        for part in rest[:-1]:
            target = _step(target, part, origin)
        last = rest[-1]
        if isinstance(target, list):
            target[_index(target, last, origin)] = normalise_component(value, Field(None, None, "", spec.kind),
                                                                       origin.key)
        elif isinstance(target, dict):
            target[last] = value
        else:
            raise ConfigError(f"cannot set '{last}' inside {target!r}", origin.key)
        # keyed as validation errors name it (train.loss[1].weight), so the error points at this --set
        self.origins[field_path + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in rest)] = origin

    def _merge_component(self, path: str, spec: Field, value: Any, origin: _Origin) -> Any:
        # A mapping without 'name' adjusts the current component's parameters; anything else replaces it.
        if isinstance(value, dict) and "name" not in value and not spec.many:
            merged = dict(_get(self.config, path.split(".")))
            merged.update(value)
            return merged
        return normalise_component(value, spec, origin.key)

    def _drop_origins_below(self, path: str) -> None:
        for key in [k for k in self.origins if k.startswith(path + ".") or k.startswith(path + "[")]:
            del self.origins[key]


def _section_at(parts: list[str]) -> dict:
    node: Any = SCHEMA
    for part in parts:
        node = node[part]
    return node


def _get(config: dict, parts: list[str]) -> Any:
    node: Any = config
    for part in parts:
        node = node[part]
    return node


def _put(config: dict, parts: list[str], value: Any) -> None:
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _index(items: list, part: str, origin: _Origin) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"list index '{part}' out of range (the list has {len(items)} item(s))", origin.key)
    return int(part)


def _step(target: Any, part: str, origin: _Origin) -> Any:
    if isinstance(target, list):
        return target[_index(target, part, origin)]
    if isinstance(target, dict) and part in target:
        return target[part]
    raise ConfigError(f"no key '{part}' here", origin.key)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{'model': {'fusion': {'name': 'add'}}}`` -> ``{'model.fusion.name': 'add'}``; lists keep indices."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{dotted}.{i}."))
        else:
            out[dotted] = value
    return out


def parse_set(expression: str) -> tuple[str, Any]:
    """Parse ``--set key.path=value``; the value is read as a YAML scalar or flow collection."""
    if "=" not in expression:
        raise ConfigError(f"--set {_clip(expression)}: expected KEY=VALUE, e.g. --set train.epochs=3")
    key, raw = expression.split("=", 1)
    key = key.strip()
    # same rules as a file: plain data only, bounded depth and size (a 5,000-deep list is one line, not a
    # RecursionError)
    value = parse_scalar(raw, source=f"--set {_clip(key)}") if raw.strip() else ""
    return key, value


def load_experiment(path: str | Path, overrides: Sequence[str] = (), host: PluginHost | None = None) -> Experiment:
    """Load an experiment file into resolved, validated runs.

    Loads the plugins the file names (paths relative to the file), expands variants x matrix x
    seeds, applies ``overrides`` (``"train.epochs=3"``) last and validates every run against the
    schema and the registry; checks the ``tune:`` section against those runs. Raises ``ConfigError``
    (one line: file, line, key path, what is allowed).
    """
    host = host or default_host()
    path = Path(path)
    source = _read_file(path)
    parsed_sets = _take_expansion_overrides(source, overrides)
    plugin_specs = _load_plugins(source, host, path)
    base = _base_layers(source)
    plan = _expansion_plan(source)
    compare = compare_settings(source.data.get("compare"), source.at)
    runs = _expand_runs(source, base, plan, parsed_sets, host.registry)
    return Experiment(name=_experiment_name(source), path=path, runs=runs, plugins=plugin_specs,
                      description=str(source.data.get("description") or ""), compare_margin=compare.margin,
                      compute_ratio=compare.compute_ratio, tune=_tune_section(source, runs, plan, host.registry))


@dataclass
class _Source:
    """An experiment file as read: its data, the line of each key path, and which top-level keys ``--set`` gave."""

    path: Path
    data: dict
    lines: dict
    set_by_override: set[str] = field(default_factory=set)

    @property
    def fname(self) -> str:
        return str(self.path)

    def at(self, key_path: KeyPath) -> str:
        """``file:line`` of ``key_path`` (just the file when the key has no line)."""
        line = self.lines.get(key_path)
        return f"{self.fname}:{line}" if line else self.fname

    def located(self, key: str) -> str:
        """``exp.yaml:3: seeds``, or ``--set seeds`` when an override set it."""
        return f"--set {key}" if key in self.set_by_override else f"{self.at((key,))}: {key}"


@dataclass(frozen=True)
class _Plan:
    """How the runs expand: variants (name -> overrides), matrix (dotted key -> values) and seeds."""

    variants: dict
    matrix: dict
    seeds: list[int] | None


def _read_file(path: Path) -> _Source:
    """Read the file: a non-empty mapping of known top-level keys."""
    data, lines = load_yaml_file(path)
    if data is None or data == {}:
        what = "is empty" if data is None else "is an empty mapping"
        raise ConfigError(f"{path}: the experiment file {what}; {_MINIMAL_FILE}")
    allowed_top = list(RUN_KEYS) + list(TOP_LEVEL_KEYS)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (allowed: {known_list(allowed_top)})")
    source = _Source(path, data, lines)
    for key in data:
        if key not in allowed_top:
            raise ConfigError(f"{source.at((key,))}: {key}: unknown key{did_you_mean(key, allowed_top)} "
                              f"(allowed: {known_list(allowed_top)})")
    return source


def _take_expansion_overrides(source: _Source, overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``--set seeds=...`` and ``--set name=...`` change the expansion itself, so they replace the file's keys
    now; the other overrides are returned, to apply to every run after its variant and matrix cell."""
    parsed_sets = []
    for expression in overrides:
        key, value = parse_set(expression)
        if key in ("seeds", "name"):
            source.data[key] = value
            source.lines.pop((key,), None)
            source.set_by_override.add(key)
        elif key.startswith("tune."):  # the tune section's own keys: tune.trials=20, tune.epochs=10
            section = source.data.get("tune")
            if not isinstance(section, dict):
                raise ConfigError(f"--set {_clip(key)}: the file has no tune section to change")
            section[key[len("tune."):]] = value
            source.set_by_override.add(key)
        else:
            parsed_sets.append((key, value))
    return parsed_sets


def _load_plugins(source: _Source, host: PluginHost, path: Path) -> list[str]:
    """Load the plugins the file names (paths relative to the file); return their specs."""
    plugin_specs = _plugin_list(source.data.get("plugins", []), source.at)
    for i, spec in enumerate(plugin_specs):
        try:
            host.load_path_or_module(spec, base_dir=path.parent)
        except UnetlabError as exc:
            raise ConfigError(f"{source.at(('plugins', i))}: plugins[{i}]: {exc}") from None
    return plugin_specs


def _base_layers(source: _Source) -> _Layers:
    """The schema defaults with the file's run keys (data, model, train, tracking) on top."""
    base = _Layers()
    for key in RUN_KEYS:
        if key in source.data:
            _apply(base, key, source.data[key], _Origin(source.at((key,)), key), source.lines, (key,), source.fname)
    return base


def _expansion_plan(source: _Source) -> _Plan:
    """Check ``variants``, ``matrix`` and ``seeds``."""
    at, data = source.at, source.data
    variants = data.get("variants") or {}
    if not isinstance(variants, dict):
        raise ConfigError(f"{at(('variants',))}: variants: expected a mapping of name -> overrides")
    matrix = data.get("matrix") or {}
    if not isinstance(matrix, dict):
        raise ConfigError(f"{at(('matrix',))}: matrix: expected a mapping of dotted.key -> list of values")
    for key, values in matrix.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{at(('matrix', key))}: matrix.{key}: expected a non-empty list of values")
    seeds = _seed_list(data.get("seeds"), source.located("seeds"))
    for variant_name, variant in variants.items():
        vpath: KeyPath = ("variants", variant_name)
        if not isinstance(variant_name, str) or not _NAME_RE.match(variant_name):
            raise ConfigError(f"{at(vpath)}: variants.{_clip(str(variant_name))}: a variant name may hold "
                              "letters, digits and _ . + - only")
        if len(variant_name) > MAX_VARIANT_NAME:
            raise ConfigError(f"{at(vpath)}: variants.{_clip(variant_name, 40)}: a variant name may be at most "
                              f"{MAX_VARIANT_NAME} characters, got {len(variant_name)}")
        if variant is not None and not isinstance(variant, dict):
            raise ConfigError(f"{at(vpath)}: variants.{variant_name}: expected a mapping of overrides, "
                              f"got {variant!r}")
    return _Plan(variants, matrix, seeds)


def _expand_runs(source: _Source, base: _Layers, plan: _Plan, parsed_sets: list[tuple[str, Any]],
                 registry) -> list[Run]:
    """Every run: variant x matrix cell x seed, each layered, named and validated."""
    runs: list[Run] = []
    names_seen: set[str] = set()
    short = _short_matrix_names(list(plan.matrix))
    for variant_name, variant in list(plan.variants.items()) or [("base", {})]:
        vpath: KeyPath = ("variants", variant_name)
        layered = base.copy()
        for key, value in (variant or {}).items():
            _apply(layered, key, value, _Origin(source.at(vpath + (key,)), f"variants.{variant_name}.{key}"),
                   source.lines, vpath + (key,), source.fname)
        for combo in itertools.product(*[list(enumerate(v)) for v in plan.matrix.values()]):
            cell, cell_values = _matrix_cell(source, layered, plan, combo, parsed_sets)
            for seed in plan.seeds if plan.seeds is not None else [cell.config["train"]["seed"]]:
                run_layers = cell.copy()
                if plan.seeds is not None:
                    run_layers.set("train.seed", seed, _Origin(source.at(("seeds",)), "seeds"))
                name = "/".join([variant_name] * bool(plan.variants or not plan.matrix)
                                + [f"{short[k]}={_label(v)}" for k, v in cell_values.items()]
                                + [f"seed={run_layers.config['train']['seed']}"])
                _check_run_name(source.fname, name, names_seen)
                config = _validated(run_layers, registry, name)
                _resolve_file_paths(config, registry, source.path.parent, run_layers)
                runs.append(Run(name=name, variant=variant_name, seed=config["train"]["seed"],
                                config=config, matrix=cell_values))
    return runs


def _matrix_cell(source: _Source, layered: _Layers, plan: _Plan, combo: tuple,
                 parsed_sets: list[tuple[str, Any]]) -> tuple[_Layers, dict[str, Any]]:
    """A variant's layers with one matrix cell's values, then the ``--set`` overrides, on top."""
    cell = layered.copy()
    cell_values = {}
    for (key, _), (i, value) in zip(plan.matrix.items(), combo):
        _apply(cell, key, value, _Origin(source.at(("matrix", key, i)), f"matrix.{key}[{i}]"),
               source.lines, ("matrix", key, i), source.fname)
        cell_values[key] = value
    for key, value in parsed_sets:
        try:
            cell.set(key, value, _Origin("--set", key))
        except ConfigError as exc:
            raise ConfigError(f"--set {_clip(key)}=...: {exc.detail}") from None
    return cell, cell_values


def _check_run_name(fname: str, name: str, names_seen: set[str]) -> None:
    if len(name) > MAX_RUN_NAME:
        raise ConfigError(f"{fname}: run name '{_clip(name)}' is {len(name)} characters; at most "
                          f"{MAX_RUN_NAME} (shorten variant names or matrix values)")
    if name in names_seen:
        raise ConfigError(f"{fname}: two runs would both be named '{name}'; give variants or seeds distinct values")
    names_seen.add(name)


def _experiment_name(source: _Source) -> str:
    name = source.data.get("name") or source.path.stem
    if not isinstance(name, str):
        raise ConfigError(f"{source.located('name')}: expected a string, got {_clip(repr(name))}")
    if len(name) > MAX_RUN_NAME:
        raise ConfigError(f"{source.located('name')}: an experiment name may be at most {MAX_RUN_NAME} characters, "
                          f"got {len(name)}")
    return name


# Keys a study may not tune: the trial budget sets them, and the seed is what a replicate is.
_NOT_TUNABLE = {"train.epochs": "the per-trial budget (tune.epochs or tune.max_steps) sets it",
                "train.max_steps": "the per-trial budget (tune.epochs or tune.max_steps) sets it",
                "train.seed": "seeds are replicates, not a setting to tune"}


def _tune_section(source: _Source, runs: list[Run], plan: _Plan, registry) -> TuneSpec | None:
    """The ``tune:`` section, checked against the runs: every tuned key is a real config key taking every value
    of its range, none is the variants' factor, and the metric defaults to the monitored one."""
    if source.data.get("tune") is None:
        return None
    def at(key_path: KeyPath) -> str:  # a key that --set gave is located there, not at a line of the file
        return "--set" if ".".join(map(str, key_path[:2])) in source.set_by_override else source.at(key_path)

    spec = parse_tune(source.data["tune"], at)
    for key in plan.matrix:
        if key != "data.fold":
            raise ConfigError(f"{source.at(('matrix', key))}: matrix.{key}: a tuned experiment's matrix may hold "
                              "data.fold only (folds are replicates); make other settings variants")
    factor = _variant_keys(plan.variants)
    templates = list({r.variant: r for r in reversed(runs)}.values())  # each variant's first run
    for p in spec.params:
        where = f"{source.at(('tune', 'params', p.key))}: tune.params.{p.key}"
        clash = next((k for k in factor if p.key == k or p.key.startswith(k + ".") or k.startswith(p.key + ".")),
                     None)
        if clash is not None:
            raise ConfigError(f"{where}: the variants differ in {clash} (the factor compared), so it cannot be tuned")
        if p.key in _NOT_TUNABLE:
            raise ConfigError(f"{where}: not tunable: {_NOT_TUNABLE[p.key]}")
        values = list(p.choices) if p.kind == "choice" else [p.low, p.high]
        for run in templates:
            problems = {}
            for value in values:
                try:
                    derive_run(run, {p.key: value}, registry=registry)
                except ConfigError as exc:
                    problems[_clip(repr(value), 30)] = exc.detail
            if len(set(problems.values())) == 1 and len(problems) == len(values):  # the key, whatever the value
                raise ConfigError(f"{where}: {next(iter(problems.values()))}")
            for value, detail in problems.items():
                place = source.at(("tune", "params", p.key, p.kind))
                raise ConfigError(f"{place}: tune.params.{p.key}.{p.kind}: {value}: {detail}")
    if spec.metric is None:
        monitors = sorted({r.config["train"]["monitor"] for r in runs})
        if len(monitors) > 1:
            raise ConfigError(f"{source.at(('tune',))}: tune: the variants monitor different metrics "
                              f"({', '.join(monitors)}); name the one to tune with tune.metric")
        spec = dataclasses.replace(spec, metric=monitors[0])
    return spec


def _variant_keys(variants: dict) -> set[str]:
    """The dotted keys the variants set (``model.fusion``): what the experiment compares."""
    keys: set[str] = set()
    for overrides in variants.values():
        for key, value in (overrides or {}).items():
            spec, used = lookup_field(key.split("."))
            if isinstance(spec, dict) and isinstance(value, dict) and used == len(key.split(".")):
                keys |= _variant_keys({"": {f"{key}.{k}": v for k, v in value.items()}})
            else:
                keys.add(key)
    return keys


def derive_run(run: Run, values: dict[str, Any], name: str | None = None, role: str | None = None,
               tags: dict[str, str] | None = None, registry=None) -> Run:
    """``run`` with ``values`` (dotted config keys, as a study suggests them) set on its config and validated
    again: a trial of a study, or a final run with its variant's best parameters. A bad value is a
    ``ConfigError`` whose ``detail`` says what is allowed. ``registry``: the plugins' (default: the default host's).
    """
    layers = _Layers.__new__(_Layers)
    layers.config, layers.origins = copy.deepcopy(run.config), {}
    for key, value in values.items():
        layers.set(key, value, _Origin("tune.params", key))
    name = name or run.name
    try:
        config = validate_config(layers.config, registry or default_host().registry)
    except ConfigError as exc:
        raise ConfigError(exc.detail, exc.path) from None
    return Run(name=name, variant=run.variant, seed=config["train"]["seed"], config=config, matrix=dict(run.matrix),
               role=role or run.role, tags={**run.tags, **(tags or {})})


@dataclass(frozen=True)
class CompareSettings:
    """The ``compare:`` section: how ``unetlab compare`` judges the experiment (None: not set, the default)."""

    margin: float | None = None          # the equivalence margin on the judged metric
    compute_ratio: float | None = None   # the contract warns when variants' compute differs by more than this


COMPARE_KEYS = {"margin": "a positive number", "compute_ratio": "a number > 1"}


def compare_settings(section: Any, at: Callable[[KeyPath], str]) -> CompareSettings:
    """Check the ``compare:`` section of an experiment file (absent: the defaults).

    ``at(key_path)`` gives ``file:line`` for error messages.
    """
    if section is None:
        return CompareSettings()
    allowed = ", ".join(COMPARE_KEYS)
    if not isinstance(section, dict):
        raise ConfigError(f"{at(('compare',))}: compare: expected a mapping with the keys {allowed} "
                          "(e.g. compare: {margin: 0.01})")
    for key in section:
        if key not in COMPARE_KEYS:
            raise ConfigError(f"{at(('compare', str(key)))}: compare.{key}: unknown key"
                              f"{did_you_mean(str(key), list(COMPARE_KEYS))} (allowed: {allowed})")
    numbers: dict[str, float | None] = {}
    for key, above in (("margin", 0.0), ("compute_ratio", 1.0)):
        value = section.get(key)
        numbers[key] = None if value is None else _number_above(value, above)
        if value is not None and numbers[key] is None:
            raise ConfigError(f"{at(('compare', key))}: compare.{key}: expected {COMPARE_KEYS[key]}, got {value!r}")
    return CompareSettings(numbers["margin"], numbers["compute_ratio"])


def _number_above(value: Any, above: float) -> float | None:
    """``value`` as a finite float greater than ``above``, or None (not a number, out of range, or an integer
    too large for a float: YAML reads 400 digits as an int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if above < number < float("inf") else None


def _apply(layers: _Layers, key: str, value: Any, origin: _Origin, lines: dict, key_path: KeyPath,
           fname: str) -> None:
    """Apply one key of the file; a section's own keys are applied one by one for precise lines."""
    spec, used = lookup_field(key.split("."))
    if isinstance(spec, dict) and isinstance(value, dict) and used == len(key.split(".")):
        for sub, sub_value in value.items():
            line = lines.get(key_path + (sub,))
            sub_origin = _Origin(f"{fname}:{line}" if line else origin.where, f"{origin.key}.{sub}")
            _apply(layers, f"{key}.{sub}", sub_value, sub_origin, lines, key_path + (sub,), fname)
        return
    try:
        layers.set(key, value, origin)
    except ConfigError as exc:
        raise ConfigError(f"{origin.where}: {exc}") from None
    if isinstance(spec, Field) and spec.kind and used == len(key.split(".")):
        _note_parameter_lines(layers, key, value, origin, lines, key_path, fname)


def _note_parameter_lines(layers: _Layers, key: str, value: Any, origin: _Origin, lines: dict, key_path: KeyPath,
                          fname: str) -> None:
    """Record the line of each parameter of a component written as a block mapping, so that an error in
    ``n_val: 0`` points at that line rather than at ``dataset:`` above it."""
    items = [(f"{key}[{i}]", f"{origin.key}[{i}]", key_path + (i,), v) for i, v in enumerate(value)] \
        if isinstance(value, list) else [(key, origin.key, key_path, value)]
    for path, shown, item_path, item in items:
        if not isinstance(item, dict):
            continue
        for param in item:
            line = lines.get(item_path + (param,))
            if line:
                layers.origins[f"{path}.{param}"] = _Origin(f"{fname}:{line}", f"{shown}.{param}")


def _resolve_file_paths(config: dict, registry, base_dir: Path, layers: _Layers) -> None:
    """Make every component's ``FilePath`` parameter absolute (``~`` expanded): a relative one is taken
    from the experiment file's folder, or from the working directory when ``--set`` gave it."""
    import os

    for dotted, spec in iter_fields():
        if not spec.kind:
            continue
        value = _get(config, dotted.split("."))
        for i, item in enumerate(value if spec.many else [value]):
            component = registry.get(spec.kind, item["name"])
            for param in component.params:
                raw = item.get(param.name)
                if not (isinstance(raw, str) and raw and is_file_path(param.annotation)):
                    continue
                target = Path(raw).expanduser()
                if not target.is_absolute():
                    where = f"{dotted}[{i}]" if spec.many else dotted
                    origin, _ = layers.origin_of(f"{where}.{param.name}")
                    base = Path.cwd() if origin is not None and origin.where == "--set" else base_dir
                    target = Path(os.path.abspath(base / target))
                item[param.name] = str(target)


def _validated(layers: _Layers, registry, run_name: str) -> dict:
    try:
        return validate_config(layers.config, registry)
    except ConfigError as exc:
        if exc.path is None:
            raise
        origin, rest = layers.origin_of(exc.path)
        if origin is None:
            raise ConfigError(f"run '{run_name}': {exc.path}: {exc.detail}") from None
        if origin.where == "--set":
            raise ConfigError(f"--set {origin.key}{rest}: {exc.detail}") from None
        raise ConfigError(f"{origin.prefix(rest)}: {exc.detail}") from None


def _plugin_list(value: Any, at) -> list[str]:
    if value in (None, []):
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{at(('plugins',))}: plugins: expected a list of plugin files or module names")
    return value


def _seed_list(value: Any, where: str) -> list[int] | None:
    """``seeds:`` as a list of seeds; ``where`` is ``exp.yaml:3: seeds`` or ``--set seeds``."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_SEEDS:
            raise ConfigError(f"{where}: a count must be in [1, {MAX_SEEDS}], got {_clip(str(value))}")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(value) > MAX_SEEDS:
            raise ConfigError(f"{where}: at most {MAX_SEEDS} seeds, got {len(value)}")
        for i, seed in enumerate(value):
            try:
                SEED_RANGE.check(seed)
            except OutOfRange as exc:
                raise ConfigError(f"{where}[{i}]: {exc}") from None
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: duplicate seeds in {_clip(str(value))}")
        return value
    raise ConfigError(f"{where}: expected a list of integers or a count, got {_clip(repr(value))}")


def _short_matrix_names(keys: list[str]) -> dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _label(value: Any) -> str:
    if isinstance(value, dict) and "name" in value:
        return str(value["name"])
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True).strip().replace(" ", "")
    return str(value)
