"""What does unetlab's trainer cost over a bare PyTorch loop? (goal: within 3%)

One process, interleaved rounds (alternating which loop goes first); the figure is the median over rounds of
each round's ratio (the two loops of a round share the machine's speed of that minute). Each round trains
one epoch of the headline experiment's first run (concat/seed=1 of experiments/concat_vs_add.yaml,
augmentation off so both loops do the same work) with ``unetlab.training.trainer.train_run``, then one
epoch of a hand-written loop: the same model config, optimizer, loss and batches (the same order), nothing
else. Compared: training time per image. The trainer's time comes from its own ``images_per_s`` (the
training loop only, data loading included; validation and the checkpoint written after each epoch are
reported separately).

On ``--device cuda`` both run on the GPU as a run does there: the trainer's own precision (bf16
autocast), memory format (channels_last) and deterministic setting, the bare loop the same, with the
split on the GPU and each batch gathered there.

    python benchmarks/overhead.py [--rounds 5] [--device cpu|cuda] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unetlab.config.experiment import load_experiment
from unetlab.data.sources import build_source, model_io
from unetlab.model.unet import build_unet
from unetlab.plugin_api.host import default_host
from unetlab.training.determinism import configure
from unetlab.training.preflight import prepare, resolve_runtime
from unetlab.training.trainer import (
    TrainSetup,
    build_loss,
    epoch_seed,
    make_optimizer,
    train_run,
)

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the trainer's train.device)")
    args = parser.parse_args()
    overrides = ["data.augment=[]", "train.epochs=1", "train.warmup_epochs=0", "seeds=[1]",
                 f"train.device={args.device}", *args.overrides]
    run = load_experiment(REPO / "experiments" / "concat_vs_add.yaml", overrides).runs[0]
    registry = default_host().registry
    source = build_source(run.config, registry)
    in_ch, out_ch, num_classes = model_io(run.config, source)
    train_set = source.split("train")
    batch = run.config["data"]["batch_size"]
    t = run.config["train"]
    runtime = resolve_runtime(run.config)  # the trainer's own device, precision and memory format
    device, dtype, channels_last = runtime.device, runtime.amp_dtype, runtime.channels_last

    def bare_epoch() -> float:
        configure(t["deterministic"], device)
        torch.manual_seed(t["seed"])
        model = build_unet(run.config["model"], in_ch, out_ch, registry).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, t)
        loss_fn = build_loss(t, num_classes, registry)
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(t["seed"], 0))
        order = torch.randperm(len(train_set), generator=generator).to(device)
        images, masks = (x.to(device) for x in train_set.tensors)
        model.train()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            x = images.index_select(0, idx)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x)
            loss = loss_fn(logits, masks.index_select(0, idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / len(order)

    trainer, bare, extras = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):  # round 0 warms up both
            setup = TrainSetup(prepare(run, registry, source=source), registry, Path(tmp) / str(r))
            if r % 2:  # alternate which goes first: neither gets the warmer machine every time
                b = bare_epoch()
                record = train_run(setup).history[0]
            else:
                record = train_run(setup).history[0]
                b = bare_epoch()
            if r:
                trainer.append(1 / record["images_per_s"])
                bare.append(b)
                extras.append(record["epoch_time_s"] - len(train_set) / record["images_per_s"])
    tr, br = statistics.median(trainer), statistics.median(bare)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, amp {dtype}, channels_last {channels_last}; "
          f"run {run.name}, {len(train_set)} images/epoch, batch {batch}, {args.rounds} interleaved rounds")
    print(f"bare loop:   {br * 1000:.3f} ms/image  (rounds: {', '.join(f'{x * 1000:.3f}' for x in bare)})")
    print(f"unetlab:     {tr * 1000:.3f} ms/image  (rounds: {', '.join(f'{x * 1000:.3f}' for x in trainer)})")
    # each round trains both back to back: its ratio cancels the machine's speed that minute, which drifts by
    # 30% over a run here, so the median of the per-round ratios is the figure held to the goal
    paired = [t / b for t, b in zip(trainer, bare)]
    low, _, high = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
    print(f"ratio unetlab / bare, paired by round: {statistics.median(paired):.3f} (goal: within 1.03; "
          f"rounds' quartiles {low:.3f} to {high:.3f})")
    print(f"ratio of the medians above: {tr / br:.3f} (moves with the machine's drift between rounds)")
    print(f"per epoch outside the training loop (validation, checkpoint): {statistics.median(extras):.2f} s")


if __name__ == "__main__":
    main()
