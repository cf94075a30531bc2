"""Does assembly from plugin parts cost anything? (issue: assembly must cost nothing)

Trains (forward, BCE loss, backward, Adam step) the assembled classic + transpose + concat U-Net and
an independent hand-written U-Net of the same configuration, interleaved in one process on the same
batch, and prints the step-time ratio (goal: within 3%) and each model's share of the machine's
attainable FLOP/s (a large matmul in the step's precision, measured in the same run). Training FLOPs =
3 x forward FLOPs. On CUDA both models run as the trainer runs them by default: bf16 autocast and
channels_last (``--amp off`` / ``--channels-last off`` to change).

    python benchmarks/model_speed.py                      # 64-1024 U-Net, batch 4 x 3x128x128, CPU
    python benchmarks/model_speed.py --base 16 --size 64  # quicker
    python benchmarks/model_speed.py --upsampler bilinear # the seed's upsampler (interpolation + 1x1 conv)
    python benchmarks/model_speed.py --device cuda --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import unetlab
from unetlab.model.unet import count_parameters, forward_flops

from reference_unet import ReferenceUNet


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA are meaningless without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(n: int = 2048, repeats: int = 5, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> float:
    """Attainable FLOP/s of an n x n x n matmul on ``device`` (default: CPU) in ``dtype`` (best of ``repeats``)."""
    device = device or torch.device("cpu")
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=64)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--channels-last", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                        help="auto: on for CUDA (the trainer's default)")
    parser.add_argument("--upsampler", default="transpose", choices=["transpose", "bilinear"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"], help="auto: bf16 on CUDA")
    args = parser.parse_args()
    device = torch.device(args.device)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    amp = torch.bfloat16 if args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda") else None

    config = {"encoder": {"name": "classic", "depth": args.depth, "base_channels": args.base},
              "upsampler": {"name": args.upsampler}, "fusion": {"name": "concat"}, "block": {"name": "double_conv"},
              "init": {"name": "default"}, "decoder_channels": None}
    torch.manual_seed(0)
    models = {"assembled": unetlab.build_model(config, 3, 1),
              "hand-written": ReferenceUNet(3, 1, args.base, args.depth, up=args.upsampler)}
    flops = {k: forward_flops(m, 3, args.size, args.size) for k, m in models.items()}
    models = {k: m.to(device) for k, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = (torch.rand(args.batch, 1, args.size, args.size, device=device) > 0.5).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
    optimizers = {k: torch.optim.Adam(m.parameters(), 1e-4) for k, m in models.items()}

    def step(name: str) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = models[name](x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    for name in models:  # warm-up
        step(name)
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds):
        # interleaved, alternating which goes first: both models see the same machine state
        for name in (list(models) if r % 2 == 0 else list(reversed(models))):
            for _ in range(args.steps):
                sync(device)
                start = time.perf_counter()
                step(name)
                sync(device)
                times[name].append(time.perf_counter() - start)
    peak = matmul_rate(device=device, dtype=amp or torch.float32, n=2048 if device.type == "cpu" else 8192)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch} x 3x{args.size}x{args.size}, base {args.base}, "
          f"depth {args.depth}, upsampler {args.upsampler}, channels_last={channels_last}, amp={amp}")
    print(f"attainable {amp or torch.float32} matmul rate: {peak / 1e9:.0f} GFLOP/s")
    for name in models:
        median = statistics.median(times[name])
        rate = 3 * flops[name] * args.batch / median
        print(f"{name:>12}: {count_parameters(models[name]):,} params, {flops[name] / 1e9:.2f} forward GFLOP/image, "
              f"{median * 1000:.1f} ms/step, {args.batch / median:.2f} images/s, {rate / peak:.0%} of matmul rate")
    ratio = statistics.median(times["assembled"]) / statistics.median(times["hand-written"])
    print(f"step-time ratio assembled / hand-written: {ratio:.3f} (goal: within 1.03)")


if __name__ == "__main__":
    main()
