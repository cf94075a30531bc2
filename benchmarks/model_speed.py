"""Does assembly from plugin parts cost anything? (issue: assembly must cost nothing)

Trains (forward, BCE loss, backward, Adam step) the assembled classic + transpose + concat U-Net and
an independent hand-written U-Net of the same configuration, interleaved in one process on the same
batch, and prints the step-time ratio (goal: within 3%) and each model's share of the machine's
attainable FLOP/s (a large fp32 matmul measured in the same run). Training FLOPs = 3 x forward FLOPs.

    python benchmarks/model_speed.py                      # 64-1024 U-Net, batch 4 x 3x128x128
    python benchmarks/model_speed.py --base 16 --size 64  # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_unet import ReferenceUNet  # noqa: E402

import unetlab  # noqa: E402
from unetlab.model import count_parameters, forward_flops  # noqa: E402


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
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
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    config = {"encoder": {"name": "classic", "depth": args.depth, "base_channels": args.base},
              "upsampler": {"name": "transpose"}, "fusion": {"name": "concat"}, "block": {"name": "double_conv"},
              "init": {"name": "default"}, "decoder_channels": None}
    torch.manual_seed(0)
    models = {"assembled": unetlab.build_model(config, 3, 1),
              "hand-written": ReferenceUNet(3, 1, args.base, args.depth)}
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = (torch.rand(args.batch, 1, args.size, args.size) > 0.5).float()
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
    optimizers = {k: torch.optim.Adam(m.parameters(), 1e-4) for k, m in models.items()}
    flops = {k: forward_flops(m, 3, args.size, args.size) for k, m in models.items()}

    def step(name: str) -> None:
        logits = models[name](x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
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
                start = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - start)
    peak = matmul_rate()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x 3x{args.size}x{args.size}, "
          f"base {args.base}, depth {args.depth}, channels_last={args.channels_last}")
    print(f"attainable fp32 matmul rate: {peak / 1e9:.0f} GFLOP/s")
    for name in models:
        median = statistics.median(times[name])
        rate = 3 * flops[name] * args.batch / median
        print(f"{name:>12}: {count_parameters(models[name]):,} params, {flops[name] / 1e9:.2f} forward GFLOP/image, "
              f"{median * 1000:.1f} ms/step, {args.batch / median:.2f} images/s, {rate / peak:.0%} of matmul rate")
    ratio = statistics.median(times["assembled"]) / statistics.median(times["hand-written"])
    print(f"step-time ratio assembled / hand-written: {ratio:.3f} (goal: within 1.03)")


if __name__ == "__main__":
    main()
