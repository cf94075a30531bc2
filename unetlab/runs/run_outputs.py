"""What a finished run leaves in MLflow besides its per-epoch metrics: final metrics, figures, the model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from unetlab.config.settings import TrackingSettings
from unetlab.plugin_api.contracts import validates_whole_images
from unetlab.tracking import tags as run_tags
from unetlab.training.preflight import Prepared
from unetlab.training.trainer import RunResult

if TYPE_CHECKING:
    import torch

    from unetlab.plugin_api.registry import Registry
    from unetlab.tracking.run_tracker import RunTracker

__all__ = ["log_run_outputs", "run_summary"]


def log_run_outputs(tracker: RunTracker, result: RunResult, prep: Prepared, registry: Registry | None = None) -> None:
    """Final metrics (training time, steps, epochs, peak memory, best monitored value and epoch), the best
    model's per-image validation metrics (``per_image_metrics.json``, what ``compare`` pairs on), its test-split
    metrics when the data has a test split and the run is no trial (``unetlab.runs.test_evaluation``), then
    figures and the model as configured."""
    from unetlab.runs.test_evaluation import record_test_metrics
    from unetlab.tracking.per_image import record_per_image_metrics

    config = prep.run.config
    # what the comparison contract reads (unetlab.analysis.contract_records)
    final_metrics: dict[str, float] = {"train_time_s": result.seconds, "train_steps": result.steps,
                                       "train_epochs": result.epochs}
    if result.peak_memory_mb is not None:
        final_metrics["peak_memory_mb"] = result.peak_memory_mb
        tracker.set_tags({run_tags.PEAK_MEMORY_KIND: result.memory_kind})
    if result.best is not None:
        final_metrics[f"best_{config['train']['monitor']}"] = result.best
        final_metrics["best_epoch"] = cast(int, result.best_epoch)  # set with best (trainer)
    tracker.log_metrics(final_metrics, step=result.epochs)
    if registry is None:
        from unetlab.plugin_api.host import default_host

        registry = default_host().registry
    record_per_image_metrics(tracker, result.model, prep.source, config["train"], prep.num_classes, registry,
                             prep.runtime.amp_dtype)
    if prep.run.role != "trial":  # trials are judged on validation only: the test split is for final runs
        record_test_metrics(tracker, result.model, prep, registry, step=result.epochs)
    tracking = TrackingSettings.from_config(config)
    if tracking.figures:
        log_figures(tracker, result, prep)
    if tracking.log_model:
        log_model(tracker, result.model, prep)


def log_model(tracker: RunTracker, model: torch.nn.Module, prep: Prepared) -> None:
    """The (best) model as ``unetlab_model/weights.pt`` (weights + identity: what predict and export read,
    never a pickle) and as an MLflow model for MLflow-native users, its URI as the ``unetlab.model_uri`` tag."""
    import torch

    from unetlab import __version__
    from unetlab.training.model_store import log_model_weights, model_identity

    log_model_weights(tracker, model, model_identity(prep))  # the same identity as the checkpoints
    uri = tracker.log_model(model.cpu(), [f"torch=={torch.__version__.split('+')[0]}", f"unetlab=={__version__}"])
    tracker.set_tags({run_tags.MODEL_URI: uri})


def log_figures(tracker: RunTracker, result: RunResult, prep: Prepared) -> None:
    """Learning curves and image | truth | prediction for the first (fixed) validation images, predicted
    as validation predicts them (whole images by sliding windows for a patch-trained run)."""
    import matplotlib.pyplot as plt
    import torch

    from unetlab.analysis.figures import learning_curves, prediction_figure
    from unetlab.model.unet import crop_target, logits_to_classes
    from unetlab.training.trainer import predict_logits
    from unetlab.training.whole_image_validation import validation_images, whole_image_logits

    figure = learning_curves(result.history, prep.run.settings.train.monitor)
    tracker.log_figure(figure, "learning_curves.png")
    plt.close(figure)
    val = validation_images(prep.source)
    items = [val[i] for i in range(min(4, len(val)))]
    if not items:
        return
    if validates_whole_images(prep.source):  # sizes differ: one image at a time
        device = next(result.model.parameters()).device
        result.model.eval()
        logits = [whole_image_logits(result.model, image, device, prep.runtime.amp_dtype).cpu() for image, _ in items]
    else:
        logits = list(predict_logits(result.model, torch.stack([image for image, _ in items])).split(1))
    truths = [crop_target(torch.as_tensor(mask).long()[None], one)[0].numpy() for (_, mask), one in zip(items, logits)]
    figure = prediction_figure([image.numpy() for image, _ in items], truths,
                               [logits_to_classes(one)[0].numpy() for one in logits], prep.num_classes)
    tracker.log_figure(figure, "predictions.png")
    plt.close(figure)


def run_summary(result: RunResult, monitor: str) -> dict[str, Any]:
    """The numbers the console report shows for a finished run."""
    return {"best": result.best, "best_epoch": result.best_epoch, "final_monitor": result.final.get(monitor),
            "epochs": result.epochs, "seconds": result.seconds}
