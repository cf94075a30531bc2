"""Whole-image validation and ``unetlab predict`` of one very large image: peak RSS and time.

A synthetic RGB uint8 image of SIZE x SIZE (default 12000) with a binary mask is written as an
uncompressed TIFF and decoded into the decode cache first (as ``unetlab run`` does before training).
Then, each in a fresh process (so its peak RSS is its own):

- ``validate``: ``unetlab.training.whole_image_validation.evaluate_whole_images`` on that image
  (the trainer's whole-image
  validation: sliding windows of 512, batches of 4, cross entropy and iou/dice), the image memory-mapped
  from the cache;
- ``predict``: ``unetlab predict`` of the TIFF with a checkpoint of the same model.

The model is a small U-Net (classic encoder, depth 3, base 8 channels, random weights: the cost of
inference does not depend on what the weights learned). One torch thread.

    python benchmarks/large_image.py [--size 12000] [--only validate|predict] [--budget-mb 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_VALIDATE = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
import unetlab
from unetlab.data.options import configure_source
from unetlab.model.unet import build_unet
from unetlab.training.trainer import build_loss, build_metrics
from unetlab.training.whole_image_validation import evaluate_whole_images
root, config = sys.argv[1], json.loads(sys.argv[2])
source = configure_source(unetlab.create("dataset", "folder", root=root, split_file=root + "/split.json"),
                          {"patch_size": [256, 256]}, "folder")
reg = unetlab.default_host().registry
model = build_unet(config, 3, 1, reg).eval()
train = {"loss": [{"name": "cross_entropy", "weight": 1.0}], "metrics": [{"name": "iou"}, {"name": "dice"}]}
val = source.whole_images("val")
def peak_kb():  # VmHWM: this process's own peak (ru_maxrss would start at the forking parent's RSS on Linux)
    try:
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = peak_kb()
start = time.perf_counter()
result = evaluate_whole_images(model, val, build_loss(train, 2, reg, 255), build_metrics(train, 2, reg, 255),
                               torch.device("cpu"))
seconds = time.perf_counter() - start
print(json.dumps({"setup_peak_mb": before / 1024, "peak_mb": peak_kb() / 1024,
                  "seconds": seconds, "result": result}))
"""

CHILD_PREDICT = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from unetlab.cli.main import main
start = time.perf_counter()
code = main(json.loads(sys.argv[1]))
seconds = time.perf_counter() - start
if code:
    sys.exit(code)
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"peak_mb": peak / 1024, "seconds": seconds}))
"""


def model_config() -> dict:
    from unetlab.plugin_api.host import default_host

    registry = default_host().registry

    def spec(kind, name, **p):
        return {"name": name, **registry.get(kind, name).defaults(), **p}

    return {"encoder": spec("encoder", "classic", depth=3, base_channels=8), "upsampler": spec("upsampler", "bilinear"),
            "fusion": spec("fusion", "concat"), "block": spec("block", "double_conv"),
            "init": spec("initializer", "default"), "decoder_channels": None}


def make_data(root: Path, size: int) -> None:
    """A SIZE x SIZE RGB image (noise plus bright discs) with its mask, and a small training image."""
    import numpy as np
    import tifffile
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    mask = np.zeros((size, size), np.uint8)
    yy, xx = np.ogrid[:512, :512]
    disc = (yy - 256) ** 2 + (xx - 256) ** 2 < 200 ** 2
    for top in range(0, size - 512, 1024):
        for left in range(0, size - 512, 1024):
            mask[top:top + 512, left:left + 512][disc] = 255
    image = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
    image[mask > 0] += 100
    tifffile.imwrite(root / "images" / "large.tif", image)
    Image.fromarray(mask).save(root / "masks" / "large.png")
    small = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(small).save(root / "images" / "small.png")
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(root / "masks" / "small.png")
    (root / "split.json").write_text(json.dumps({"train": ["small"], "val": ["large"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--only", choices=("validate", "predict"))
    parser.add_argument("--budget-mb", type=float, default=None, help="UNETLAB_VALIDATION_MEMORY_MB for the run")
    args = parser.parse_args()
    import torch

    import unetlab
    from unetlab.checkpoint import save_atomic
    from unetlab.data.options import configure_source
    from unetlab.model.unet import build_unet

    with tempfile.TemporaryDirectory() as tmp:
        root, env = Path(tmp) / "data", {**os.environ, "UNETLAB_CACHE_DIR": str(Path(tmp) / "cache"),
                                         "OMP_NUM_THREADS": "1"}
        if args.budget_mb is not None:
            env["UNETLAB_VALIDATION_MEMORY_MB"] = str(args.budget_mb)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"from large_image import make_data; from pathlib import Path; "
                        f"make_data(Path({str(root)!r}), {args.size})"], check=True, env=env)
        os.environ["UNETLAB_CACHE_DIR"] = env["UNETLAB_CACHE_DIR"]
        source = configure_source(unetlab.create("dataset", "folder", root=str(root),
                                                 split_file=str(root / "split.json")), {"patch_size": [256, 256]},
                                  "folder")
        source.check()  # decode into the cache, as a run does before it trains
        print(f"{args.size}x{args.size} RGB uint8 image written and decoded in {time.perf_counter() - start:.0f} s")
        config = model_config()
        if args.only in (None, "validate"):
            proc = subprocess.run([sys.executable, "-c", CHILD_VALIDATE, str(root), json.dumps(config)], env=env,
                                  text=True, capture_output=True)
            if proc.returncode:
                sys.exit(proc.stderr)
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"validate: peak RSS {out['peak_mb']:,.0f} MB (process after setup {out['setup_peak_mb']:,.0f} MB), "
                  f"{out['seconds']:.0f} s; val_iou {out['result']['val_iou']:.4f}")
        if args.only in (None, "predict"):
            model = build_unet(config, 3, 1, unetlab.default_host().registry)
            save_atomic({"model": model.state_dict(), "model_config": config, "in_channels": 3, "out_channels": 1},
                        Path(tmp) / "model.pt")
            argv = ["predict", str(Path(tmp) / "model.pt"), str(root / "images" / "large.tif"), "--out",
                    str(Path(tmp) / "pred")]
            proc = subprocess.run([sys.executable, "-c", CHILD_PREDICT, json.dumps(argv)], env=env, text=True,
                                  capture_output=True)
            if proc.returncode:
                sys.exit(proc.stderr)
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"predict: peak RSS {out['peak_mb']:,.0f} MB (the decoded file alone is "
                  f"{args.size * args.size * 3 / 2 ** 20:,.0f} MB), {out['seconds']:.0f} s")
        del torch


if __name__ == "__main__":
    main()
