"""GPU speed of unetlab's U-Net, one command: images/s, TFLOP/s and the share of the bf16 matmul rate
measured in the same run, for fp32 / TF32 / bf16 / bf16 + channels_last / + torch.compile, deterministic
on and off, bilinear and transpose upsamplers, at 128 and 256 px (issue 10's table).

Each row trains the assembled 64-to-1024 U-Net (classic encoder, depth 5, concat, BCE, Adam) on a fixed
random batch: ``--warmup`` untimed steps (the first compiles with ``+compile``), then ``--steps`` timed
steps between two device synchronisations. Training FLOPs = 3 x the forward FLOPs counted by
``unetlab.model.unet.forward_flops``. ``+host_batch`` copies each step's input batch from pinned host memory
(a DataLoader-fed run) instead of using one already on the device. ``bilinear (PyTorch kernel)`` is the
bilinear upsampler forced onto F.interpolate (what unetlab used before its matrix-product path): the price
of PyTorch's deterministic fallback. Deterministic rows use
``unetlab.training.determinism.configure`` exactly as a run does.

    python benchmarks/gpu.py                            # everything on cuda (rows print as they finish)
    python benchmarks/gpu.py --sizes 128 --no-compile   # a part of it
    python benchmarks/gpu.py --device cpu --quick       # the same code on the CPU, small sizes, seconds
    python benchmarks/gpu.py --profile                  # PyTorch profiler summary of a headline run
    python benchmarks/gpu.py --profile --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS call: deterministic rows need it

import torch

REPO = Path(__file__).resolve().parents[1]

# name -> (autocast dtype, TF32, channels_last, torch.compile, batch copied from host memory each step)
SETTINGS = {
    "fp32": (None, False, False, False, False),
    "tf32": (None, True, False, False, False),
    "bf16": (torch.bfloat16, False, False, False, False),
    "bf16+channels_last": (torch.bfloat16, False, True, False, False),
    "bf16+channels_last+compile": (torch.bfloat16, False, True, True, False),
    "bf16+channels_last+host_batch": (torch.bfloat16, False, True, False, True),
}
UPSAMPLERS = ["bilinear", "transpose", "bilinear (PyTorch kernel)"]
# the headline batches per image size; --quick shrinks everything
BATCH = {128: 32, 256: 16}


def sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA timings are meaningless without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` (best of ``repeats``)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def build(upsampler: str, base: int, depth: int) -> torch.nn.Module:
    """The assembled U-Net with ``upsampler`` (``bilinear (PyTorch kernel)``: bilinear on F.interpolate)."""
    from unetlab_std.layers import BilinearUpsample

    import unetlab

    name = "bilinear" if upsampler.startswith("bilinear") else upsampler
    config = {"encoder": {"name": "classic", "depth": depth, "base_channels": base},
              "upsampler": {"name": name}, "fusion": {"name": "concat"}, "block": {"name": "double_conv"},
              "init": {"name": "default"}, "decoder_channels": None}
    model = unetlab.build_model(config, 3, 1)
    if upsampler == "bilinear (PyTorch kernel)":
        for module in model.modules():
            if isinstance(module, BilinearUpsample):
                module.method = "interpolate"
    return model


def measure(device, size, batch, upsampler, setting, deterministic, args) -> dict:
    """Images/s and training FLOP/s of one configuration."""
    from unetlab.model.unet import forward_flops
    from unetlab.training.determinism import configure, report_nondeterministic_ops

    amp, tf32, channels_last, compiled, host_batch = SETTINGS[setting]
    configure(deterministic, device)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    model = build(upsampler, args.base, args.depth)
    flops = forward_flops(model, 3, size, size)
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    # host_batch: every step copies its batch from (pinned) host memory, as a DataLoader-fed run does
    x_host = x.cpu().pin_memory() if host_batch and device.type == "cuda" else x.cpu() if host_batch else None
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        inputs = x if x_host is None else x_host.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = forward(inputs)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with report_nondeterministic_ops(lambda line: print(f"  [{upsampler}, {setting}] {line}", flush=True)):
        sync(device)
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        warmup = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            times.append((time.perf_counter() - start) / args.steps)
    per_step = statistics.median(times)
    return {"size": size, "batch": batch, "upsampler": upsampler, "setting": setting,
            "deterministic": deterministic, "images_per_s": batch / per_step,
            "tflops": 3 * flops * batch / per_step / 1e12, "warmup_s": warmup}


def wanted(upsampler: str, setting: str) -> bool:
    """The forced PyTorch kernel and the host copy are measured at the default GPU setting only."""
    if setting.endswith("host_batch"):
        return upsampler == "bilinear"
    if upsampler == "bilinear (PyTorch kernel)":
        return setting == "bf16+channels_last"
    return True


def table(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: --device cuda asked for, but CUDA is not available (use --device cpu)")
    settings = [s for s in args.settings if not (SETTINGS[s][3] and args.no_compile)]
    if device.type != "cuda":
        settings = [s for s in settings if s != "tf32"]  # TF32 is a CUDA matmul mode
    peak = matmul_rate(device, torch.bfloat16, 8192 if device.type == "cuda" else 512)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {where}; U-Net base {args.base}, depth "
          f"{args.depth}; bf16 matmul rate in this run: {peak / 1e12:.3f} TFLOP/s", flush=True)
    print(f"{'px':>4} {'batch':>5}  {'upsampler':<26} {'setting':<30} {'determ.':<7} {'images/s':>9} "
          f"{'TFLOP/s':>8} {'of bf16':>7} {'warm-up':>8}", flush=True)
    rows = []
    for size in args.sizes:
        batch = args.batch or BATCH.get(size, 16)
        for upsampler in args.upsamplers:
            for setting in settings:
                if not wanted(upsampler, setting):
                    continue
                for deterministic in args.deterministic:
                    row = measure(device, size, batch, upsampler, setting, deterministic, args)
                    rows.append(row)
                    print(f"{size:>4} {batch:>5}  {upsampler:<26} {setting:<30} {'on' if deterministic else 'off':<7} "
                          f"{row['images_per_s']:>9.1f} {row['tflops']:>8.2f} {row['tflops'] * 1e12 / peak:>7.1%} "
                          f"{row['warmup_s']:>7.1f}s", flush=True)
    print("\ndeterministic on / off (images/s; goal: on costs at most 15%):")
    for row in rows:
        if row["deterministic"]:
            off = [r for r in rows if not r["deterministic"] and all(r[k] == row[k] for k in ("size", "upsampler",
                                                                                               "setting"))]
            if off:
                print(f"  {row['size']} px, {row['upsampler']}, {row['setting']}: "
                      f"{row['images_per_s'] / off[0]['images_per_s']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "torch": torch.__version__, "cuda": torch.version.cuda,
                                               "bf16_matmul_flops": peak, "rows": rows}, indent=1))


def profile(args) -> None:
    """Profile one headline run end to end (``unetlab run``, in this process) and print where time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from unetlab.cli.main import main as cli

    device = torch.device(args.device)
    overrides = ["model.encoder.base_channels=64", "model.encoder.depth=5", "data.dataset.image_size=128",
                 "data.dataset.n_train=2000", "data.batch_size=32", "train.epochs=1"]  # the scale-up
    if args.quick:
        overrides = ["data.dataset.n_train=32", "data.dataset.n_val=8", "train.epochs=1"]
    overrides += [f"train.device={args.device}", *args.overrides]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # the run's MLflow store and checkpoints go to a scratch folder
        try:
            argv = ["run", str(REPO / "experiments" / "concat_vs_add.yaml"), "--only", "concat/seed=1", "--quiet"]
            for item in overrides:
                argv += ["--set", item]
            start = time.perf_counter()
            with torch_profile(activities=activities) as prof:
                code = cli(argv)
            wall = time.perf_counter() - start
        finally:
            os.chdir(cwd)
    if code:
        sys.exit(f"benchmarks/gpu.py: the profiled run failed (exit {code})")
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows))
    counts = {e.key: e.count for e in events}
    print(f"run wall time under the profiler: {wall:.1f} s; overrides: {' '.join(overrides)}")
    print("calls that make the host wait for the device (item/_local_scalar_dense, synchronize) and copies:")
    for key in ("aten::_local_scalar_dense", "aten::item", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                "aten::to", "aten::copy_", "aten::index_select", "cudaMemcpyAsync"):
        if key in counts:
            print(f"  {key}: {counts[key]} calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small model and sizes, no compile (CI smoke run)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=None, help="default: 32 at 128 px, 16 at 256 px")
    parser.add_argument("--upsamplers", nargs="+", default=UPSAMPLERS, choices=UPSAMPLERS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--deterministic", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (~1 min warm-up each)")
    parser.add_argument("--base", type=int, default=64)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks of --steps; the median is reported")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--profile", action="store_true", help="profile a headline `unetlab run` instead")
    parser.add_argument("--rows", type=int, default=25, help="--profile: rows of the summary table")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="--profile: extra overrides")
    args = parser.parse_args()
    args.deterministic = [d == "on" for d in args.deterministic]
    if args.quick:
        args.base, args.depth, args.warmup, args.steps, args.repeats = 4, 3, 1, 1, 1
        args.sizes = [s for s in args.sizes if s <= 64] or [32]
        args.batch = args.batch or 2
        args.no_compile = True
    if args.profile:
        profile(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
