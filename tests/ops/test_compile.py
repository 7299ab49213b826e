"""The drop-in models under torch.compile (no graph breaks), autocast and channels_last."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

from unetpp_fast.compat import BasicUNetPlusPlus, NestedUNet
from unetpp_fast.ops.testing import relative_error

MONAI_SMALL = (8, 8, 16, 16, 32, 8)


def _nested(deep_supervision: bool = True) -> NestedUNet:
    torch.manual_seed(0)
    model = NestedUNet(2, input_channels=3, deep_supervision=deep_supervision)
    with torch.no_grad():  # BatchNorm statistics away from the identity, so that folding matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _monai(**kwargs) -> BasicUNetPlusPlus:
    torch.manual_seed(0)
    return BasicUNetPlusPlus(spatial_dims=2, in_channels=1, out_channels=2, features=MONAI_SMALL, **kwargs)


def _listed(out) -> list[torch.Tensor]:
    return out if isinstance(out, list) else [out]


CASES = {
    "nested-train": (lambda: _nested(), (2, 3, 32, 32), True),
    "nested-eval": (lambda: _nested(), (1, 3, 32, 32), False),
    "monai-train": (lambda: _monai(deep_supervision=True), (2, 1, 32, 32), True),
    "monai-eval-batchnorm": (lambda: _monai(norm="batch"), (1, 1, 32, 32), False),
}


def _explain(model, x):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(model)(x)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("case", ["nested-train"])
def test_no_graph_breaks(case):
    build, shape, train = CASES[case]
    explanation = _explain(build().train(train), torch.randn(shape))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("case", ["monai-train"])
def test_no_graph_breaks_under_bf16_autocast_with_channels_last(case):
    build, shape, train = CASES[case]
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = _explain(build().train(train), x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("case", ["monai-eval-batchnorm"])
def test_compiled_fullgraph_matches_eager_with_gradients(case):
    """fullgraph=True fails on any graph break; aot_eager runs the fake and autograd registrations."""
    build, shape, train = CASES[case]
    model = build().train(train)
    x = torch.randn(shape, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    try:
        got = _listed(compiled(x))
        got_grad = torch.autograd.grad(sum(o.square().sum() for o in got), x)[0]
    finally:
        torch._dynamo.reset()
    want = _listed(model(x))
    want_grad = torch.autograd.grad(sum(o.square().sum() for o in want), x)[0]
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-5
    assert relative_error(got_grad, want_grad) < 1e-5


@pytest.mark.parametrize("case", ["nested-train", "nested-eval", "monai-train", "monai-eval-batchnorm"])
def test_channels_last_input_gives_the_same_outputs(case):
    build, shape, train = CASES[case]
    model = build().train(train)
    x = torch.randn(shape)
    with torch.no_grad():
        want = _listed(model(x))
        got = _listed(model(x.to(memory_format=torch.channels_last)))
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-5


@pytest.mark.parametrize("case", ["nested-train", "nested-eval", "monai-train", "monai-eval-batchnorm"])
def test_cpu_bf16_autocast_runs_close_to_fp32(case):
    build, shape, train = CASES[case]
    model = build().train(train)
    x = torch.randn(shape)
    with torch.no_grad():
        want = _listed(model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _listed(model(x))
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert relative_error(g, w) < 5e-2  # bf16 has 8 mantissa bits; training-mode BN adds batch noise


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["nested-train", "nested-eval", "monai-train", "monai-eval-batchnorm"])
def test_cuda_autocast_close_to_fp32(case, dtype):
    build, shape, train = CASES[case]
    model = build().train(train).cuda()
    x = torch.randn(shape, device="cuda")
    with torch.no_grad():
        want = _listed(model(x))
        with torch.autocast("cuda", dtype=dtype):
            got = _listed(model(x))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert relative_error(g, w) < 5e-2


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["nested-train", "monai-eval-batchnorm"])
def test_cuda_inductor_compile_matches_eager(case):
    build, shape, train = CASES[case]
    model = build().train(train).cuda()
    x = torch.randn(shape, device="cuda").to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    try:
        got = _listed(torch.compile(model, fullgraph=True)(x))
    finally:
        torch._dynamo.reset()
    want = _listed(model(x))
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-4
