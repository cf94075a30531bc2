"""``unetlab export``: a trained model as a ``torch.export`` program (.pt2) or ONNX, checked against PyTorch.

Dynamic shapes: the batch always; height and width as multiples of the encoder's total downsampling
when the model uses ``same`` padding (any such size then works). ``valid`` padding models keep the
spatial size they were exported with (the paper's tile size), batch still dynamic.
The model is rebuilt from weights by ``unetlab.training.model_store`` (a store's pickled MLflow model is never loaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from unetlab.errors import UnetlabError, exception_text

__all__ = ["check_export", "export_model"]


def _example(model: torch.nn.Module, size: int | None) -> tuple[torch.Tensor, int]:
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    strides = list(getattr(getattr(model, "encoder", None), "strides", [1]))
    multiple = int(strides[-1])
    if size is None:
        size = 572 if getattr(model, "padding", "same") == "valid" else 4 * multiple
    return torch.randn(2, conv.in_channels, size, size), multiple


def export_model(model: torch.nn.Module, fmt: str, out: str | Path, size: int | None = None) -> dict:
    """Export ``model`` to ``out`` as ``pt2`` or ``onnx``; return what was exported (shapes, dynamic dims)."""
    from torch.export import Dim

    model = model.cpu().eval()
    example, multiple = _example(model, size)
    valid = getattr(model, "padding", "same") == "valid"
    batch = Dim("batch", min=1, max=4096)
    dims = {0: batch}
    if not valid:
        dims.update({2: multiple * Dim("h_blocks", min=1, max=4096), 3: multiple * Dim("w_blocks", min=1, max=4096)})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes={"x": dims})
    except Exception as exc:  # noqa: BLE001 -- any library error becomes one line
        raise UnetlabError(f"torch.export could not trace this model: {exception_text(exc)}") from None
    if fmt == "pt2":
        torch.export.save(program, out)
    elif fmt == "onnx":
        try:
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, dynamic_shapes={"x": dims})
            assert onnx_program is not None  # dynamo=True always returns an ONNXProgram (None only without dynamo)
            onnx_program.save(str(out))
        except ImportError as exc:
            raise UnetlabError(f"ONNX export needs the optional extra: pip install 'unetlab[onnx]' ({exc})") from None
    else:
        raise UnetlabError(f"--format {fmt}: choose pt2 or onnx")
    return {"format": fmt, "file": str(out), "example_shape": list(example.shape),
            "dynamic": "batch" + ("" if valid else f", height and width (multiples of {multiple})"),
            "spatial_multiple": None if valid else multiple}


def check_export(model: torch.nn.Module, fmt: str, path: str | Path, shapes: Sequence[tuple[int, ...]]) -> float:
    """Largest absolute difference between the exported model and PyTorch over inputs of ``shapes``."""
    model = model.cpu().eval()
    worst = 0.0
    if fmt == "pt2":
        program = torch.export.load(str(path)).module()
        def run(x):
            return program(x)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        def run(x):
            return torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(*shape)
            worst = max(worst, (run(x) - model(x)).abs().max().item())
    return worst
