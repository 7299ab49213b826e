"""3D training under torchrun: 2 gloo processes with GlobalBatchNorm3d equal one process, step by step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from unetpp_fast.nn.unetpp import UNetPlusPlus
from unetpp_fast.train import distributed, training
from unetpp_fast.train.synthetic_volumes import write_synthetic_volumes

FILTERS = (4, 8, 16)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sync_batchnorm_conversion_covers_3d_models():
    model = UNetPlusPlus(1, 1, FILTERS, spatial_dims=3)
    weights = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    converted = distributed.convert_sync_batchnorm(model, torch.device("cpu"))
    norms = [m for m in converted.modules() if isinstance(m, nn.BatchNorm3d)]
    assert norms and all(isinstance(m, distributed.GlobalBatchNorm3d) for m in norms)
    assert list(converted.state_dict()) == keys  # same names: a checkpoint loads into a plain model
    assert all(p is weights[name] for name, p in converted.named_parameters())
    x = torch.randn(2, 1, 8, 8, 8)
    # outside a process group it is plain BatchNorm3d (training statistics of this batch)
    plain = UNetPlusPlus(1, 1, FILTERS, spatial_dims=3)
    plain.load_state_dict(converted.state_dict())
    torch.testing.assert_close(converted.train()(x)[-1], plain.train()(x)[-1])


def test_two_gloo_processes_train_3d_like_one_process(tmp_path):
    root = tmp_path / "vol"
    write_synthetic_volumes(str(root), count=6, size=16, seed=4, empty=0.2)
    settings = dict(filters=FILTERS, crop=16, batch_size=4, patches_per_volume=2, epochs=1, dims=3)
    single = training.train(
        training.TrainConfig(
            data=str(root), out_dir=str(tmp_path / "one"), device="cpu", progress=False, **settings
        ),
        log=lambda message: None,
    )
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "unetpp_fast", "train", "--data", str(root), "--out", str(out), "--dims", "3"]
    command += ["--filters", "4,8,16", "--crop", "16", "--batch-size", "4", "--patches-per-volume", "2"]
    command += ["--epochs", "1", "--threads", "1", "--sync-bn", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("UNETPP_FAST_DEBUG", None)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "2 processes (DDP, 2 images each, SyncBatchNorm)" in done.stdout
    one = training.read_checkpoint(single.last_path)
    two = training.read_checkpoint(str(out / training.LAST_NAME))
    steps_one, steps_two = one["history"][0]["step_losses"], two["history"][0]["step_losses"]
    assert len(steps_two) == len(steps_one) == 3  # 5 training volumes x 2 patches, global batch 4
    # BatchNorm statistics over the global batch (GlobalBatchNorm3d), the same patches on each rank
    assert steps_two[0] == pytest.approx(steps_one[0], rel=1e-5)
    assert steps_two == pytest.approx(steps_one, rel=1e-3)
    assert two["model"]["spatial_dims"] == 3
