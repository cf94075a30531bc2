"""Gradient checkpointing: how much activation memory does it save, and what does it cost in time?

Memory is measured exactly, not from the noisy process RSS: the bytes of every tensor autograd saves
for the backward pass (torch.autograd.graph.saved_tensors_hooks), for one training step of the
assembled U-Net, with and without ``train.gradient_checkpointing``.

    python benchmarks/memory.py [--base 64 --depth 5 --size 256 --batch 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import unetlab
from unetlab.plugin_api.host import default_host


def saved_bytes_and_time(model, x) -> tuple[int, float]:
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:  # count shared storage once
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).float().square().mean()
    loss.backward()
    return total, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=64)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    registry = default_host().registry

    def spec(kind, name, **p):
        return {"name": name, **registry.get(kind, name).defaults(), **p}

    config = {"encoder": spec("encoder", "classic", depth=args.depth, base_channels=args.base),
              "upsampler": spec("upsampler", "transpose"), "fusion": spec("fusion", "concat"),
              "block": spec("block", "double_conv"), "init": spec("initializer", "default"), "decoder_channels": None}
    model = unetlab.build_model(config, 3, 1).train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    results = {}
    for flag in (False, True, False, True):  # interleaved; the second pair is the one reported
        model.gradient_checkpointing = flag
        model.zero_grad(set_to_none=True)
        results[flag] = saved_bytes_and_time(model, x)
    plain, ckpt = results[False], results[True]
    print(f"U-Net base {args.base}, depth {args.depth}, batch {args.batch} x 3x{args.size}x{args.size}")
    print(f"saved for backward: {plain[0] / 2**20:.0f} MiB without, {ckpt[0] / 2**20:.0f} MiB with gradient "
          f"checkpointing ({1 - ckpt[0] / plain[0]:.0%} less)")
    print(f"step time: {plain[1]:.2f} s without, {ckpt[1]:.2f} s with ({ckpt[1] / plain[1] - 1:+.0%})")


if __name__ == "__main__":
    main()
