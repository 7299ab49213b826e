"""CUDA-graph inference: the capture helper (CPU stand-in), no host syncs in the op path, GPU parity."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import unetpp_fast
from unetpp_fast.nn.cuda_graph import CapturedInference, capture_inference
from unetpp_fast.ops.testing import relative_error

FILTERS = (4, 8, 16, 32, 64)


class _ReplayingStandIn:
    """Replays by re-running the captured function and writing into the captured output's storage,
    which is what a CUDA graph does to its output buffer."""

    def __init__(self) -> None:
        self.warmups = 0
        self.captures = 0
        self.replays = 0

    def warm_up(self, run, times):
        for _ in range(times):
            self.warmups += 1
            run()

    def capture(self, run):
        self.captures += 1
        self._run = run
        self._out = run()
        return self._out

    def replay(self):
        self.replays += 1
        self._out.copy_(self._run())


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return unetpp_fast.UNetPlusPlus(3, 1, FILTERS).eval()


def test_replay_computes_the_model_on_each_new_input():
    model, graph = _model(), _ReplayingStandIn()
    captured = CapturedInference(model, torch.randn(2, 3, 32, 32), warmup=2, graph=graph)
    assert (graph.warmups, graph.captures, graph.replays) == (2, 1, 0)
    for seed in (1, 2):
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        out = captured(x)
        with torch.no_grad():
            expected = model(x)
        assert relative_error(out, expected) < 1e-6
    assert graph.replays == 2


def test_the_output_buffer_is_reused():
    captured = CapturedInference(_model(), torch.randn(1, 3, 32, 32), graph=_ReplayingStandIn())
    first = captured(torch.randn(1, 3, 32, 32))
    second = captured(torch.randn(1, 3, 32, 32))
    assert first.data_ptr() == second.data_ptr()


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(1, 3, 64, 64), r"shape \(2, 3, 32, 32\)"),
        (torch.randn(2, 3, 32, 32, dtype=torch.float64), "torch.float32"),
        ("image", "x must be a tensor"),
    ],
)
def test_inputs_that_do_not_match_the_capture_are_refused(x, message):
    captured = CapturedInference(_model(), torch.randn(2, 3, 32, 32), graph=_ReplayingStandIn())
    with pytest.raises((ValueError, TypeError), match=message):
        captured(x)


def test_bad_capture_arguments_are_refused():
    example = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="training mode"):
        capture_inference(_model().train(), example)
    with pytest.raises(ValueError, match="CUDA tensor"):
        capture_inference(_model(), example)
    with pytest.raises(ValueError, match="warmup"):
        CapturedInference(_model(), example, warmup=0, graph=_ReplayingStandIn())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        capture_inference(lambda x: x, example)


class _HostSyncRecorder(TorchDispatchMode):
    """Records the ATen calls that make the host wait for the device (`.item()`, `bool(tensor)`, ...)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.syncs.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_the_recorder_sees_a_host_sync():
    with _HostSyncRecorder() as recorder:
        torch.randn(3).sum().item()
    assert recorder.syncs == ["aten::_local_scalar_dense"]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_host_sync_in_the_fused_forward(backend):
    # A CUDA graph cannot capture a host sync; the op path must not need one on any backend.
    if backend not in unetpp_fast.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not available here")
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    with unetpp_fast.use_backend(backend), torch.no_grad():
        model(x)  # first call: lazy initialisation is allowed to do anything
        with _HostSyncRecorder() as recorder:
            model(x)
    assert recorder.syncs == []


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_model_matches_eager_on_gpu(dtype):
    model = _model().cuda().to(dtype).to(memory_format=torch.channels_last)
    example = torch.randn(4, 3, 64, 64, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    fast = capture_inference(model, example)
    x = torch.randn_like(example)
    out = fast(x).clone()
    with torch.no_grad():
        expected = model(x)
    assert relative_error(out.float(), expected.float()) < (1e-5 if dtype == torch.float32 else 1e-2)
