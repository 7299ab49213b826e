"""`unetpp-fast bench --dims 3` and the "which backend ran" column (2D and 3D)."""

from __future__ import annotations

import json

import pytest
import torch

from unetpp_fast import cli
from unetpp_fast.nn.unetpp import UNetPlusPlus


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _pruned_convs(level: int) -> int:
    """Convolutions of UNet++ pruned to `level`: 2 per node X[i,j] with i + j <= level, and its head."""
    return (level + 1) * (level + 2) + 1


def test_bench_3d_rows_say_which_backend_ran(tmp_path, capsys):
    rows_file = tmp_path / "bench3d.json"
    argv = ["bench", "--dims", "3", "--device", "cpu", "--size", "16", "--batch", "1", "--levels", "1,3"]
    argv += ["--filters", "4,8,16,32", "--warmup", "0", "--rounds", "1", "--train-step", "--threads", "1"]
    assert cli.main(argv + ["--plot", "", "--json", str(rows_file)]) == 0
    out = capsys.readouterr().out
    assert "16x16x16" in out and "| convolutions ran on |" in out and "fused (auto)" in out
    rows = json.loads(rows_file.read_text())["rows"]
    assert all(r["error"] is None and r["ms_per_batch"] > 0 and r["spatial_dims"] == 3 for r in rows)
    calls = {(r["model"], r["backend"]): r["backend_calls"] for r in rows}
    # auto picks per convolution for inference (the C++ backend or plain PyTorch, by measurement)
    for level in (1, 3):
        ran = calls[(f"UNet++ L{level}", "fused")]
        assert set(ran) <= {"cpu", "reference"} and sum(ran.values()) == _pruned_convs(level)
    assert calls[("UNet++ L3", "eager")] == {}  # plain PyTorch: no fused call at all
    # a training step of the full model: every node (i + j <= 3) and the 3 deep-supervision heads,
    # on the fused backend only (training never picks the reference: the memory promise)
    assert calls[("UNet++ train step", "fused")] == {"cpu": 2 * 10 + 3}
    assert {r["ran"] for r in rows if r["backend"] == "eager"} == {"none (plain PyTorch)"}
    # parameters of the 3D network (3x3x3 kernels, one input channel), not of the 2D one
    full = UNetPlusPlus(in_channels=1, filters=(4, 8, 16, 32), spatial_dims=3)
    assert {r["params_used"] for r in rows if r["model"] == "UNet++ L3"} == {
        sum(p.numel() for p in full.pruned(3).parameters())
    }


def test_bench_counts_the_backend_a_forced_run_used(capsys):
    argv = ["bench", "--device", "cpu", "--size", "16", "--batch", "1", "--levels", "2", "--no-unet"]
    argv += ["--filters", "4,8,16", "--warmup", "0", "--rounds", "1", "--threads", "1", "--plot", ""]
    assert cli.main(argv + ["--backends", "reference", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["backend_calls"] == {"reference": _pruned_convs(2)} and row["ran"] == "reference 13"
