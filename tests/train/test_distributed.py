"""Multi-process training: torchrun with 2 gloo processes on the CPU equals one process; DDP pieces.

The end-to-end test launches `python -m torch.distributed.run --standalone --nproc_per_node=2 -m
unetpp_fast train ...` twice (one epoch, then a resume to two) and compares every step's loss with a
single-process run on the same global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from unetpp_fast.nn.unetpp import UNetPlusPlus
from unetpp_fast.train import data, distributed, training
from unetpp_fast.train.synthetic_data import write_synthetic_dataset

DSB_ROOT = Path(
    os.environ.get("UNETPP_FAST_DSB2018", Path(__file__).resolve().parents[2].parent / "shared/data/dsb2018")
)
FILTERS = (8, 16, 32, 64)


def _real_96() -> Path:
    path = DSB_ROOT / "96x96"
    if not (path / "images").is_dir():
        pytest.skip(f"DSB2018 data not found at {path} (set UNETPP_FAST_DSB2018 to the dsb2018 folder)")
    return path


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "unetpp_fast", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("UNETPP_FAST_DEBUG", None)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done


def test_two_gloo_processes_equal_one_process_and_resume(tmp_path):
    """Same first-step loss (and every later one) as one process with the same global batch; resume."""
    root = str(_real_96())
    common = ["--limit", "32", "--filters", ",".join(map(str, FILTERS)), "--batch-size", "8"]
    # --sync-bn: BatchNorm statistics over the global batch, as in one process; --channels-last puts
    # the fused op's channels_last gradients through DDP's bucket views.
    common += ["--threads", "1", "--sync-bn", "--channels-last", "--no-progress", "--device", "cpu"]
    single = training.train(
        training.TrainConfig(
            data=root,
            out_dir=str(tmp_path / "one"),
            filters=FILTERS,
            limit=32,
            epochs=2,
            batch_size=8,
            channels_last=True,
            device="cpu",
            progress=False,
        ),
        log=lambda message: None,
    )
    one = training.read_checkpoint(single.last_path)

    out = tmp_path / "two"
    first = _torchrun("--data", root, "--epochs", "1", "--out", str(out), *common, cwd=tmp_path)
    # one set of run files, written by rank 0 alone, and one voice in the log
    assert sorted(os.listdir(out)) == sorted(training.RUN_FILES)
    assert first.stdout.count("epoch 1/1") == 1 and first.stdout.count("best validation IoU") == 1
    assert "2 processes (DDP, 4 images each, SyncBatchNorm)" in first.stdout
    assert "Grad strides do not match" not in first.stderr  # DDP's gradient layout contract holds
    two = training.read_checkpoint(str(out / training.LAST_NAME))
    assert (
        two["data"]["val_ids"] == one["data"]["val_ids"]
        and two["data"]["train_ids"] == one["data"]["train_ids"]
    )
    steps_one, steps_two = one["history"][0]["step_losses"], two["history"][0]["step_losses"]
    assert len(steps_two) == len(steps_one) == 4  # 26 training images, global batch 8
    assert two["history"][0]["processes"] == 2
    assert steps_two[0] == pytest.approx(steps_one[0], rel=1e-5)
    assert steps_two == pytest.approx(steps_one, rel=1e-3)

    resumed = _torchrun("--resume", str(out / training.LAST_NAME), "--epochs", "2", *common, cwd=tmp_path)
    assert resumed.stdout.count("resumed from") == 1 and "epoch 2/2" in resumed.stdout
    assert sorted(os.listdir(out)) == sorted(training.RUN_FILES)
    two = training.read_checkpoint(str(out / training.LAST_NAME))
    assert [h["epoch"] for h in two["history"]] == [1, 2] and two["epoch"] == 2
    assert two["history"][1]["step_losses"] == pytest.approx(one["history"][1]["step_losses"], rel=1e-3)
    assert two["history"][1]["val_loss"] == pytest.approx(one["history"][1]["val_loss"], rel=1e-3)
    model, _ = training.load_trained(str(out / training.BEST_NAME))  # a plain model, as from one process
    assert not any(isinstance(m, distributed.GlobalBatchNorm2d) for m in model.modules())


# ----------------------------------------------------------------------------------------------
# the pieces, in one process


def test_global_batch_is_split_evenly():
    assert distributed.local_batch_size(16, 1) == 16 and distributed.local_batch_size(16, 4) == 4
    with pytest.raises(ValueError, match="--batch-size 6 is the global batch and must be divisible by the 4"):
        distributed.local_batch_size(6, 4)


def test_an_uneven_global_batch_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from unetpp_fast import cli

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 sets it, before any group
    argv = [
        "train",
        "--data",
        str(tmp_path),
        "--batch-size",
        "7",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "r"),
    ]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size 7 is the global batch and must be divisible by the 2" in err


def test_torchrun_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.env_ranks() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.env_ranks() is None  # torchrun with one process: plain training
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.env_ranks() == (3, 4, 1)
    assert distributed.rank_device(torch.device("cpu"), 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="each process uses cuda:LOCAL_RANK; pass --device cuda"):
        distributed.rank_device(torch.device("cuda", 1), 1)


def test_rank_shards_make_up_the_single_process_batches(tmp_path):
    """The ranks' k-th batches together = the k-th batch of one process, augmented alike."""
    root = tmp_path / "synthetic"
    write_synthetic_dataset(str(root), n=12, size=16, seed=1)
    dataset = data.load_dataset(str(root), size=16)
    samples = data.TrainSamples(dataset, seed=5, augment=True, batch_size=6)

    def batches(batch_size, rank, world, epoch):
        loader = data.train_loader(samples, batch_size, seed=5, rank=rank, world_size=world)
        samples.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        return list(loader)

    for epoch in (0, 3):
        whole = batches(6, 0, 1, epoch)
        shards = [batches(3, rank, 2, epoch) for rank in (0, 1)]
        assert len(whole) == len(shards[0]) == len(shards[1]) == 2
        for k, (images, masks) in enumerate(whole):
            parts = torch.cat([shards[0][k][0], shards[1][k][0]])
            # same images as a multiset: sort the flattened rows of both
            key = lambda t: sorted(t.flatten(1).tolist())  # noqa: E731
            assert key(parts) == key(images)
            assert masks.dtype == torch.bool and masks.shape == (6, 1, 16, 16)
    # the order and the augmentation of one process follow (seed, epoch) as before
    assert not torch.equal(batches(6, 0, 1, 0)[0][0], batches(6, 0, 1, 1)[0][0])


def test_one_process_loader_gives_exactly_the_batches_of_iterate_batches(tmp_path):
    """The DataLoader path keeps the single-process batches (order, crops, symmetries) bit for bit."""
    root = tmp_path / "synthetic"
    write_synthetic_dataset(str(root), n=10, size=32, seed=2)
    resized = data.load_dataset(str(root), size=16)
    native = data.load_dataset(str(root), native=True)
    native.images[0], native.masks[0] = native.images[0][:, :12, :20], native.masks[0][:, :12, :20]  # padded
    for dataset, crop in ((resized, None), (native, 16)):
        samples = data.TrainSamples(dataset, seed=3, augment=True, batch_size=4, crop=crop)
        loader = data.train_loader(samples, 4, seed=3)
        for epoch in (0, 2):
            samples.set_epoch(epoch)
            loader.sampler.set_epoch(epoch)
            got = list(loader)
            want = list(
                data.iterate_batches(dataset, 4, shuffle=True, augment=True, seed=3, epoch=epoch, crop=crop)
            )
            assert [g[0].shape[0] for g in got] == [w[0].shape[0] for w in want] == [4, 4, 2]
            for (images, masks), (want_images, want_masks) in zip(got, want):
                assert torch.equal(images, want_images) and torch.equal(masks, want_masks)
    with pytest.raises(ValueError, match="do not make the global batch 4"):
        data.train_loader(samples, 4, seed=3, world_size=2)


class _WithSpareHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = UNetPlusPlus(3, 1, (4, 8, 16), deep_supervision=False)
        self.spare = nn.Conv2d(4, 1, 1)  # a head the loss never sees

    def forward(self, x):
        return self.net(x)


def test_no_parameter_is_unused_with_or_without_deep_supervision():
    x = torch.randn(2, 3, 16, 16)
    for deep in (True, False):
        model = UNetPlusPlus(3, 1, (4, 8, 16), deep_supervision=deep)
        assert distributed.unused_parameters(model, x) == []
        # the probe ran on a copy: the BatchNorm statistics are untouched
        assert int(model.conv0_0.bn1.num_batches_tracked) == 0

    assert distributed.unused_parameters(_WithSpareHead(), x) == ["spare.weight", "spare.bias"]


def test_sync_batchnorm_conversion_keeps_parameters_and_eval_folding():
    model = UNetPlusPlus(3, 1, (4, 8, 16)).to(memory_format=torch.channels_last)
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    model.train()(x)  # some running statistics
    expected = model.eval()(x)
    converted = distributed.convert_sync_batchnorm(model, torch.device("cpu"))
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert sum(isinstance(m, distributed.GlobalBatchNorm2d) for m in converted.modules()) == 2 * 6
    assert list(converted.state_dict()) == keys
    assert all(p is params[name] for name, p in converted.named_parameters())
    torch.testing.assert_close(converted.eval()(x), expected)  # folded in eval, as before


def test_ddp_on_one_gloo_rank_matches_plain_training(tmp_path):
    """DDP (bucket views, static graph) with channels_last weights: same gradients, no layout warning."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = UNetPlusPlus(3, 1, (4, 8, 16)).to(memory_format=torch.channels_last)
        torch.manual_seed(0)
        model = UNetPlusPlus(3, 1, (4, 8, 16)).to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        ctx = distributed.DistContext(0, 1, 0, "gloo", owns_group=False)
        ddp, chosen = distributed.wrap(model, ctx, torch.device("cpu"), x, sync_bn=True)
        assert chosen["static_graph"] and chosen["gradient_as_bucket_view"]
        assert not chosen["find_unused_parameters"] and chosen["unused_parameters"] == []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "Grad strides do not match bucket view strides" included
            for _ in range(2):  # the static graph is recorded on the first step
                ddp.zero_grad(set_to_none=False)
                sum(o.sum() for o in ddp(x)).backward()
        plain.zero_grad()
        sum(o.sum() for o in plain(x)).backward()
        plain.zero_grad()
        sum(o.sum() for o in plain(x)).backward()
        for (name, p), q in zip(plain.named_parameters(), ddp.module.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
        # a model with a parameter no step uses: the static graph records it and steps go on
        # (the default reducer would stop at the second step, waiting for that gradient)
        spare = _WithSpareHead()
        ddp, chosen = distributed.wrap(spare, ctx, torch.device("cpu"), x)
        assert chosen["unused_parameters"] == ["spare.weight", "spare.bias"] and chosen["static_graph"]
        for _ in range(3):
            ddp.zero_grad(set_to_none=False)
            ddp(x).sum().backward()
    finally:
        dist.destroy_process_group()


def test_ddp_options():
    assert distributed.ddp_options([], compiled=False) == {
        "gradient_as_bucket_view": True,
        "static_graph": True,
        "find_unused_parameters": False,
    }
    assert distributed.ddp_options(["spare.weight"], compiled=False)["find_unused_parameters"] is False
    compiled = distributed.ddp_options(["spare.weight"], compiled=True)
    assert compiled["find_unused_parameters"] and not compiled["static_graph"]
    assert not distributed.ddp_options([], compiled=True)["find_unused_parameters"]
