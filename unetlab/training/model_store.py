"""Trained models as data: weights plus a plain-data identity, never a pickle that can run code.

A tracking store (a shared sqlite file, an artifact bucket, an ``mlflow server``) is infrastructure
other people can write to, so reading a model from it must not execute anything. Every run logs,
beside the MLflow model (kept for MLflow-native users, who trust their store), the artifact
``unetlab_model/weights.pt``: a ``torch.save`` of plain containers and tensors only

    {"format": 1, "model": state_dict, "model_config": {...}, "in_channels": C, "out_channels": K,
     "normalization": {...},  # when the dataset declares one
     "resize": [H, W]}        # when the run set data.resize: predict feeds the model images of that size

which ``torch.load(weights_only=True)`` reads without unpickling code. ``load_trained`` rebuilds the
architecture through the component registry (installed plugins: trusted code) from ``model_config``
and loads the weights into it. The same rule covers checkpoint files (``best.pt``/``last.pt``).
"""

from __future__ import annotations

import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetlab.errors import UnetlabError, exception_text
from unetlab.plugin_api.contracts import normalization_of

if TYPE_CHECKING:
    import torch

    from unetlab.training.preflight import Prepared

__all__ = [
    "WEIGHTS_ARTIFACT",
    "TrainedModel",
    "load_model",
    "load_trained",
    "log_model_weights",
    "model_identity",
    "weights_run_id",
]

WEIGHTS_DIR = "unetlab_model"
WEIGHTS_ARTIFACT = f"{WEIGHTS_DIR}/weights.pt"
WEIGHTS_TAG = "unetlab.weights_artifact"  # set once the artifact is logged
FORMAT = 1
IDENTITY_KEYS = ("model_config", "in_channels", "out_channels")


@dataclass
class TrainedModel:
    """A model rebuilt from weights, in eval mode, with what prediction needs besides the weights."""

    model: torch.nn.Module
    in_channels: int
    out_channels: int
    normalization: dict | None  # the dataset's normalisation spec (``unetlab.data.normalization``), if any
    source: str                 # where it came from, for messages
    resize: tuple[int, int] | None = None  # data.resize of the training run: the model's input size


def model_identity(prepared: Prepared) -> dict[str, Any]:
    """The plain-data description a trained model is rebuilt and fed from, for ``prepared``'s run.

    The one definition of what checkpoints (``best.pt``/``last.pt``) and the ``weights.pt`` artifact
    hold besides the weights: architecture, channels, the dataset's normalisation spec and
    ``data.resize``, so that ``unetlab predict`` turns a file into exactly the tensor training saw.
    """
    config = prepared.run.config
    identity: dict[str, Any] = {"model_config": config["model"], "in_channels": int(prepared.in_channels),
                                "out_channels": int(prepared.out_channels)}
    normalization = normalization_of(prepared.source)
    if normalization:
        identity["normalization"] = normalization
    resize = (config.get("data") or {}).get("resize")
    if resize:
        identity["resize"] = [int(resize[0]), int(resize[1])]
    return identity


def log_model_weights(run_tracker, model: torch.nn.Module, identity: dict[str, Any]) -> str:
    """Log ``model``'s weights and ``identity`` as the run's ``unetlab_model/weights.pt``; return that path.

    ``run_tracker`` is a ``unetlab.tracking.run_tracker.RunTracker`` (anything with ``client`` and ``run_id``).
    """
    import torch

    missing = [k for k in IDENTITY_KEYS if k not in identity]
    if missing:
        raise ValueError(f"model identity lacks {', '.join(missing)}")
    state = {"format": FORMAT, **identity,
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with tempfile.TemporaryDirectory(prefix="unetlab-weights-") as tmp:
        path = Path(tmp) / "weights.pt"
        torch.save(state, path)
        torch.load(path, map_location="cpu", weights_only=True)  # fail here, not at predict time
        run_tracker.client.log_artifact(run_tracker.run_id, str(path), WEIGHTS_DIR)
    # so that a missing artifact can later be told apart: deleted from the store, not never logged
    run_tracker.client.set_tag(run_tracker.run_id, WEIGHTS_TAG, WEIGHTS_ARTIFACT)
    return WEIGHTS_ARTIFACT


def load_model(spec: str) -> torch.nn.Module:
    """The model of ``spec`` (see ``load_trained``), in eval mode on the CPU."""
    return load_trained(spec).model


def load_trained(spec: str) -> TrainedModel:
    """Rebuild a trained model from a checkpoint file, an MLflow run id, or a ``runs:/`` / ``models:/`` URI.

    Only weights are read (``weights_only=True``); the architecture comes from the registry. A run
    without the weights artifact is refused: its MLflow model is a pickle and is never loaded.
    """
    path = Path(spec)
    if path.suffix == ".pt" or path.is_file():
        if not path.is_file():
            raise UnetlabError(f"checkpoint '{spec}' not found")
        return _rebuild(_read_checkpoint(path), f"checkpoint '{spec}'")
    run_id = weights_run_id(spec)
    source = f"run {run_id}" + ("" if run_id == spec else f" (from {spec})")
    client = _client()
    try:
        names = {f.path for f in client.list_artifacts(run_id, WEIGHTS_DIR)}
    except Exception as exc:  # noqa: BLE001 -- any library error becomes one line
        raise UnetlabError(f"{source}: cannot list its artifacts: {exception_text(exc)}") from None
    if WEIGHTS_ARTIFACT not in names:
        raise UnetlabError(f"{source} has no {WEIGHTS_ARTIFACT} artifact ({_why_no_weights(client, run_id)}); "
                           "its MLflow model is a pickle and is not loaded: use the run's best.pt checkpoint or "
                           "train it again")
    with tempfile.TemporaryDirectory(prefix="unetlab-weights-") as tmp, _no_progress_bar():
        try:
            local = client.download_artifacts(run_id, WEIGHTS_ARTIFACT, tmp)
        except Exception as exc:  # noqa: BLE001 -- any library error becomes one line
            raise UnetlabError(f"{source}: cannot download {WEIGHTS_ARTIFACT}: {exception_text(exc)}") from None
        state = _read_weights(Path(local), f"{source}: {WEIGHTS_ARTIFACT}")
    return _rebuild(state, f"{source}: {WEIGHTS_ARTIFACT}")


def _why_no_weights(client, run_id: str) -> str:
    """Why a run has no weights artifact: it logged one that is gone (deleted from the artifact store), it
    was trained with ``tracking.log_model`` off, or it predates the artifact (an older unetlab)."""
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 -- the listing worked, so this is unlikely; say what is known
        return "logged by an older unetlab, with tracking.log_model off, or deleted from the artifact store"
    if run.data.tags.get(WEIGHTS_TAG):
        return "it was logged, and has since been deleted from the run's artifact store"
    if run.data.params.get("tracking.log_model") == "False":
        return "the run was trained with tracking.log_model off"
    return (f"the run never logged one: trained by unetlab {run.data.tags.get('unetlab.version', '(unknown)')}, "
            "an older version or one whose run ended before its model was logged")


def weights_run_id(spec: str) -> str:
    """The run whose weights artifact ``spec`` names: a run id, ``runs:/ID/...`` or a ``models:/`` URI."""
    if spec.startswith("runs:/"):
        run_id = spec[len("runs:/"):].strip("/").split("/")[0]
        if not run_id:
            raise UnetlabError(f"'{spec}': a runs:/ URI needs a run id (runs:/RUN_ID/model)")
        return run_id
    if spec.startswith("models:/"):
        return _model_uri_run(spec)
    client = _client()
    try:
        client.get_run(spec)
    except Exception:  # noqa: BLE001 -- not found, malformed id, unreachable store: one line
        import mlflow

        raise UnetlabError(f"'{spec}' is neither a checkpoint file, an MLflow run id of this store "
                           f"({mlflow.get_tracking_uri()}) nor a runs:/ or models:/ URI") from None
    return spec


class _no_progress_bar:
    """MLflow draws a download progress bar on stderr; an error must stay one line."""

    def __enter__(self):
        import os

        self._old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        return self

    def __exit__(self, *exc):
        import os

        if self._old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = self._old
        return False


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _model_uri_run(uri: str) -> str:
    """The source run of ``models:/m-ID`` (a logged model), ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""
    client = _client()
    body = uri[len("models:/"):].strip("/")
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in body:
            name, ref = body.split("/", 1)
            if ref == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise UnetlabError(f"'{uri}': registered model '{name}' has no versions")
                version = max(versions, key=lambda v: int(v.version))
            else:
                version = client.get_model_version(name, ref)
        else:
            logged = client.get_logged_model(body)
            if not logged.source_run_id:
                raise UnetlabError(f"'{uri}': the logged model has no source run to read weights from")
            return logged.source_run_id
    except UnetlabError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any library error becomes one line
        raise UnetlabError(f"cannot resolve '{uri}': {exception_text(exc)}") from None
    if version.run_id:
        return version.run_id
    model_id = getattr(version, "model_id", None)
    if model_id and re.fullmatch(r"m-[0-9a-f]+", model_id):
        return _model_uri_run(f"models:/{model_id}")
    raise UnetlabError(f"'{uri}': the model version has no source run to read weights from")


def _read_checkpoint(path: Path) -> dict:
    from unetlab.checkpoint import load_checkpoint

    try:
        return load_checkpoint(path)
    except UnetlabError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any library error becomes one line
        raise UnetlabError(f"checkpoint '{path}' is not a readable weights-only file: {exception_text(exc)}") from None


def _read_weights(path: Path, label: str) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnetlabError(f"{label} is not a weights-only file: it holds pickled objects other than tensors and "
                           "plain containers, which could run code (refused)") from None
    except Exception as exc:  # noqa: BLE001 -- any library error becomes one line
        raise UnetlabError(f"{label} is not a weights-only file (empty, truncated or corrupt): "
                           f"{exception_text(exc)}") from None


def _rebuild(state: Any, label: str) -> TrainedModel:
    from unetlab.model.unet import build_unet
    from unetlab.plugin_api.host import default_host

    if not isinstance(state, dict) or "model" not in state:
        raise UnetlabError(f"{label} holds no model weights")
    missing = [k for k in IDENTITY_KEYS if k not in state]
    if missing:
        raise UnetlabError(f"{label} has no model description ({', '.join(missing)} missing; written by an older "
                           "unetlab?)")
    if not isinstance(state["model_config"], dict):
        raise UnetlabError(f"{label}: model_config is not a mapping")
    try:
        # the weights come from here: a pretrained encoder must not read its file or the hub again
        model = build_unet(state["model_config"], int(state["in_channels"]), int(state["out_channels"]),
                           default_host().registry, pretrained="skip")
        model.load_state_dict(state["model"])
    except UnetlabError as exc:
        raise UnetlabError(f"{label}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 -- any library error becomes one line
        raise UnetlabError(f"{label}: the weights do not fit the described model: {exception_text(exc)}") from None
    return TrainedModel(model.eval(), int(state["in_channels"]), int(state["out_channels"]),
                        state.get("normalization"), label, _stored_resize(state.get("resize"), label))


def _stored_resize(value: Any, label: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise UnetlabError(f"{label}: resize is {value!r}, expected [H, W] (two positive integers)")
    return int(value[0]), int(value[1])
