"""The experiment file's schema: every key, its type, default and meaning, in one table.

Sections are dicts of ``Field``s. A field with ``kind`` is a component reference, written either as
a name (``fusion: add``) or a mapping with ``name`` and parameters (``encoder: {name: classic,
depth: 4}``); with ``many=True`` it is a list of them (``loss``, ``metrics``). Every number a user
can set has ``bounds`` (a ``Range``), so ``epochs: -3`` is refused with the key and the allowed range
before anything runs. ``validate_config`` normalises a merged config against this table, fills
defaults and checks every component (and its parameters' ranges) against the registry.
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union, cast

from unetlab.errors import ConfigError, did_you_mean, known_list
from unetlab.plugin_api.params import Range, check_value, describe_type
from unetlab.plugin_api.registry import Registry

__all__ = ["Field", "Range", "SCHEMA", "RUN_KEYS", "TOP_LEVEL_KEYS", "validate_config", "normalise_component",
           "lookup_field", "iter_fields"]

Auto = Literal["auto"]

# Sane bounds: generous for real work, small enough that a typo (or an overflow) is caught early.
MAX_COUNT = 100_000            # epochs, intervals, patience
MAX_CHANNELS = 65_536
MAX_BATCH = 65_536
SEED_RANGE = Range(0, 2 ** 32 - 1)  # what numpy's global seed accepts
Channels = Annotated[int, Range(1, MAX_CHANNELS)]


@dataclass(frozen=True)
class Field:
    """One key of an experiment file."""

    annotation: Any
    default: Any
    doc: str
    kind: str | None = None
    many: bool = False
    bounds: Range | None = None  # the allowed interval of a number (or of each number of a list)

    @property
    def checked_annotation(self) -> Any:
        """The annotation ``check_value`` enforces: the type, with ``bounds`` attached when there are any."""
        return _bounded(self.annotation, self.bounds) if self.bounds else self.annotation

    def allowed(self) -> str:
        """What a user may write, for the reference table: ``int in [1, 100000]``, ``an encoder``..."""
        if self.kind:
            return f"{self.kind} list" if self.many else self.kind
        return describe_type(self.checked_annotation)


def _bounded(annotation: Any, bounds: Range) -> Any:
    """Attach ``bounds`` to the numbers: ``Optional[list[int]]`` -> ``Optional[list[Annotated[int, bounds]]]``."""
    if annotation in (int, float):
        return Annotated[annotation, bounds]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return Union[tuple(_bounded(a, bounds) for a in args)]
    if origin is list and args:
        return types.GenericAlias(list, (_bounded(args[0], bounds),))  # list[...] of a type made at run time
    return annotation


Section = dict  # name -> Field | Section

SCHEMA: Section = {
    "name": Field(Optional[str], None, "MLflow experiment name; default: the file's stem"),
    "description": Field(str, "", "free text, logged as the parent run's description"),
    "data": {
        "dataset": Field(None, "shapes", "the dataset component and its parameters", kind="dataset"),
        "batch_size": Field(int, 8, "training batch size", bounds=Range(1, MAX_BATCH)),
        "val_batch_size": Field(Optional[int], None, "validation batch size; default: batch_size",
                                bounds=Range(1, MAX_BATCH)),
        "num_workers": Field(int, 0, "DataLoader worker processes (0: load in the main process)",
                             bounds=Range(0, 256)),
        "pin_memory": Field(Union[bool, Auto], "auto", "pin host memory; auto: only when training on CUDA"),
        "augment": Field(None, [], "augmentations applied to training batches, in order", kind="augmentation",
                         many=True),
        "patch_size": Field(Optional[list[int]], None, "[H, W]: train on random patches of images of any size "
                            "(padding gets mask value 255, ignored); validate on whole images "
                            "(sliding window, as predict)", bounds=Range(1)),
        "foreground_oversample": Field(float, 0.33, "with patch_size: share of patches centred on a foreground "
                                       "pixel", bounds=Range(0, 1)),
        "resize": Field(Optional[list[int]], None, "[H, W]: resize every image (bilinear) and mask (nearest)",
                        bounds=Range(1)),
        "normalize": Field(Optional[dict], None, "null: scale by the dtype (uint8 /255, uint16 /65535); "
                           "{mode: zscore, percentile or fixed, ...}: per dataset, from the training split; "
                           "scope: image (zscore, percentile): statistics of each whole image"),
        "folds": Field(Optional[int], None, "K-fold cross-validation of the training pool (seeded by the "
                       "dataset's seed)", bounds=Range(2, 100)),
        "fold": Field(int, 0, "the fold used for validation (0..folds-1)", bounds=Range(0, 99)),
    },
    "model": {
        "in_channels": Field(Union[int, Auto], "auto", "input channels; auto: the dataset's",
                             bounds=Range(1, MAX_CHANNELS)),
        "out_channels": Field(Union[int, Auto], "auto",
                              "1 = binary (sigmoid logits), >1 = classes (softmax logits); auto: the dataset's",
                              bounds=Range(1, MAX_CHANNELS)),
        "encoder": Field(None, "classic", "the encoder component", kind="encoder"),
        "upsampler": Field(None, "bilinear", "the upsampler used at every decoder level", kind="upsampler"),
        "fusion": Field(None, "concat", "how a skip meets the upsampled map", kind="fusion"),
        "block": Field(None, "double_conv", "the decoder block after each fusion", kind="block"),
        "init": Field(None, "default", "weight initialisation", kind="initializer"),
        "decoder_channels": Field(Optional[list[Channels]], None,
                                  "channels of each decoder level, coarsest first; default: the skip's"),
        "deep_supervision": Field(bool, False, "nnU-Net's deep supervision: 1x1 heads on the decoder levels "
                                  "except the coarsest, targets downsampled (nearest), loss weights 1, 1/2, 1/4... "
                                  "normalised; training only (inference and export use the full-resolution head)"),
    },
    "train": {
        "seed": Field(int, 0, "random seed (overridden per run by seeds:)", bounds=SEED_RANGE),
        "epochs": Field(int, 10, "number of epochs", bounds=Range(1, MAX_COUNT)),
        "max_steps": Field(Optional[int], None, "stop after this many optimizer steps (budget in steps)",
                           bounds=Range(1, 10 ** 9)),
        "loss": Field(None, "bce", "loss, or a weighted list [{name: bce, weight: 0.5}, ...]", kind="loss",
                      many=True),
        "metrics": Field(None, ["iou", "dice"], "metrics computed on the validation set", kind="metric",
                         many=True),
        "optimizer": Field(Literal["adam", "adamw", "sgd"], "adam", "optimizer"),
        "lr": Field(float, 1e-3, "learning rate", bounds=Range(0, 10, min_exclusive=True)),
        "weight_decay": Field(float, 0.0, "weight decay", bounds=Range(0, 1)),
        "momentum": Field(float, 0.9, "momentum (sgd only)", bounds=Range(0, 1)),
        "scheduler": Field(Literal["none", "cosine", "step", "plateau"], "none", "learning-rate schedule"),
        "warmup_epochs": Field(int, 0, "linear warm-up epochs before the schedule", bounds=Range(0, MAX_COUNT)),
        "step_size": Field(int, 10, "epochs between decays (scheduler: step)", bounds=Range(1, MAX_COUNT)),
        "gamma": Field(float, 0.1, "decay factor (scheduler: step, plateau)", bounds=Range(0, 1, min_exclusive=True)),
        "patience": Field(int, 5, "epochs without improvement before decay (scheduler: plateau)",
                          bounds=Range(0, MAX_COUNT)),
        "grad_clip": Field(Optional[float], None, "clip the gradient norm to this value",
                           bounds=Range(0, 1e6, min_exclusive=True)),
        "val_every": Field(int, 1, "validate every N epochs (and always after the last)", bounds=Range(1, MAX_COUNT)),
        "monitor": Field(str, "val_iou", "metric that picks the best checkpoint and drives early stopping"),
        "monitor_mode": Field(Literal["auto", "max", "min"], "auto",
                              "whether a larger monitor value is better; "
                              "auto: the monitored metric's declared direction"),
        "early_stopping": Field(Optional[int], None, "stop after N validations without improvement",
                                bounds=Range(1, MAX_COUNT)),
        "device": Field(str, "auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"),
        "threads": Field(int, 2, "CPU threads the run trains with (torch intra-op); on a CPU they change the "
                         "numbers, so they are part of the run's config, never of how runs are scheduled: "
                         "--jobs and --ray reserve this many cores per run", bounds=Range(1, 1024)),
        "amp": Field(Literal["auto", "off", "bf16", "fp16"], "auto",
                     "mixed precision; auto: bf16 on CUDA when supported, else fp16 with a grad scaler; off on CPU"),
        "channels_last": Field(Union[bool, Auto], "auto", "channels_last memory format; auto: on for CUDA"),
        "compile": Field(Union[bool, Literal["default", "reduce-overhead", "max-autotune"]], False,
                         "wrap the model with torch.compile (true: mode default; reduce-overhead: CUDA graphs, "
                         "for small models whose steps are dominated by launch overhead)"),
        "sync_batchnorm": Field(bool, False, "with several processes (--nproc-per-node), synchronise BatchNorm "
                                "statistics across them (CUDA only)"),
        "encoder_lr_mult": Field(float, 1.0, "the encoder's learning rate is lr times this (fine-tuning a "
                                 "pretrained encoder: e.g. 0.1)", bounds=Range(0, 1000)),
        "freeze_encoder_epochs": Field(int, 0, "the first N epochs train the decoder only: encoder weights frozen, "
                                       "its BatchNorm layers in eval mode (running statistics kept)",
                                       bounds=Range(0, MAX_COUNT)),
        "gradient_checkpointing": Field(bool, False,
                                        "recompute activations in backward: less memory, about 1/3 more compute"),
        "deterministic": Field(bool, True, "deterministic algorithms: same config and seed, same metrics"),
    },
    "tracking": {
        "uri": Field(Optional[str], None,
                     "MLflow tracking URI; MLFLOW_TRACKING_URI wins; default: MLflow's (./mlflow.db)"),
        "log_model": Field(bool, True, "log the best model with mlflow.pytorch.log_model"),
        "checkpoint_dir": Field(str, ".unetlab/checkpoints",
                                "where last/best checkpoints are written (relative to the working directory)"),
        "figures": Field(bool, True, "log learning curves and a prediction figure"),
        "system_metrics": Field(Union[bool, Auto], "auto",
                                "MLflow system metrics (CPU, memory; GPU with nvidia-ml-py: pip install "
                                "'unetlab[gpu]'); auto: on for CUDA runs"),
    },
}

# Keys that are not part of a run's config but shape the expansion.
TOP_LEVEL_KEYS: dict[str, str] = {
    "plugins": "plugin files (.py, relative to the experiment file) or modules to load",
    "variants": "named partial overrides: {name: {dotted.key: value, ...}}",
    "matrix": "cartesian product: {dotted.key: [value, ...]}",
    "seeds": "list of seeds (or a count N for seeds 0..N-1); every variant runs once per seed",
    "tune": "an equal tuning budget per variant: {params: {dotted.key: {uniform|log_uniform|int|choice: ...}}, "
            "trials: N, epochs: E (or max_steps: S), sampler: tpe|random|qmc, seed: S, pruning, metric}",
    "compare": "how unetlab compare judges this experiment: {margin: D, compute_ratio: R}: the equivalence margin (a "
               "difference within ±D of the monitored metric counts as no difference) and the factor by which the "
               "variants' training compute or time may differ before the comparison contract warns (default 1.5)",
}
MAX_SEEDS = 10_000
TOP_LEVEL_ALLOWED: dict[str, str] = {
    "plugins": "list[str]",
    "variants": "mapping; names: letters, digits, _ . + - (at most 64 characters)",
    "matrix": "mapping of dotted key -> non-empty list",
    "seeds": f"list[int in {SEED_RANGE.describe()}] or a count in [1, {MAX_SEEDS}]",
    "tune": "mapping: params, trials, epochs or max_steps, sampler, seed, pruning, metric (README: Fair comparisons)",
    "compare": "mapping with margin: float > 0, compute_ratio: float > 1",
}
MAX_VARIANT_NAME = 64
MAX_RUN_NAME = 200   # a run's name becomes part of its checkpoint directory's name (255 bytes at most)
RUN_KEYS = tuple(SCHEMA)
LOSS_WEIGHT = Annotated[float, Range(0, 1e6)]


def iter_fields(section: Section = SCHEMA, prefix: str = ""):
    """Yield ``(dotted_key, Field)`` for every field of the schema."""
    for key, value in section.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from iter_fields(value, dotted + ".")
        else:
            yield dotted, value


def lookup_field(parts: list[str]) -> tuple[Field | Section | None, int]:
    """Walk the schema along ``parts``; return what was reached and how many parts it consumed.

    Stops at a ``Field`` (parts after it address inside a component) or at an unknown key.
    """
    node: Any = SCHEMA
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            return (node if isinstance(node, Field) else None), i
        node = node[part]
        if isinstance(node, Field):
            return node, i + 1
    return node, len(parts)


def normalise_component(value: Any, field: Field, path: str) -> Any:
    """``'add'`` -> ``{'name': 'add'}``; for ``many`` fields a list of such mappings."""
    def one(v: Any, p: str) -> dict:
        if isinstance(v, str):
            return {"name": v}
        if isinstance(v, dict):
            if "name" not in v:
                raise ConfigError(f"a {field.kind} needs a 'name' (a name or {{name: ..., param: ...}})", p)
            return dict(v)
        raise ConfigError(f"expected a {field.kind} name or a mapping with 'name', got {v!r}", p)

    if field.many:
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"expected a {field.kind} name or a list of them, got {value!r}", path)
        return [one(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return one(value, path)


def defaults() -> dict:
    """The config every run starts from: each field's default, components normalised."""
    def build(section: Section, prefix: str) -> dict:
        out = {}
        for key, value in section.items():
            if isinstance(value, dict):
                out[key] = build(value, f"{prefix}{key}.")
            elif value.kind:
                out[key] = normalise_component(copy.deepcopy(value.default), value, prefix + key)
            else:
                out[key] = copy.deepcopy(value.default)
        return out
    return build(SCHEMA, "")


def validate_config(config: dict, registry: Registry) -> dict:
    """Check a merged run config against the schema and the registry; return it resolved.

    Resolution converts values to their declared types and fills every component's parameter
    defaults, so the result records exactly what ran. Raises ``ConfigError`` with the key path.
    """
    return _validate_section(config, SCHEMA, "", registry)


def validate_section(name: str, values: Any, registry: Registry) -> dict:
    """Check one top-level section (``"model"``...) on its own, as ``validate_config`` would; return it resolved."""
    return _validate_section(values, SCHEMA[name], f"{name}.", registry)


def _validate_section(values: Any, section: Section, prefix: str, registry: Registry) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"expected a mapping with keys {known_list(section)}, got {values!r}",
                          prefix.rstrip(".") or None)
    for key in values:
        if key not in section:
            raise ConfigError(f"unknown key{did_you_mean(key, section)} (allowed: {known_list(section)})",
                              prefix + key)
    out = {}
    for key, spec in section.items():
        path = prefix + key
        value = values.get(key, spec.default if isinstance(spec, Field) else {})
        if isinstance(spec, dict):
            out[key] = _validate_section(value, spec, path + ".", registry)
        elif spec.kind:
            out[key] = _validate_components(value, spec, path, registry)
        else:
            try:
                out[key] = check_value(value, spec.checked_annotation)
            except TypeError as exc:
                raise ConfigError(f"{exc}", path) from None
    return out


def _validate_components(value: Any, spec: Field, path: str, registry: Registry) -> Any:
    entries = normalise_component(value, spec, path)
    items = entries if spec.many else [entries]
    resolved = []
    for i, entry in enumerate(items):
        where = f"{path}[{i}]" if spec.many else path
        name = entry.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"expected a {spec.kind} name, got {name!r}", f"{where}.name")
        component = registry.get(cast(str, spec.kind), name,  # called for component fields only (kind set)
                                 where=f"{where}.name" if spec.many else where)
        params = {k: v for k, v in entry.items() if k != "name"}
        weight = None
        if spec.many and spec.kind == "loss":
            weight = params.pop("weight", 1.0)
            try:
                weight = check_value(weight, LOSS_WEIGHT)
            except TypeError as exc:
                raise ConfigError(f"{exc}", f"{where}.weight") from None
        checked = component.check_params(params, where=where)
        item = {"name": name, **({"weight": weight} if weight is not None else {}), **checked}
        resolved.append(item)
    return resolved if spec.many else resolved[0]


def reference_markdown() -> str:
    """The experiment-file reference as a Markdown table (pasted into README.md; a test checks it is current)."""
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for key, spec in iter_fields():
        default = spec.default
        shown = "null" if default is None else (str(default).lower() if isinstance(default, bool) else default)
        allowed = spec.allowed().replace("|", "\\|")  # a bare | would end the table cell
        rows.append(f"| `{key}` | `{shown}` | {allowed} | {spec.doc} |")
    for key, doc in TOP_LEVEL_KEYS.items():
        rows.append(f"| `{key}` | | {TOP_LEVEL_ALLOWED[key]} | {doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_markdown())
