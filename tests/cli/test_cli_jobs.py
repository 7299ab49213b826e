"""train / eval / predict from the command line: run folders, Ctrl-C, headers, prediction options."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import io

from unetpp_fast import cli
from unetpp_fast.train import training
from unetpp_fast.train.synthetic_data import write_synthetic_dataset

TINY = ["--filters", "4,8,16", "--threads", "1", "--batch-size", "4", "--no-progress"]


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    write_synthetic_dataset(str(root), n=8, size=48, seed=2)
    return root


def _train(data: Path, run: Path, *extra: str) -> int:
    return cli.main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY, *extra])


def test_resume_without_out_continues_in_the_runs_folder(tmp_path, dataset, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "intr"
    assert _train(dataset, run, "--size", "32") == 0
    argv = ["train", "--resume", str(run / "last.pth"), "--epochs", "2", "--threads", "1", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"output      {run}" in out and "epoch 2/2" in out
    assert training.read_checkpoint(str(run / "last.pth"))["epoch"] == 2
    assert len(json.loads((run / "history.json").read_text())) == 2
    assert not (tmp_path / "runs").exists()  # nothing went to the default folder


def test_an_existing_run_is_refused_unless_overwrite(tmp_path, dataset, capsys):
    run = tmp_path / "cpu1"
    assert _train(dataset, run, "--size", "32") == 0
    best = (run / "best.pth").read_bytes()
    capsys.readouterr()
    assert _train(dataset, run, "--size", "32", "--seed", "5") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (run / "best.pth").read_bytes() == best
    assert _train(dataset, run, "--size", "32", "--seed", "5", "--overwrite") == 0
    assert "moved the previous run's" in capsys.readouterr().out
    (archive,) = run.glob("replaced-*")
    assert (archive / "best.pth").read_bytes() == best


def test_ctrl_c_prints_how_to_resume(tmp_path, dataset, capsys, monkeypatch):
    real_epoch = training._Steps.epoch

    def stop_in_epoch_2(*args, **kwargs):
        if args[-1] == 1:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training._Steps, "epoch", stop_in_epoch_2)
    run = tmp_path / "run"
    assert _train(dataset, run, "--size", "32", "--epochs", "3") == 130
    err = capsys.readouterr().err
    assert "interrupted after 1 completed epoch of 3" in err
    assert f"unetpp-fast train --resume {run / 'last.pth'} --epochs 3" in err
    assert (run / "history.png").is_file() and len(json.loads((run / "history.json").read_text())) == 1


def test_headers_and_masks_without_an_image(tmp_path, dataset, capsys):
    io.imsave(str(dataset / "masks" / "orphan.png"), np.zeros((48, 48), np.uint8), check_contrast=False)
    run = tmp_path / "run"
    assert _train(dataset, run, "--size", "32") == 0
    out = capsys.readouterr().out
    for key in ("unetpp-fast train", "model", "UNet++ 4,8,16", "parameters", "device", "images", "output"):
        assert key in out, key
    assert "6 train + 2 validation" in out
    assert "warning: 1 mask without an image, left out: orphan.png" in out
    assert cli.main(["eval", str(run), "--rounds", "2", "--threads", "1", "--samples", "0"]) == 0
    out = capsys.readouterr().out
    assert "unetpp-fast eval" in out and "checkpoint" in out and "2 validation images" in out
    assert "orphan.png" in out and "ms/image (quartiles " in out


def test_crop_training_predicts_at_native_resolution(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    assert _train(dataset, run, "--crop", "32") == 0
    assert "random 32x32 crops at native resolution" in capsys.readouterr().out
    assert training.read_checkpoint(str(run / "best.pth"))["data"]["crop"] == 32
    assert cli.main(["eval", str(run), "--rounds", "1", "--threads", "1", "--samples", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["native"] and report["modes"][-1]["timed_size"] == [48, 48]
    images = dataset / "images"
    out = tmp_path / "masks"
    argv = ["predict", str(run), str(images), "--out", str(out), "--threads", "1", "--no-progress"]
    assert cli.main(argv + ["--save-probabilities", "--overlay"]) == 0
    assert "native resolution" in capsys.readouterr().out
    name = sorted(os.listdir(images))[0][:-4]
    mask = io.imread(str(out / f"{name}.png"))
    prob = np.load(out / f"{name}_prob.npy")
    assert mask.shape == prob.shape == (48, 48) and prob.dtype == np.float32
    assert np.array_equal(mask == 255, prob > 0.5)
    assert io.imread(str(out / f"{name}_overlay.png")).shape == (48, 48, 3)
    # --threshold moves the cut; tiff and 16-bit png probabilities hold the same numbers
    argv2 = [
        "predict",
        str(run),
        str(images),
        "--out",
        str(tmp_path / "t"),
        "--threads",
        "1",
        "--no-progress",
    ]
    assert cli.main(argv2 + ["--threshold", "0", "--save-probabilities", "tiff"]) == 0
    assert (io.imread(str(tmp_path / "t" / f"{name}.png")) == 255).all()
    assert np.allclose(io.imread(str(tmp_path / "t" / f"{name}_prob.tif")), prob, atol=1e-6)
    assert cli.main(argv2 + ["--save-probabilities", "png", "--tile", "32"]) == 0  # tiled: 4 windows
    tiled = io.imread(str(tmp_path / "t" / f"{name}_prob.png")).astype(np.float64) / 65535
    assert tiled.shape == (48, 48) and np.abs(tiled - prob).mean() < 0.1


def test_predict_skips_unreadable_images_on_request(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    assert _train(dataset, run, "--size", "32") == 0
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in sorted(os.listdir(dataset / "images"))[:2]:
        (folder / name).write_bytes((dataset / "images" / name).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    capsys.readouterr()
    argv = ["predict", str(run), str(folder), "--out", str(tmp_path / "m"), "--threads", "1"]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "broken.png" in capsys.readouterr().err
    assert cli.main(argv + ["--skip-unreadable"]) == 0
    out = capsys.readouterr().out
    assert "skipped:" in out and "wrote 2 masks" in out and "skipped 1 unreadable image" in out
    assert sorted(os.listdir(tmp_path / "m")) == sorted(os.listdir(dataset / "images"))[:2]
    # masks written into the input folder would replace the images
    assert cli.main(["predict", str(run), str(folder), "--out", str(folder), "--skip-unreadable"]) == 2
    assert "would overwrite the input image" in capsys.readouterr().err


def test_native_and_resized_prediction_differ_only_in_scale(tmp_path, dataset):
    from unetpp_fast.train.inference import predict_image

    run = tmp_path / "run"
    assert _train(dataset, run, "--size", "32") == 0
    model, _ = training.load_trained(str(run / "best.pth"))
    image = io.imread(str(sorted((dataset / "images").iterdir())[0]))[:, :, :3]
    native = predict_image(model, image, torch.device("cpu"), "native")
    resized = predict_image(model, image, torch.device("cpu"), "resized", size=32)
    assert native.shape == resized.shape == (48, 48)
    assert not np.allclose(native, resized)
    same_size = predict_image(model, image[:32, :32], torch.device("cpu"), "resized", size=32)
    assert np.allclose(
        same_size, predict_image(model, image[:32, :32], torch.device("cpu"), "native"), atol=1e-5
    )


def test_eval_and_predict_show_progress_on_a_terminal(tmp_path, dataset, capsys, monkeypatch):
    from unetpp_fast.cli import options

    run = tmp_path / "run"
    assert _train(dataset, run, "--size", "32") == 0
    monkeypatch.setattr(options.sys.stderr, "isatty", lambda: True, raising=False)
    argv = ["eval", str(run), "--rounds", "2", "--threads", "1", "--samples", "0"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "scoring" in err and "image" in err and "timing" in err
    assert cli.main(["predict", str(run), str(dataset / "images"), "--out", str(tmp_path / "m")]) == 0
    assert "predicting" in capsys.readouterr().err
    assert cli.main(argv + ["--no-progress"]) == 0
    assert "scoring" not in capsys.readouterr().err
