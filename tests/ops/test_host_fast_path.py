"""The eager host path of `fused_conv` (issue 11, item 1): without a gradient the chosen backend is
called directly, with one validation per kind of call; with a gradient, under the profiler or
under FakeTensorMode the operator itself runs. The validation cache never serves a stale answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import unetpp_fast
from unetpp_fast.ops import call_facts, conv_spec
from unetpp_fast.ops import fused_op as fused_op_module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def operator_calls(monkeypatch):
    """How often the custom operator (the dispatcher path) is entered from the wrapper."""
    calls = []
    original = fused_op_module.fused_conv_op

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fused_op_module, "fused_conv_op", spy)
    return calls


def _case(seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=dtype)
    big = torch.randn(2, 2, 12, 12, generator=gen, dtype=dtype)
    w = torch.randn(4, 5, 3, 3, generator=gen, dtype=dtype)
    b = torch.randn(4, generator=gen, dtype=dtype)
    return [x, big], w, b, ["none", "maxpool2"]


def _plain(pieces, w, b):
    return F.relu(F.conv2d(torch.cat([pieces[0], F.max_pool2d(pieces[1], 2)], 1), w, b, padding=1))


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_no_grad_calls_skip_the_operator_and_match_plain_pytorch(backend, operator_calls):
    if backend != "auto" and unetpp_fast.ops.backends.why_unusable(backend, "cpu"):
        pytest.skip(f"{backend} unavailable")
    for seed in range(3):  # fresh inputs each time, the same kind of call
        pieces, w, b, modes = _case(seed)
        with torch.no_grad():
            out = unetpp_fast.fused_conv(pieces, w, b, modes, backend=backend)
        assert rel_err(out, _plain(pieces, w, b)) < 1e-12
    assert operator_calls == []


def test_a_gradient_or_the_profiler_goes_through_the_operator(operator_calls):
    pieces, w, b, modes = _case(0)
    w.requires_grad_()
    out = unetpp_fast.fused_conv(pieces, w, b, modes)
    (grad,) = torch.autograd.grad(out.sum(), [w])
    w_plain = w.detach().requires_grad_()
    (want,) = torch.autograd.grad(_plain(pieces, w_plain, b).sum(), [w_plain])
    assert rel_err(grad, want) < 1e-12
    assert len(operator_calls) == 1
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        unetpp_fast.fused_conv(pieces, w, b, modes)
    assert len(operator_calls) == 2
    assert "unetpp_fast::fused_conv" in {e.name for e in prof.events()}


def test_fake_tensors_reach_the_fake_implementation(operator_calls):
    pieces, w, b, modes = _case(0, torch.float32)
    with FakeTensorMode() as mode, torch.no_grad():
        fake = [mode.from_tensor(t) for t in (*pieces, w, b)]
        out = unetpp_fast.fused_conv(fake[:2], fake[2], fake[3], modes)
    assert tuple(out.shape) == (2, 4, 6, 6)
    assert len(operator_calls) == 1


def test_bad_input_raises_every_time_and_changed_metadata_is_validated_again():
    pieces, w, b, modes = _case(0)
    with torch.no_grad():
        unetpp_fast.fused_conv(pieces, w, b, modes)  # this kind is now validated and kept
        for _ in range(2):  # a failure is never kept as a success
            with pytest.raises(ValueError, match="weight expects C_in = 5"):
                unetpp_fast.fused_conv([pieces[0]], w, b)
        pieces[1].resize_(2, 2, 10, 12)  # same tensor object, new metadata: validated afresh
        with pytest.raises(ValueError, match="every piece must have the same size after its resample"):
            unetpp_fast.fused_conv(pieces, w, b, modes)
        with pytest.raises(TypeError, match=r"pieces\[0\] has dtype torch.float32"):
            unetpp_fast.fused_conv([pieces[0].float(), pieces[1]], w, b, modes)


def test_the_key_covers_what_validation_reads():
    pieces, w, b, modes = _case(0)
    codes = tuple(conv_spec.resample_code(m) for m in modes)
    key = call_facts.metadata_key(pieces, codes, w, b, "relu")
    assert key == call_facts.metadata_key([p.clone() for p in pieces], codes, w.clone(), b.clone(), "relu")
    variants = [
        call_facts.metadata_key(pieces, codes, w, b, "none"),
        call_facts.metadata_key(pieces, (0, 0), w, b, "relu"),
        call_facts.metadata_key(pieces, codes, w, None, "relu"),
        call_facts.metadata_key([pieces[0].float(), pieces[1]], codes, w, b, "relu"),
        call_facts.metadata_key(
            [pieces[0].to(memory_format=torch.channels_last), pieces[1]], codes, w, b, "relu"
        ),
        call_facts.metadata_key(pieces, codes, w[:, :, :1, :1], b, "relu"),
    ]
    assert all(v is not None and v != key for v in variants)
    assert len(set(variants)) == len(variants)
    # A bool is not a resample code, even though True == 1 as a dict key.
    with pytest.raises(ValueError, match=r"resample\[0\] must be one of"):
        unetpp_fast.fused_conv([pieces[0]], w[:, :3], b, [True])
