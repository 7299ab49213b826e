"""Config lists per compute capability: Hopper tunes over its own forward tiles (wgmma keeps only the
accumulator in registers, so tiles that spill on sm_80 fit), as many as elsewhere (the compile count
does not grow), and the launcher asks for the list of the device it launches on."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from unetpp_fast.ops import conv_spec  # noqa: E402
from unetpp_fast.ops.triton import aot, configs, launch_common  # noqa: E402


def _tiles(listed) -> list[tuple]:
    return [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in listed]


@pytest.mark.parametrize("shape_class", configs.SHAPE_CLASSES)
def test_hopper_forward_lists_differ_and_keep_their_length(shape_class):
    ampere = configs.gpu_configs("forward", shape_class, arch=80)
    hopper = configs.gpu_configs("forward", shape_class, arch=90)
    assert len(hopper) == len(ampere)  # one config swapped per class: no extra compiles
    assert _tiles(hopper) != _tiles(ampere)
    assert _tiles(configs.gpu_configs("forward", shape_class, arch=86)) == _tiles(ampere)
    # Only Hopper's: a later architecture was never compiled with the Hopper tiles.
    assert _tiles(configs.gpu_configs("forward", shape_class, arch=100)) == _tiles(ampere)
    # Kernels without a Hopper list share one list.
    assert _tiles(configs.gpu_configs("weight_grad", shape_class, arch=90)) == _tiles(
        configs.gpu_configs("weight_grad", shape_class, arch=80)
    )


def test_a_bad_shape_class_is_a_clear_error():
    with pytest.raises(ValueError, match="shape class"):
        configs.gpu_configs("forward", "wide", arch=90)


def test_aot_compiles_each_arch_with_its_own_list():
    """aot.jobs pairs every config with the arch whose list holds it (the spill check of a Hopper
    tile runs on sm_90 only)."""
    forward = [(config, arch) for spec, _, config, arch in aot.jobs() if spec.name == "forward"]
    for arch in aot.ARCHS:
        listed = configs.all_gpu_configs("forward", arch=arch)
        expected = {(tuple(sorted(c.kwargs.items())), c.num_warps) for _, c in listed}
        found = {(tuple(sorted(c.kwargs.items())), c.num_warps) for c, a in forward if a == arch}
        assert found == expected, arch


class _ConfigRecorder:
    """A compiling runtime that runs nothing and records each compiled config."""

    name, runs_gpu_path_on_cpu = "config-recorder", True

    def __init__(self):
        self.configs = []

    def compile(self, kernel, args, constexprs, config):
        self.configs.append((tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages))
        return kernel

    def launch(self, compiled, grid, args):
        pass

    def bench(self, fn):
        return 1.0

    def device_name(self, device):
        return "config-recorder"


@pytest.mark.parametrize("arch", [80, 90])
def test_the_launcher_tunes_over_the_list_of_its_device(arch, tmp_path, monkeypatch):
    from unetpp_fast.ops.triton.fused_conv_forward import fused_conv_forward

    monkeypatch.setenv("UNETPP_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(launch_common, "device_arch", lambda device: arch)
    runtime = _ConfigRecorder()
    previous = launch_common.set_runtime(runtime)
    try:
        cl = torch.channels_last  # bf16 channels_last: the 16-byte vector kernel (`forward`)
        pieces = [torch.randn(2, 16, 8, 8).to(torch.bfloat16, memory_format=cl),
                  torch.randn(2, 16, 4, 4).to(torch.bfloat16, memory_format=cl)]  # fmt: skip
        weight = torch.randn(32, 32, 3, 3).to(torch.bfloat16, memory_format=cl)  # C_out 32: memory-bound
        fused_conv_forward(pieces, [conv_spec.NONE, conv_spec.UP_BILINEAR_AC], weight, None, "relu")
    finally:
        launch_common.set_runtime(previous)
    expected = _tiles(configs.gpu_configs("forward", "memory_bound", arch=arch))
    assert sorted(runtime.configs) == sorted(expected)


def test_device_arch_of_a_cpu_device_is_the_design_target():
    """A stubbed runtime on the CPU (benchmarks/host_path.py) tunes over the H200's lists."""
    assert launch_common.device_arch(torch.device("cpu")) == 90


def _forward_tiles() -> list[tuple[int, int, int]]:
    """Every distinct (BLOCK_M, BLOCK_N, BLOCK_K) a GPU may run the main forward with, any arch."""
    tiles = {
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
        for arch in aot.ARCHS
        for _, c in configs.all_gpu_configs("forward", arch=arch)
    }
    return sorted(tiles)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(("block_m", "block_n", "block_k"), _forward_tiles())
def test_every_gpu_forward_tile_matches_the_reference(block_m, block_n, block_k, k, monkeypatch):
    """The interpreter runs the forward with each tile the GPU lists hold (Hopper's included), over
    several M and N blocks and partial ones, against the fp64 reference: a tile-size-dependent
    indexing bug cannot hide behind the interpreter's own config."""
    from triton import Config

    from unetpp_fast.ops.testing import ConvCase, assert_matches_reference

    if not launch_common.interpreting():
        pytest.skip("the GPU autotunes over these tiles itself")
    tile = Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=4, num_stages=1)
    for name in ("forward", "forward_scalar"):  # the same kernel at VEC > 1 and VEC = 1
        monkeypatch.setitem(configs._INTERPRETER, name, tile)
    launched = []
    real_launch = launch_common.InterpreterRuntime.launch_interpreted

    def recording(self, kernel, grid, args, constexprs, config):
        launched.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), dict(config.kwargs)))
        return real_launch(self, kernel, grid, args, constexprs, config)

    monkeypatch.setattr(launch_common.InterpreterRuntime, "launch_interpreted", recording)
    launch_common.PLANS.clear()  # plans made under another tile
    try:
        case = ConvCase(
            batch=3,
            channels=[8, 16, 8],
            modes=["none", "up_bilinear_ac", "maxpool2"],
            out_hw=(10, 12),  # 360 pixels: two or more M blocks, the last partial
            c_out=40,  # two N32 blocks or one partial N64 / N128 block
            k=k,
            layout="channels_last",
            activation="relu",
            seed=block_m + block_n + k,
        )
        assert_matches_reference(case, "triton", "cpu")
    finally:
        launch_common.PLANS.clear()
    forward = [config for name, config in launched if "fused_conv_forward_kernel" in name]
    assert forward and all(config == tile.kwargs for config in forward), launched
