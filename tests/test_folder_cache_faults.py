"""The decode cache trusts nothing it reads back (issue 24, item 6): a truncated array, metadata replaced by
``{}`` or garbage, a valid array of the wrong shape or content are each found, decoded again with one
warning line, and repaired; a cache folder that cannot be written is one line naming it and
``UNETLAB_CACHE_DIR`` (exit 2, no traceback, before any MLflow run).

How an unusable folder is made although tests run as root (where chmod does not stop writes):
``UNETLAB_CACHE_DIR`` points *below a regular file*, so creating it fails with NotADirectoryError;
and a full disk is a real process whose file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the
first cache write fail with EFBIG, as a full disk makes it fail with ENOSPC.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unetlab
from unetlab.cli.main import main as cli_main
from unetlab.data.options import configure_source


def write_set(root: Path, n: int = 3) -> None:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((20, 24), np.uint8)
        mask[4 + i:12, 5:15] = 255
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(root / "images" / f"p{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"p{i}.png")


def tensors(root: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every training sample, read through the decode cache (memory-mapped, as large sets are)."""
    source = unetlab.create("dataset", "folder", root=str(root), val_fraction=0.0, cache="disk")
    configure_source(source, {}, "folder")
    train = source.split("train")
    return [train[i] for i in range(len(train))]


def entries(cache: Path, kind: str) -> list[Path]:
    """The cache's ``.json`` files of ``kind`` entries, in a fixed order."""
    return sorted(p for p in (cache / "decoded").rglob("*.json") if json.loads(p.read_text()).get("kind") == kind)


def test_damaged_entries_are_decoded_again_with_one_warning_each(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("UNETLAB_CACHE_DIR", str(cache))
    write_set(tmp_path / "data")
    reference = tensors(tmp_path / "data")
    images, masks = entries(cache, "image"), entries(cache, "mask")
    assert len(images) == len(masks) == 3
    capsys.readouterr()

    truncated = images[0].with_suffix(".npy")
    truncated.write_bytes(truncated.read_bytes()[:-100])  # a write cut short ("Failed to read all data")
    masks[0].write_text("{}")
    masks[1].write_text("garbage {")
    wrong_shape = images[1].with_suffix(".npy")
    np.save(wrong_shape, np.zeros((24, 20, 3), np.uint8))  # a valid array, not this file's
    other_content = images[2].with_suffix(".npy")
    array = np.load(other_content)
    array[10, 12, 1] ^= 0xFF  # same shape and dtype, one byte changed
    np.save(other_content, array)
    meta = json.loads(masks[2].read_text())
    meta["coords"]["255"][0] = [500, 500]  # a position outside the mask: would index out of bounds
    masks[2].write_text(json.dumps(meta))

    again = tensors(tmp_path / "data")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("unetlab: warning: decode cache entry") for line in err), err
    for damaged in (truncated, masks[0], masks[1], wrong_shape, other_content, masks[2]):
        assert sum(str(damaged.with_suffix("")) in line for line in err) == 1, damaged
    assert "array file has" in err[[str(truncated.with_suffix("")) in x for x in err].index(True)]
    for (image, mask), (ref_image, ref_mask) in zip(again, reference):
        assert torch.equal(image, ref_image) and torch.equal(mask, ref_mask)
    # repaired: a third read warns about nothing and reads the same
    third = tensors(tmp_path / "data")
    assert capsys.readouterr().err == ""
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(third, reference))
    assert not list(cache.rglob("*.tmp*"))


EXPERIMENT = """\
name: cache
data: {dataset: {name: folder, root: data, val_fraction: 0.34}, batch_size: 2}
model: {encoder: {name: classic, depth: 2, base_channels: 4}}
train: {epochs: 1}
tracking: {log_model: false, figures: false}
"""


def test_a_cache_folder_below_a_file_is_one_line_before_any_run(tmp_path, monkeypatch, capsys):
    write_set(tmp_path / "data")
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    (tmp_path / "a_file").write_text("not a folder")
    cache = tmp_path / "a_file" / "cache"
    monkeypatch.setenv("UNETLAB_CACHE_DIR", str(cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    for command in (["run", "exp.yaml", "--quiet"], ["data", "exp.yaml"]):
        assert cli_main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"decode cache folder '{cache / 'decoded'}' cannot be written" in err[0]
        assert "UNETLAB_CACHE_DIR" in err[0] and "NotADirectoryError" in err[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_full_cache_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    write_set(tmp_path / "data")
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    cache = tmp_path / "cache"
    env = {**os.environ, "UNETLAB_CACHE_DIR": str(cache), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}",
           "PYTHONDONTWRITEBYTECODE": "1"}

    def small_files() -> None:  # in the child: writes past 1 KB fail (EFBIG) instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    proc = subprocess.run([sys.executable, "-m", "unetlab", "run", "exp.yaml", "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=small_files, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert f"decode cache folder '{cache / 'decoded'}' cannot be written (OSError: [Errno 27] File too large" \
        in err[0] and "UNETLAB_CACHE_DIR" in err[0]
    assert not list(cache.rglob("*.tmp*"))  # nothing half-written: no temporaries, only complete entries
    assert all(npy.with_suffix(".json").exists() for npy in cache.rglob("*.npy"))
    assert entries(cache, "image") == []  # the images (1.6 KB each) did not fit: none is half there
    assert not (tmp_path / "m.db").exists()
