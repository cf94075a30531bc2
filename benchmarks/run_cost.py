"""What does a run cost outside training? (issue 10.5: on a GPU the headline must be dominated by training)

Times real ``unetlab run`` processes of the headline experiment's first run (concat/seed=1 of
experiments/concat_vs_add.yaml), each in a fresh scratch folder with its own MLflow store, and
separates the parts by difference:

- one epoch = wall(2 epochs) - wall(1 epoch);
- fixed cost of a run = wall(1 epoch) - one epoch (process start and imports, data, model build,
  MLflow run and params, checkpoints, model logging, figures);
- model logging + figures = wall(1 epoch) - wall(1 epoch with tracking.log_model=false, tracking.figures=false);
- process start and imports alone: ``python -c "import unetlab.cli.main, torch, mlflow"``.

Each configuration runs ``--repeats`` times, interleaved; the medians are printed.

    python benchmarks/run_cost.py [--device cpu|cuda] [--repeats 2] [--set KEY=VALUE ...]
    python benchmarks/run_cost.py --quick        # a smaller dataset: a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wall(argv: list[str], cwd: str) -> float:
    """Seconds a subprocess takes (it must succeed)."""
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the scratch folder's store
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        sys.exit(f"benchmarks/run_cost.py: {' '.join(argv[2:5])} ... failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="n_train 64, n_val 16")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    base = [f"train.device={args.device}", "seeds=[1]", *(["data.dataset.n_train=64", "data.dataset.n_val=16"]
                                                          if args.quick else []), *args.overrides]
    configs = {
        "1 epoch": ["train.epochs=1", "train.warmup_epochs=0"],
        "2 epochs": ["train.epochs=2", "train.warmup_epochs=0"],
        "1 epoch, no model logging, no figures": ["train.epochs=1", "train.warmup_epochs=0",
                                                  "tracking.log_model=false", "tracking.figures=false"],
    }
    imports = [sys.executable, "-c", "import unetlab.cli.main, torch, mlflow"]
    times: dict[str, list[float]] = {name: [] for name in [*configs, "imports"]}
    for _ in range(args.repeats):
        for name, extra in configs.items():
            with tempfile.TemporaryDirectory() as tmp:
                argv = [sys.executable, "-m", "unetlab", "run", str(REPO / "experiments" / "concat_vs_add.yaml"),
                        "--only", "concat/", "--quiet"]
                for item in [*base, *extra]:
                    argv += ["--set", item]
                times[name].append(wall(argv, tmp))
        with tempfile.TemporaryDirectory() as tmp:
            times["imports"].append(wall(imports, tmp))
    med = {k: statistics.median(v) for k, v in times.items()}
    epoch = med["2 epochs"] - med["1 epoch"]
    fixed = med["1 epoch"] - epoch
    logging = med["1 epoch"] - med["1 epoch, no model logging, no figures"]
    print(f"concat/seed=1 of concat_vs_add.yaml on {args.device}; overrides: {' '.join(base)}; "
          f"median of {args.repeats}")
    for name, values in times.items():
        print(f"  {name:<40} {med[name]:7.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"one epoch (train + validate + checkpoint):     {epoch:7.2f} s")
    print(f"fixed cost of a run:                           {fixed:7.2f} s  "
          f"({fixed / med['1 epoch']:.0%} of a 1-epoch run)")
    print(f"  of which process start and imports:          {med['imports']:7.2f} s")
    print(f"  of which model logging and figures:          {logging:7.2f} s")
    print(f"  the rest (data, model build, MLflow run, checkpoints): {fixed - med['imports'] - logging:7.2f} s")


if __name__ == "__main__":
    main()
