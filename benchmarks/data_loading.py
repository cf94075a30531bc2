"""How much of a training step waits for data? (goal: under 5% at the headline experiment's settings)

Measures, interleaved over a few rounds, (a) one pass over the training loader plus the configured
augmentations, exactly as the trainer fetches batches, and (b) one training epoch of the trainer
(which includes that same fetching). The share is (a) / (b).

    python benchmarks/data_loading.py [--set data.num_workers=2 ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unetlab.config.experiment import load_experiment
from unetlab.data.sources import build_augment, build_source, make_loader
from unetlab.plugin_api.host import default_host
from unetlab.training.preflight import prepare
from unetlab.training.trainer import TrainSetup, train_run

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    run = load_experiment(REPO / "experiments" / "concat_vs_add.yaml",
                          ["train.epochs=1", "seeds=[1]", *args.overrides]).runs[0]
    registry = default_host().registry
    source = build_source(run.config, registry)
    data = run.config["data"]
    loader = make_loader(source.split("train"), data["batch_size"], True, data["num_workers"], False)
    augment = build_augment(run.config, registry)

    def fetch_epoch() -> float:
        loader.epoch_sampler.set_epoch(0)
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for images, masks in loader:
            if augment is not None:
                augment(images, masks, generator)
        return time.perf_counter() - start

    fetch, train = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):
            f = fetch_epoch()
            record = train_run(TrainSetup(prepare(run, registry, source=source), registry,
                                          Path(tmp) / str(r))).history[0]
            if r:
                fetch.append(f)
                train.append(len(source.split("train")) / record["images_per_s"])
    share = statistics.median(fetch) / statistics.median(train)
    print(f"batch {data['batch_size']}, workers {data['num_workers']}, augment {[a['name'] for a in data['augment']]}")
    print(f"data (loader + augmentation): {statistics.median(fetch) * 1000:.1f} ms/epoch; "
          f"training epoch: {statistics.median(train) * 1000:.1f} ms")
    print(f"share of training time spent on data: {share:.1%} (goal: under 5%)")


if __name__ == "__main__":
    main()
