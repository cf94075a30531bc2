"""``unetlab predict`` end to end from runs trained here: run id, checkpoint, tiling, overlap-tile, TTA."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from skimage import io

from conftest import one_line_error, run_cli


def train(tmp_path, model: str, dataset: str, log_model: bool) -> tuple[str, str]:
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(f"""
        name: predict_test
        data: {{dataset: {dataset}, batch_size: 4}}
        model: {model}
        train: {{epochs: 2, lr: 0.01}}
        tracking: {{uri: sqlite:///{tmp_path / 'm.db'}, checkpoint_dir: {tmp_path / 'ckpt'},
                    log_model: {str(log_model).lower()}, figures: false}}
    """))
    proc = run_cli("run", str(path), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.get_experiment_by_name("predict_test")
    child = next(r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags)
    best = next((tmp_path / "ckpt").rglob("best.pt"))
    return child.info.run_id, str(best)


@pytest.fixture(scope="module")
def same_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("same")
    run_id, ckpt = train(tmp, "{encoder: {name: classic, depth: 3, base_channels: 4}}",
                         "{name: blobs, image_size: 32, n_train: 16, n_val: 8}", log_model=True)
    return tmp, run_id, ckpt


def write_image(path, size, seed=0):
    rng = np.random.default_rng(seed)
    io.imsave(path, (rng.random(size) * 255).astype(np.uint8), check_contrast=False)


def test_predict_by_run_id_and_checkpoint(same_model, tmp_path):
    store, run_id, ckpt = same_model
    write_image(tmp_path / "a.png", (40, 52))
    (tmp_path / "folder").mkdir()
    write_image(tmp_path / "folder" / "b.png", (33, 33), seed=1)
    proc = run_cli("predict", run_id, str(tmp_path / "a.png"), str(tmp_path / "folder"), "--out",
                   str(tmp_path / "by_run"), "--tracking-uri", f"sqlite:///{store / 'm.db'}", "--overlay")
    assert proc.returncode == 0, proc.stderr
    mask = io.imread(tmp_path / "by_run" / "a_mask.png")
    assert mask.shape == (40, 52) and set(np.unique(mask)) <= {0, 255}
    assert io.imread(tmp_path / "by_run" / "b_mask.png").shape == (33, 33)
    assert io.imread(tmp_path / "by_run" / "a_overlay.png").shape == (40, 52, 3)
    proc = run_cli("predict", ckpt, str(tmp_path / "a.png"), "--out", str(tmp_path / "by_ckpt"))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(io.imread(tmp_path / "by_ckpt" / "a_mask.png"), mask)  # the same best model


def test_tiled_equals_whole_image(same_model):
    from unetlab.predict import load_model, predict_probabilities

    _, _, ckpt = same_model
    model = load_model(ckpt)
    image = torch.rand(1, 120, 100, generator=torch.Generator().manual_seed(0))
    whole = predict_probabilities(model, image)
    for tile, overlap in ((48, 16), (64, 24)):
        tiled = predict_probabilities(model, image, tile=tile, overlap=overlap)
        assert ((tiled > 0.5) == (whole > 0.5)).float().mean() > 0.995
        assert (tiled - whole).abs().mean() < 0.01
    flipped = predict_probabilities(model, image, tta=True)
    assert flipped.shape == whole.shape and torch.isfinite(flipped).all()


def test_paper_mode_overlap_tile_covers_the_whole_image(tmp_path):
    _, ckpt = train(tmp_path, "{encoder: {name: classic, depth: 3, base_channels: 4, padding: valid, norm: none}, "
                              "block: {name: double_conv, norm: none}, upsampler: transpose, out_channels: 2}",
                    "{name: blobs, image_size: 92, n_train: 8, n_val: 4}", log_model=False)
    write_image(tmp_path / "big.png", (572, 572))
    proc = run_cli("predict", ckpt, str(tmp_path / "big.png"), "--out", str(tmp_path / "out"), "--tile", "188")
    assert proc.returncode == 0, proc.stderr
    mask = io.imread(tmp_path / "out" / "big_mask.png")
    assert mask.shape == (572, 572) and set(np.unique(mask)) <= {0, 1}
    # the overlap-tile result does not depend on the tile size (each output pixel sees its full context)
    from unetlab.predict import load_model, predict_probabilities

    model = load_model(ckpt)
    image = torch.rand(1, 150, 130, generator=torch.Generator().manual_seed(1))
    a = predict_probabilities(model, image, tile=188)
    b = predict_probabilities(model, image, tile=252)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_predict_errors(tmp_path):
    line = one_line_error(run_cli("predict", "no-such-run", str(tmp_path), "--out", str(tmp_path / "o"),
                                  "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"))
    assert "no input images found" in line or "neither a checkpoint" in line
    write_image(tmp_path / "a.png", (8, 8))
    line = one_line_error(run_cli("predict", "no-such-run", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                                  "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"))
    assert "neither a checkpoint file, an MLflow run id" in line


def test_runs_and_models_uris_load_the_same_model(same_model):
    import mlflow
    from mlflow.tracking import MlflowClient

    from unetlab.predict import load_model

    store, run_id, _ = same_model
    mlflow.set_tracking_uri(f"sqlite:///{store / 'm.db'}")
    models_uri = MlflowClient().get_run(run_id).data.tags["unetlab.model_uri"]
    x = torch.rand(1, 1, 32, 32)
    outputs = [load_model(spec)(x) for spec in (run_id, f"runs:/{run_id}/model", models_uri)]
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0])
