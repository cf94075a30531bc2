"""Folder data at realistic sizes: decode time, patches/s, data wait in a training step, peak RSS.

Writes a synthetic set to disk (images of sizes between 256x256 and 1024x1400 with sparse
foreground, as 8-bit RGB PNGs and as 16-bit grey TIFFs), then measures, each in a fresh process:

- first-epoch decode time: scanning and decoding every file into the decode cache (empty cache);
- patches/s: 256x256 patches (a third centred on foreground) the DataLoader delivers alone, with 0
  and 2 workers, from the cache (goal: >= 500/s on 2 cores), and the CPU time per patch in the main
  process and in the workers (a figure that other jobs on shared cores inflate far less);
- data wait: the share of a training step (a U-Net, batch 8 of 256x256 patches, 2 workers) spent
  waiting for the next batch (goal: under 5%);
- peak RSS of a process that builds the source and reads one epoch of patches, at N and 4N images
  (4N: the N files hard-linked under new names, so every one is a distinct cache entry; goal:
  under 1.5 GB and not growing with the count).

    python benchmarks/folder_data.py            # 1,000 and 4,000 images (about 15 minutes on 2 cores)
    python benchmarks/folder_data.py --quick    # 60 and 240 smaller images (about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PATCH = 256


def write_set(root: Path, count: int, max_size: tuple[int, int], variant: str, seed: int = 0) -> None:
    """``count`` image/mask pairs of random sizes in [256, max_size]; a few small round objects each."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = int(rng.integers(256, max_size[0] + 1)), int(rng.integers(256, max_size[1] + 1))
        yy, xx = np.ogrid[:h, :w]
        mask = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, 5))):  # sparse: about 1-3% of the pixels
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(6, 24)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        small = gaussian_filter(rng.standard_normal((h // 8 + 1, w // 8 + 1)), 2)
        background = 0.3 + 0.1 * np.kron(small, np.ones((8, 8)))[:h, :w]
        signal = np.clip(background + 0.4 * mask + 0.03 * rng.standard_normal((h, w)), 0, 1)
        if variant == "rgb8":
            image = (np.stack([signal, signal * 0.7, signal * 0.4], -1) * 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / f"img{i:05d}.png", compress_level=1)
        else:
            import tifffile

            tifffile.imwrite(root / "images" / f"img{i:05d}.tif", (signal * 4095).astype(np.uint16))
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"img{i:05d}.png", compress_level=1)


def link_copies(source: Path, target: Path, times: int) -> None:
    """``times`` hard-linked copies of every file of ``source`` under new names (distinct cache entries)."""
    for sub in ("images", "masks"):
        (target / sub).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / sub).iterdir()):
            for k in range(times):
                link = target / sub / f"c{k}_{path.name}"
                if not link.exists():
                    os.link(path, link)


def build(root: Path, workers: int = 0):
    import unetlab
    from unetlab.data.options import configure_source

    source = unetlab.create("dataset", "folder", root=str(root), val_fraction=0.05)
    configure_source(source, {"patch_size": [PATCH, PATCH], "num_workers": workers}, "folder")
    return source


def loader_for(source, batch: int, workers: int):
    from unetlab.data.sources import make_loader

    loader = make_loader(source.split("train"), batch, True, workers, False)
    loader.epoch_sampler.set_epoch(0)
    return loader


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc: the load of other jobs does not inflate it
    the way it inflates wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; returns its numbers."""
    import torch

    # The loader's own work is single-threaded (workers run with one thread); a 2-thread torch.stack in the
    # collate spins for ~40x longer on cores shared with other processes, which would measure that instead.
    torch.set_num_threads(2 if args.measure == "wait" else 1)
    root = Path(args.root)
    out: dict = {}
    if args.measure == "decode":
        start = time.perf_counter()
        source = build(root)
        source.split("train")
        out["decode_s"] = time.perf_counter() - start
        out["images"] = len(source.whole_images("train")) + len(source.whole_images("val"))
        out["in_memory"] = source.whole_images("train").store.in_memory
    elif args.measure == "patches":
        loader = loader_for(build(root), 16, args.workers)
        raw, finish = getattr(loader, "raw", loader), getattr(loader, "finish", None)
        first = iter(raw)
        next(first)  # workers started, caches warm
        workers = [w.pid for w in getattr(first, "_workers", [])]  # persistent: the same every epoch
        cpu = {"main": _cpu_seconds(os.getpid()), "workers": sum(map(_cpu_seconds, workers))}
        start, patches, epoch = time.perf_counter(), 0, 1
        while patches < args.patches:  # whole epochs, as training reads them
            loader.epoch_sampler.set_epoch(epoch)
            for batch in raw:
                images = finish(*batch)[0] if finish else batch[0]  # what iterating the loader does
                patches += images.shape[0]
            epoch += 1
        out["patches_per_s"] = patches / (time.perf_counter() - start)
        out["main_cpu_ms_per_patch"] = 1e3 * (_cpu_seconds(os.getpid()) - cpu["main"]) / patches
        out["worker_cpu_ms_per_patch"] = 1e3 * (sum(map(_cpu_seconds, workers)) - cpu["workers"]) / patches
    elif args.measure == "wait":
        import unetlab

        source = build(root)
        model = unetlab.build_model({"encoder": {"name": "classic", "depth": 4, "base_channels": 16}},
                                    source.in_channels, 1)
        loss_fn = unetlab.create("loss", "bce", num_classes=2, ignore_index=255)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        it = iter(loader_for(source, 8, 2))
        next(it)
        waited = total = 0.0
        for _ in range(args.steps):
            t0 = time.perf_counter()
            images, masks = next(it)
            t1 = time.perf_counter()
            loss = loss_fn(model(images), masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            waited += t1 - t0
            total += time.perf_counter() - t0
        out.update(wait_share=waited / total, step_s=total / args.steps)
    elif args.measure == "rss":
        source = build(root)
        for _ in loader_for(source, 16, 0):
            pass
        out["images"] = len(source.whole_images("train")) + len(source.whole_images("val"))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def measure(what: str, root: Path, cache: Path, **extra) -> dict:
    command = [sys.executable, __file__, "--child", what, "--root", str(root)]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "UNETLAB_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="60 / 240 images up to 512x640")
    parser.add_argument("--dir", default=None, help="where to write the data (default: a temporary folder)")
    parser.add_argument("--child", dest="measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--patches", type=int, default=2000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(child(args)))
        return
    count, max_size = (60, (512, 640)) if args.quick else (1000, (1024, 1400))
    base = Path(args.dir or tempfile.mkdtemp(prefix="unetlab-folder-bench-"))
    print(f"data under {base}; {count} images of 256x256..{max_size[0]}x{max_size[1]}, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these cores)")
    rows = []
    for variant in ("rgb8", "grey16"):
        root = base / variant
        start = time.perf_counter()
        if not (root / "images").is_dir():
            write_set(root, count, max_size, variant)
        print(f"{variant}: wrote the set in {time.perf_counter() - start:.0f} s")
        cache = base / f"cache-{variant}"
        decode = measure("decode", root, cache)
        n = 500 if args.quick else 3000
        p0 = measure("patches", root, cache, workers=0, patches=n)
        p2 = measure("patches", root, cache, workers=2, patches=n)
        rows.append((variant, decode, p0, p2))
        print(f"{variant}: first-epoch decode {decode['decode_s']:.1f} s ({decode['images']} images, "
              f"{'RAM' if decode['in_memory'] else 'memory-mapped'}); 256x256 patches/s: "
              f"{p0['patches_per_s']:.0f} (0 workers), {p2['patches_per_s']:.0f} (2 workers); CPU ms per patch: "
              f"{p0['main_cpu_ms_per_patch']:.2f} (0 workers), {p2['worker_cpu_ms_per_patch']:.2f} in the workers + "
              f"{p2['main_cpu_ms_per_patch']:.2f} in the main process (2 workers)")
    wait = measure("wait", base / "rgb8", base / "cache-rgb8", steps=6)
    print(f"data wait: {100 * wait['wait_share']:.1f}% of a training step ({wait['step_s']:.2f} s/step, CPU, "
          "batch 8 x 256x256, 2 workers)")
    many = base / "rgb8-x4"
    link_copies(base / "rgb8", many, 4)
    measure("decode", many, base / "cache-rgb8")  # fill the cache for the linked copies first
    for root in (base / "rgb8", many):
        rss = measure("rss", root, base / "cache-rgb8")
        print(f"peak RSS, build + one epoch of patches: {rss['peak_rss_mb']:.0f} MB at {rss['images']} images")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
