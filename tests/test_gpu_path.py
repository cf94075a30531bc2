"""The GPU path, proven where a CPU can prove it: bilinear upsampling as matrix products equals PyTorch's
kernel (values and gradients), every first-party component runs under strict determinism, the one-line
notice for ops without a deterministic kernel, the device-resident batches equal the DataLoader's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from unetlab_std.layers import bilinear_matmul, bilinear_upsample, interpolation_matrix

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 2, 8, 6), (1, 4, 9, 4)]


def _both(x: torch.Tensor, scale: int, align_corners: bool):
    """Outputs and input gradients of the matrix products and of F.interpolate for one upstream gradient."""
    grad_out = None
    results = []
    for fn in (lambda t: bilinear_matmul(t, scale, align_corners),
               lambda t: F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=align_corners)):
        leaf = x.detach().clone().requires_grad_(True)
        y = fn(leaf)
        if grad_out is None:
            grad_out = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
        y.backward(grad_out)
        results.append((y.detach(), leaf.grad))
    return results


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [2, 3])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_bilinear_matmul_equals_interpolate(align_corners, shape, scale, dtype, tol):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    (y, gx), (y_ref, gx_ref) = _both(x, scale, align_corners)
    assert y.shape == y_ref.shape
    # the two sum the same products in a different order: agreement is relative to the inputs' magnitude
    # (randn reaches |x| ~ 3-4, so the float32 bound is a few ulps there)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=tol * x.abs().max().item())
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=tol * scale * scale * x.abs().max().item())


@pytest.mark.parametrize("align_corners", [True, False])
def test_bilinear_matmul_on_channels_last_stays_channels_last(align_corners):
    x = torch.randn(2, 5, 7, 6).contiguous(memory_format=torch.channels_last)
    (y, gx), (y_ref, gx_ref) = _both(x, 2, align_corners)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=4e-6)


def test_interpolation_matrix_by_hand_and_cached():
    # 2 -> 4 pixels. align_corners: sources 0, 1/3, 2/3, 1; half-pixel: 0 (clamped), 0.25, 0.75, 1 (clamped)
    expected = {True: [[1, 0], [2 / 3, 1 / 3], [1 / 3, 2 / 3], [0, 1]],
                False: [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]}
    for align_corners, rows in expected.items():
        m = interpolation_matrix(2, 4, align_corners, torch.float64, torch.device("cpu"))
        torch.testing.assert_close(m, torch.tensor(rows, dtype=torch.float64), rtol=0, atol=1e-15)
    a = interpolation_matrix(5, 10, False, torch.float32, torch.device("cpu"))
    assert interpolation_matrix(5, 10, False, torch.float32, torch.device("cpu")) is a


def test_auto_method_keeps_pytorch_kernel_on_cpu_and_meta():
    x = torch.randn(1, 2, 4, 4)
    assert torch.equal(bilinear_upsample(x, 2, True), F.interpolate(x, scale_factor=2, mode="bilinear",
                                                                    align_corners=True))
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        bilinear_upsample(torch.empty(1, 2, 4, 4, device="meta"), 2, True)
    assert counter.get_total_flops() == 0  # model FLOP counts are unchanged by the implementation


def test_bilinear_upsampler_module_uses_it():
    import unetlab

    up = unetlab.default_host().registry.create("upsampler", "bilinear", in_channels=4, out_channels=2, scale=2)
    up.body[0].method = "matmul"
    x = torch.randn(2, 4, 5, 6)
    expected = torch.relu(up.body[1](F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)))
    torch.testing.assert_close(up(x), expected, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_bilinear_on_cuda_is_deterministic_and_equal(channels_last, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    x = torch.randn(4, 8, 17, 16, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # warn_only=False: a nondeterministic kernel raises
    try:
        grads = []
        for _ in range(2):
            leaf = x.detach().clone().requires_grad_(True)
            y = bilinear_upsample(leaf, 2, True)
            y.backward(torch.ones_like(y))
            grads.append(leaf.grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0], grads[1])
    torch.testing.assert_close(y, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
                               rtol=0, atol=1e-5)


# --- deterministic mode ------------------------------------------------------------------------------

@pytest.fixture
def restore_determinism():
    """Tests here switch global PyTorch flags: put them back."""
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2], state[3]


def test_configure_sets_flags_and_cublas_workspace_only_if_unset(monkeypatch, restore_determinism):
    from unetlab.training.determinism import configure

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure(True, torch.device("cpu"))
    assert "CUBLAS_WORKSPACE_CONFIG" not in __import__("os").environ  # only CUDA needs it
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    configure(True, torch.device("cuda"))  # flags only: no CUDA call is made
    assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    configure(True, torch.device("cuda"))
    assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's choice stays
    configure(False, torch.device("cuda"))
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def test_op_without_deterministic_kernel_is_named_once(restore_determinism, monkeypatch):
    import warnings

    from unetlab.training.determinism import configure, report_nondeterministic_ops

    class PluginLayer(torch.nn.Module):
        """A third-party layer using an op that has no deterministic kernel even on the CPU (put_)."""

        def forward(self, x):
            marks = torch.zeros(4)
            marks.put_(torch.tensor([1]), torch.tensor([1.0]))  # accumulate=False: alerts on every device
            return x * marks.sum()

    configure(True, torch.device("cpu"))
    lines: list[str] = []
    layer = PluginLayer()
    shown: list[str] = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    with report_nondeterministic_ops(lines.append) as seen:
        for _ in range(3):  # three steps: still one line
            layer(torch.ones(2, requires_grad=True)).sum().backward()
        warnings.warn("unrelated", UserWarning, stacklevel=1)  # other warnings are passed on
    assert shown == ["unrelated"]
    assert seen == {"put_"}
    assert len(lines) == 1 and "'put_'" in lines[0] and "\n" not in lines[0]


def _tiny_model(**parts):
    from unetlab.model.unet import build_unet
    from unetlab.plugin_api.host import default_host

    registry = default_host().registry

    def spec(kind, name):
        return {"name": name, **registry.get(kind, name).defaults()}
    names = {"encoder": "classic", "upsampler": "bilinear", "fusion": "concat", "block": "double_conv",
             "initializer": "default", **parts}
    config = {k: spec(k, names[k]) for k in ("encoder", "upsampler", "fusion", "block")}
    config["encoder"].update(depth=2, base_channels=4)
    config.update(init=spec("initializer", names["initializer"]), decoder_channels=None)
    return build_unet(config, 1, 2, registry)


COMPONENTS = [("encoder", "residual"), ("upsampler", "bilinear"), ("upsampler", "nearest"),
              ("upsampler", "pixel_shuffle"), ("upsampler", "transpose"), ("fusion", "add"),
              ("fusion", "attention"), ("fusion", "none"), ("block", "residual")]


@pytest.mark.parametrize("kind, name", COMPONENTS)
def test_first_party_models_run_under_strict_determinism(kind, name, restore_determinism):
    torch.use_deterministic_algorithms(True)  # warn_only=False: an op without a deterministic kernel raises
    torch.manual_seed(0)
    model = _tiny_model(**{kind: name}).train()
    model(torch.randn(2, 1, 16, 16)).square().mean().backward()


def test_first_party_losses_metrics_augmentations_under_strict_determinism(restore_determinism):
    import unetlab

    registry = unetlab.default_host().registry
    torch.use_deterministic_algorithms(True)
    for num_classes, channels in ((2, 1), (3, 3)):
        logits = torch.randn(2, channels, 12, 12, requires_grad=True)
        target = torch.randint(0, num_classes, (2, 12, 12))
        for name in unetlab.list_components("loss"):
            registry.create("loss", name, num_classes=num_classes)(logits, target).backward()
        for name in unetlab.list_components("metric"):
            metric = registry.create("metric", name, num_classes=num_classes)
            metric.update(logits.detach(), target)
            metric.compute()
    generator = torch.Generator().manual_seed(0)
    images, masks = torch.randn(2, 1, 32, 32), torch.randint(0, 2, (2, 32, 32))
    for name in unetlab.list_components("augmentation"):
        params = {"size": 8} if name == "crop" else {}
        registry.create("augmentation", name, **params)(images, masks, generator)


# --- data on the device ------------------------------------------------------------------------------

@pytest.mark.parametrize("shuffle, world_size", [(True, 1), (True, 2), (False, 1)])
def test_device_batches_equal_the_dataloader_batches(shuffle, world_size):
    from unetlab.data.sources import DeviceBatches, make_batches, make_loader

    images = torch.randn(23, 2, 4, 4)
    masks = torch.randint(0, 3, (23, 4, 4))
    dataset = torch.utils.data.TensorDataset(images, masks)
    for rank in range(world_size):
        loader = make_loader(dataset, 5, shuffle, 0, False, rank, world_size)
        resident = make_batches(dataset, 5, shuffle, 0, False, torch.device("cpu"), rank, world_size)
        assert isinstance(resident, DeviceBatches) and len(resident) == len(loader)
        for seed in (0, 1, 12345) if shuffle else (None,):
            if shuffle:
                loader.epoch_sampler.set_epoch(seed)
                resident.epoch_sampler.set_epoch(seed)
            expected, got = list(loader), list(resident)
            assert len(got) == len(expected) == len(loader)
            for (xi, yi), (xr, yr) in zip(expected, got):
                assert torch.equal(xi, xr) and torch.equal(yi, yr)


def test_split_too_large_for_the_device_keeps_the_loader(monkeypatch):
    from unetlab.data import sources as data

    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 1, 2, 2))
    assert isinstance(data.make_batches(dataset, 2, True, 0, False, torch.device("cpu")), data.DeviceBatches)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))
    assert data.fits_on_device(dataset, torch.device("cuda"), share=0.25)  # 64 bytes < 1/4 of 1000 free
    dataset = torch.utils.data.TensorDataset(torch.zeros(100, 1, 2, 2))  # 1600 bytes > 250
    assert not data.fits_on_device(dataset, torch.device("cuda"))
    assert not data.fits_on_device([torch.zeros(1)], torch.device("cpu"))  # not in-memory tensors


# --- the GPU benchmark keeps working on the CPU (CI) -----------------------------------------------------

def test_gpu_benchmark_runs_on_cpu(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                           "--upsamplers", "bilinear", "--settings", "bf16+channels_last", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["setting"], r["deterministic"]) for r in rows] == [("bf16+channels_last", True),
                                                                   ("bf16+channels_last", False)]
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    assert "deterministic on / off" in proc.stdout


# --- MLflow system metrics ---------------------------------------------------------------------------------

def test_system_metrics_setting():
    from unetlab.training.system_metrics import system_metrics_enabled

    pytest.importorskip("psutil")
    assert system_metrics_enabled("auto", "cuda") and not system_metrics_enabled("auto", "cpu")
    assert system_metrics_enabled(True, "cpu") and not system_metrics_enabled(False, "cuda")


def test_system_metrics_without_psutil_is_a_config_error(monkeypatch):
    import importlib.util

    import unetlab
    from unetlab.training.system_metrics import system_metrics_enabled

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psutil" else real(name, *a))
    with pytest.raises(unetlab.UnetlabError, match=r"tracking.system_metrics: true needs psutil"):
        system_metrics_enabled(True, "cpu")
    assert not system_metrics_enabled("auto", "cuda")  # auto quietly does without


def test_system_metrics_are_logged_to_the_run(tmp_path, monkeypatch):
    pytest.importorskip("psutil")
    import mlflow

    from unetlab.training.system_metrics import start_system_metrics

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store: no sqlite schema to create (seconds)
    uri = (tmp_path / "mlruns").as_uri()
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("sys", artifact_location=str(tmp_path / "art")))
    monitor = start_system_metrics(run.info.run_id, tracking_uri=uri, sampling_interval=0.2)
    import time

    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"):
                break
        except ValueError:  # the file store read a line the monitor was writing
            pass
        time.sleep(0.2)
    monitor.finish()
    metrics = client.get_run(run.info.run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_resident_and_prefetched_equal_the_cpu_batches():
    from unetlab.data.sources import CudaPrefetcher, DeviceBatches, make_batches, make_loader

    dataset = torch.utils.data.TensorDataset(torch.randn(37, 3, 8, 8), torch.randint(0, 2, (37, 8, 8)))
    cuda = torch.device("cuda")
    expected_loader = make_loader(dataset, 8, True, 0, False)
    resident = make_batches(dataset, 8, True, 0, True, cuda)
    prefetched = CudaPrefetcher(make_loader(dataset, 8, True, 0, True), cuda)
    assert isinstance(resident, DeviceBatches)
    for seed in (0, 7):
        for batches in (expected_loader, resident, prefetched):
            batches.epoch_sampler.set_epoch(seed)
        expected = list(expected_loader)
        for batches in (resident, prefetched):
            got = list(batches)
            assert len(got) == len(expected)
            for (xe, ye), (xg, yg) in zip(expected, got):
                assert xg.is_cuda and torch.equal(xg.cpu(), xe) and torch.equal(yg.cpu(), ye)


def test_a_run_gives_the_same_numbers_with_data_on_the_device_or_from_a_dataloader(tmp_path, monkeypatch):
    import textwrap

    import unetlab
    from unetlab.data import sources as data
    from unetlab.training.preflight import prepare
    from unetlab.training.trainer import TrainSetup, train_run

    registry = unetlab.default_host().registry
    path = tmp_path / "e.yaml"
    path.write_text(textwrap.dedent("""
        data: {dataset: {name: blobs, image_size: 32, n_train: 12, n_val: 6}, batch_size: 4, augment: [hflip]}
        model: {encoder: {name: classic, depth: 2, base_channels: 4}}
        train: {epochs: 2, lr: 0.01, device: cpu}
    """))
    run = unetlab.load_experiment(path).runs[0]
    built = []
    real_make_batches = data.make_batches

    def spy(*args, **kwargs):
        built.append(real_make_batches(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr("unetlab.training.trainer.make_batches", spy)
    histories = {}
    for resident in (True, False):
        monkeypatch.setattr(data, "fits_on_device", lambda *a, r=resident, **k: r)
        result = train_run(TrainSetup(prepared=prepare(run, registry), registry=registry,
                                      checkpoint_dir=tmp_path / str(resident)))
        histories[resident] = [{k: v for k, v in h.items() if k not in ("images_per_s", "epoch_time_s")}
                               for h in result.history]
    assert [type(b).__name__ for b in built] == ["DeviceBatches", "DeviceBatches", "DataLoader", "DataLoader"]
    assert histories[True] == histories[False]  # exactly: same batches, same order, same numbers


def test_a_run_logs_system_metrics_when_asked(tmp_path):
    pytest.importorskip("psutil")
    import os
    import subprocess
    import sys

    import mlflow

    # MLflow's monitor logs only samples taken before the run ends: keep this tiny run alive long enough
    (tmp_path / "slow.py").write_text("import time, unetlab\n\n@unetlab.hookimpl\n"
                                      "def on_epoch_end(epoch):\n    time.sleep(1.0)\n")
    (tmp_path / "e.yaml").write_text(
        "plugins: [slow.py]\n"
        "data: {dataset: {name: blobs, image_size: 32, n_train: 8, n_val: 4}, batch_size: 4}\n"
        "model: {encoder: {name: classic, depth: 2, base_channels: 4}}\n"
        "train: {epochs: 2, device: cpu}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path / 'm.db'}', system_metrics: true, log_model: false, figures: false}}\n")
    env = {**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1"}
    proc = subprocess.run([sys.executable, "-m", "unetlab", "run", "e.yaml", "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert "system/cpu_utilization_percentage" in child.data.metrics, sorted(child.data.metrics)
