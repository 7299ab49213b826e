"""Which backend runs a call (issue 13, items 3, 4 and 10): declared capabilities, `auto` falling back,
forced backends refusing clearly, the forward's backend running the backward, depth-5 UNet++ on
every backend, and the process-wide setting seen by worker threads."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
import torch.nn.functional as F

import unetpp_fast
from unetpp_fast.nn.unetpp import UNetPlusPlus
from unetpp_fast.ops import backends
from unetpp_fast.ops import fused_op as fused_op_module
from unetpp_fast.ops.reference import apply_resample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cpu_backends() -> list[str]:
    return [n for n in ("reference", "cpu", "triton") if n in backends.available_backends("cpu")]


@pytest.fixture
def record_backends(monkeypatch):
    """The backend names whose implementations are fetched, in order (forward, then backward)."""
    calls: list[str] = []
    original = backends.get_impl

    def spy(name):
        calls.append(name)
        return original(name)

    monkeypatch.setattr(fused_op_module.backends, "get_impl", spy)
    return calls


# --- item 3: dtypes a backend cannot compute ---------------------------------------------------------


def test_triton_refuses_float64_naming_the_supported_dtypes():
    x, w = torch.randn(1, 3, 6, 6, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    with pytest.raises(
        TypeError, match=r"'triton' supports the dtypes float16, bfloat16, float32, got torch.float64"
    ):
        unetpp_fast.fused_conv([x], w, backend="triton")
    with unetpp_fast.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        unetpp_fast.fused_conv([x], w)


def test_capabilities_are_declared_without_loading_a_backend():
    assert torch.float64 not in backends.capabilities("triton").dtypes
    assert torch.float64 not in backends.capabilities("cuda").dtypes
    assert torch.float64 in backends.capabilities("reference").dtypes
    assert backends.capabilities("reference").max_pieces is None


def test_auto_skips_a_backend_that_cannot_take_the_dtype(monkeypatch):
    # Pretend the triton backend came first for CPU tensors: fp64 must still land on a backend
    # that computes fp64, and fp32 must go to triton; more pieces than cpu takes go to reference.
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("triton", "cpu", "reference"))
    monkeypatch.setattr(backends, "why_unusable", lambda name, device: "")
    assert backends.resolve_name("cpu", "auto", dtype=torch.float64, num_pieces=2) in ("cpu", "reference")
    assert backends.resolve_name("cpu", "auto", dtype=torch.float32, num_pieces=2) == "triton"
    assert backends.resolve_name("cpu", "auto", dtype=torch.float64, num_pieces=9) == "reference"


def test_auto_falls_back_when_too_many_pieces():
    name = backends.resolve_name("cpu", "auto", dtype=torch.float32, num_pieces=9)
    assert name == "reference"  # cpu takes at most 8 pieces
    with pytest.raises(ValueError, match="'cpu' takes at most 8 pieces, got 9"):
        backends.resolve_name("cpu", "cpu", dtype=torch.float32, num_pieces=9)


# --- item 4: the backend of the forward runs the backward ---------------------------------------


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_backward_runs_on_the_forward_backend(name, record_backends):
    if name not in backends.available_backends("cpu"):
        pytest.skip(f"{name} unavailable")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    with unetpp_fast.use_backend(name):
        y = unetpp_fast.fused_conv([x], w)
    y.sum().backward()  # outside the block: auto would pick another backend
    assert record_backends == [name, name]
    record_backends.clear()
    y = unetpp_fast.fused_conv([x], w, backend=name)
    y.sum().backward()
    assert record_backends == [name, name]


def test_nine_pieces_forced_to_reference_differentiate_on_reference(record_backends):
    torch.manual_seed(1)
    pieces = [torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(9)]
    w = torch.randn(2, 9, 3, 3, dtype=torch.float64, requires_grad=True)
    y = unetpp_fast.fused_conv(pieces, w, backend="reference", activation="none")
    grads = torch.autograd.grad(y.square().sum(), [*pieces, w])
    assert set(record_backends) == {"reference"}
    expected = F.conv2d(torch.cat(pieces, 1), w, padding=1)
    want = torch.autograd.grad(expected.square().sum(), [*pieces, w])
    assert all(rel_err(g, e) < 1e-12 for g, e in zip(grads, want))


# Six pieces (node X[0,5] of a depth-5 UNet++), every mode, forward and backward, per backend.
SIX_MODES = ["none", "none", "up_bilinear_ac", "maxpool2", "up_nearest", "up_bilinear"]


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_six_pieces_forward_and_backward(name):
    if name not in backends.available_backends("cpu"):
        pytest.skip(f"{name} unavailable on CPU tensors here")
    torch.manual_seed(2)
    size = 4
    shapes = {"none": size, "up_bilinear_ac": size // 2, "up_nearest": size // 2, "up_bilinear": size // 2}
    pieces = [
        torch.randn(
            1, 2, 2 * size if m == "maxpool2" else shapes[m], 2 * size if m == "maxpool2" else shapes[m]
        ).requires_grad_()
        for m in SIX_MODES
    ]
    w = torch.randn(3, 12, 3, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    out = unetpp_fast.fused_conv(pieces, w, b, resample=SIX_MODES, backend=name)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [*pieces, w, b], grad)
    p64 = [p.detach().double().requires_grad_() for p in pieces]
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    codes = [unetpp_fast.ops.conv_spec.resample_code(m) for m in SIX_MODES]
    virtual = torch.cat([apply_resample(p, c) for p, c in zip(p64, codes)], 1)
    expected = F.relu(F.conv2d(virtual, w64, b64, padding=1))
    want = torch.autograd.grad(expected, [*p64, w64, b64], grad.double())
    assert rel_err(out, expected) < 1e-5
    assert all(rel_err(g, e) < 1e-5 for g, e in zip(got, want))


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_depth5_unetpp_trains_and_evaluates(name):
    if name not in backends.available_backends("cpu"):
        pytest.skip(f"{name} unavailable")
    torch.manual_seed(3)
    model = UNetPlusPlus(1, 1, (1, 2, 2, 2, 2, 2))
    x = torch.randn(2, 1, 32, 32)  # batch 2: BatchNorm needs two values per channel at 1x1
    with unetpp_fast.use_backend(name):
        outputs = model(x)
        assert len(outputs) == 5
        sum(o.sum() for o in outputs).backward()
        model.eval()
        with torch.no_grad():
            got = model(x)
    with unetpp_fast.use_backend("reference"), torch.no_grad():
        assert rel_err(got, model(x)) < 1e-5
    assert all(p.grad is not None for p in model.parameters())


# --- item 10: the process-wide setting ----------------------------------------------------------


def test_set_backend_reaches_worker_threads(record_backends):
    x, w = torch.randn(1, 3, 6, 6), torch.randn(2, 3, 3, 3)
    try:
        backends.set_backend("reference")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            names = list(pool.map(lambda _: backends.requested_backend(), range(2)))
            pool.submit(unetpp_fast.fused_conv, [x], w).result()
        assert names == ["reference", "reference"]
        assert record_backends == ["reference"]
        with unetpp_fast.use_backend("auto"):  # the context manager still wins in its thread
            assert backends.requested_backend() == "auto"
    finally:
        backends.set_backend(None)
    assert backends.get_backend() is None


def test_use_backend_is_per_thread_as_documented():
    with unetpp_fast.use_backend("reference"):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            seen = pool.submit(backends.requested_backend).result()
    assert seen == "auto"  # contextvars do not travel to pool threads: use set_backend for them


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.set_backend("gpu")


# --- issue 11: which backend ran how many calls ----------------------------------------------


def test_count_calls_counts_forward_calls_per_backend_in_this_thread_only():
    x, w = torch.randn(1, 3, 6, 6), torch.randn(2, 3, 3, 3)
    with backends.count_calls() as outer:
        unetpp_fast.fused_conv([x], w, backend="reference")
        with backends.count_calls() as inner:
            unetpp_fast.fused_conv([x], w, backend="reference")
            unetpp_fast.fused_conv([x], w, backend="cpu")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # another thread: not counted
            pool.submit(unetpp_fast.fused_conv, [x], w, backend="reference").result()
        xg = x.clone().requires_grad_()
        unetpp_fast.fused_conv([xg], w, backend="reference").sum().backward()  # backward: not counted
    unetpp_fast.fused_conv([x], w, backend="reference")  # after the block: not counted
    assert inner == {"reference": 1, "cpu": 1}
    assert outer == {"reference": 3, "cpu": 1}
    assert backends._COUNTERS.stack == []
