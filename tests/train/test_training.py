"""Training: a short run on DSB2018 learns; checkpoints resume exactly; early stopping; checkpoint errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from unetpp_fast.train import data, training
from unetpp_fast.train.synthetic_data import write_synthetic_dataset

DSB_ROOT = Path(
    os.environ.get("UNETPP_FAST_DSB2018", Path(__file__).resolve().parents[2].parent / "shared/data/dsb2018")
)


def _real_96() -> Path:
    path = DSB_ROOT / "96x96"
    if not (path / "images").is_dir():
        pytest.skip(f"DSB2018 data not found at {path} (set UNETPP_FAST_DSB2018 to the dsb2018 folder)")
    return path


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(autouse=True)
def one_thread():
    """One PyTorch thread: on a CPU shared with other jobs, OpenMP barriers across threads stall badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _synthetic(tmp_path: Path, n: int = 12) -> str:
    root = tmp_path / "synthetic"
    write_synthetic_dataset(str(root), n=n, size=32, seed=1)
    return str(root)


def _tiny_config(data_root: str, out_dir: Path, **kw) -> training.TrainConfig:
    defaults = dict(
        data=data_root,
        out_dir=str(out_dir),
        filters=(4, 8, 16),
        size=32,
        epochs=2,
        batch_size=4,
        lr=1e-3,
        device="cpu",
        progress=False,
        val_fraction=0.25,
    )
    defaults.update(kw)
    return training.TrainConfig(**defaults)


def test_short_dsb2018_training_learns(tmp_path):
    """64 DSB2018 images, 3 epochs of a small UNet++: the loss falls and the IoU is far above chance."""
    config = training.TrainConfig(
        data=str(_real_96()),
        out_dir=str(tmp_path / "run"),
        filters=(8, 16, 32, 64),
        epochs=3,
        batch_size=4,
        lr=1e-3,
        limit=64,
        device="cpu",
        progress=False,
    )
    result = training.train(config, log=_quiet)
    history = result.history
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.05
    # all-foreground scores about 0.14 and all-background 0 on these images
    assert result.best_iou > 0.3, history
    checkpoint = training.read_checkpoint(result.best_path)
    assert checkpoint["best_iou"] == pytest.approx(result.best_iou)
    assert checkpoint["model"]["filters"] == [8, 16, 32, 64]
    assert len(checkpoint["data"]["val_ids"]) == 13 and checkpoint["config"]["lr"] == 1e-3
    assert os.path.isfile(os.path.join(config.out_dir, training.HISTORY_NAME))


def test_resume_continues_exactly(tmp_path):
    root = _synthetic(tmp_path)
    straight = training.train(_tiny_config(root, tmp_path / "a", epochs=2), log=_quiet)
    training.train(_tiny_config(root, tmp_path / "b", epochs=1), log=_quiet)
    resumed = training.train(
        _tiny_config("", tmp_path / "b", epochs=2),
        resume=str(tmp_path / "b" / training.LAST_NAME),
        log=_quiet,
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for key in ("train_loss", "val_loss", "val_iou"):
        assert resumed.history[-1][key] == pytest.approx(straight.history[-1][key], rel=1e-5, abs=1e-6)
    a = training.read_checkpoint(str(tmp_path / "a" / training.LAST_NAME))
    b = training.read_checkpoint(str(tmp_path / "b" / training.LAST_NAME))
    for name, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][name].float(), rtol=1e-5, atol=1e-6), name
    assert a["epoch"] == b["epoch"] == 2


def test_resume_takes_the_model_from_the_checkpoint(tmp_path):
    root = _synthetic(tmp_path)
    training.train(_tiny_config(root, tmp_path / "run", epochs=1), log=_quiet)
    # other filters on the command line do not change a resumed model
    resumed = training.train(
        _tiny_config("", tmp_path / "run", epochs=1, filters=(8, 16, 32)),
        resume=str(tmp_path / "run"),
        log=_quiet,
    )
    assert resumed.epochs_run == 1  # already at the requested total: nothing more to do
    model, payload = training.load_trained(str(tmp_path / "run" / training.LAST_NAME))
    assert payload["model"]["filters"] == [4, 8, 16] and not model.training


def test_early_stopping(tmp_path):
    root = _synthetic(tmp_path)
    # a learning rate too small to change the IoU: no epoch after the first improves on it
    result = training.train(_tiny_config(root, tmp_path / "run", epochs=6, patience=2, lr=1e-12), log=_quiet)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1


def test_unet_and_no_deep_supervision_train(tmp_path):
    root = _synthetic(tmp_path, n=8)
    for arch, ds in (("unet", True), ("unetpp", False)):
        result = training.train(
            _tiny_config(root, tmp_path / arch, epochs=1, arch=arch, deep_supervision=ds), log=_quiet
        )
        model, _ = training.load_trained(result.best_path)
        assert type(model).__name__ == ("UNet" if arch == "unet" else "UNetPlusPlus")


def test_checkpoint_errors(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"weight": torch.zeros(1)}, plain)
    with pytest.raises(training.CheckpointError, match="not an unetpp-fast training checkpoint"):
        training.read_checkpoint(str(plain))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(training.CheckpointError, match="cannot read checkpoint"):
        training.read_checkpoint(str(garbage))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        training.read_checkpoint(str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="holds neither"):
        training.read_checkpoint(str(tmp_path))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        training.TrainConfig(data="x", size=40)
    with pytest.raises(ValueError, match="arch"):
        training.TrainConfig(data="x", arch="resnet")
    with pytest.raises(data.DatasetError, match="does not exist"):
        training.train(_tiny_config(str(tmp_path / "nope"), tmp_path / "run"), log=_quiet)
